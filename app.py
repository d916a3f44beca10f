"""AToken demo: ``python app.py`` (options: --weights --config --device --dtype --port --share).

On a Hugging Face ZeroGPU Space this file is the entry point unchanged: ``spaces`` is imported
before anything touches CUDA and the GPU handlers carry ``@spaces.GPU``.
"""

import spaces  # noqa: F401, I001 - must come before torch touches CUDA (ZeroGPU)

import argparse
import os
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description="AToken Gradio demo")
    p.add_argument(
        "--model",
        default=os.environ.get("ATOKEN_MODEL"),
        help="model name (atoken-tiny, so-c, ..., random-tiny); default: bundled",
    )
    p.add_argument("--weights", default=None, help="checkpoint path (.safetensors / .pt)")
    p.add_argument("--config", default=None, help="preset or YAML for --weights")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="create a public gradio.live link")
    p.add_argument(
        "--compile",
        action="store_true",
        help="warm up torch.compile'd attention at start (falls back to SDPA)",
    )
    p.add_argument("--max-file-size", default="200mb", help="largest upload Gradio accepts")
    p.add_argument("--concurrency", type=int, default=1, help="model calls running at once")
    p.add_argument(
        "--fixed-model",
        action="store_true",
        default=os.environ.get("ATOKEN_FIXED_MODEL", "") not in ("", "0"),
        help="hide the model panel's controls (a shared deployment: switching and "
        "downloading would affect every visitor); env ATOKEN_FIXED_MODEL=1",
    )
    return p.parse_args(argv)


def compile_cache() -> Path:
    """A persistent torch.compile cache under the user cache (reused across restarts)."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = base / "atoken" / "inductor"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def main(argv: list[str] | None = None) -> None:
    """Load the model, optionally warm up compiled attention, and serve."""
    args = parse_args(argv)
    compile_cache()
    import torch

    from app.layout import build_demo
    from app.models import ModelManager
    from app.session import ROOT

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    manager = ModelManager(
        args.model, device=device, dtype=args.dtype, path=args.weights, config=args.config
    )
    print(f"model {manager.key} ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.compile:

        def report(done: int, total: int, msg: str) -> None:
            print(f"[warm-up {done}/{total}] {msg}", file=sys.stderr, flush=True)

        note = manager.warm_up(report)
        print(f"attention: {manager.backend}{note}", file=sys.stderr)
    demo = build_demo(manager, switchable=not args.fixed_model)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=64)
    ROOT.mkdir(parents=True, exist_ok=True)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=args.max_file_size,
        allowed_paths=[str(ROOT)],
        show_error=True,
    )


if __name__ == "__main__":
    main()
