"""The AToken Gradio app: layout and handlers only; every computation is a call into atoken."""
