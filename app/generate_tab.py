"""The "Text to image / video / 3D" sub-tab: a prompt in, new content out (`atoken.pipelines.flow`).

The generator matches the session's tokenizer (the bundled ``atoken-tiny-gen`` was trained on
``atoken-tiny``'s latents; ``atoken-tiny-d`` shares that encoder, so it decodes them too). It is
loaded once per name into a small bounded cache of its own. Every input is checked on the
server with `app.inputs`; results go to the visitor's own session folder.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import gradio as gr
import numpy as np
import spaces
import torch

from app import handlers as h
from app import inputs, viewer3d
from app.session import friendly, run_dir
from atoken.core.sparse import SparseTensor
from atoken.io.media import write_image, write_video
from atoken.pipelines.flow import (
    FlowTransformer,
    Generated,
    generate,
    load_generator,
    pooled_feature,
)
from atoken.pipelines.reconstruct import reconstruct_image
from atoken.pipelines.visualize import pca_image
from atoken.pretrained import registry

KINDS = ["image", "video", "3d"]
MAX_STEPS = 100
MAX_PROMPT = 300  # characters
GUIDANCE_MAX = 15.0
VIDEO_FPS = 8
DISPLAY_SCALE = 4  # the tiny generator makes 64 px pictures: shown 4x larger (nearest)
CACHE_SIZE = 2
EXAMPLES = [
    ["a photo of a red circle.", "image"],
    ["a photo of a green striped star.", "image"],
    ["a video of a blue square moving right.", "video"],
    ["a 3D model of a yellow torus.", "3d"],
]

_cache: OrderedDict[str, FlowTransformer] = OrderedDict()
_lock = threading.Lock()


def generator_for(model_key: str) -> FlowTransformer:
    """The generator for a session's tokenizer (bounded LRU cache; readable error if none)."""
    name = registry.generator_for(model_key)  # the generator trained on its latent space
    if name is None:
        raise gr.Error(
            f"No text-to-latent generator exists for {model_key}: the bundled atoken-tiny-gen "
            "works with atoken-tiny and atoken-tiny-d (choose one in the model panel)."
        )
    with _lock:
        if name not in _cache:
            _cache[name] = load_generator(name)
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
        _cache.move_to_end(name)
        return _cache[name]


def _bigger(frames: np.ndarray) -> np.ndarray:
    return frames.repeat(DISPLAY_SCALE, -3).repeat(DISPLAY_SCALE, -2)


def _latent_picture(out: Generated) -> np.ndarray | None:
    """PCA colours of the generated tokens: one tile per latent frame, side by side."""
    if out.kind == "3d":
        return None
    tiles = pca_image(
        out.latent.feats, out.latent.coords, upscale=16 * DISPLAY_SCALE
    )  # [T, H, W, 3]
    return np.concatenate(list(tiles), axis=1)


@spaces.GPU(duration=60)
@friendly
def generate_handler(
    prompt,
    kind,
    guidance,
    steps,
    seed,
    model_key: str | None = None,
    request: gr.Request = None,
    progress=gr.Progress(),  # noqa: B008
):
    """Prompt -> image / video / 3D Gaussians, the latent view, a summary and the result state."""
    prompt = inputs.text(prompt, "prompt", MAX_PROMPT).strip()
    if not prompt:
        raise inputs.InputError("type a prompt, e.g. 'a photo of a red circle.'")
    kind = inputs.choice(kind, KINDS, "kind")
    guidance = inputs.number(guidance, 0.0, GUIDANCE_MAX, "guidance")
    steps = inputs.integer(steps, 1, MAX_STEPS, "steps")
    seed = inputs.seed(seed)
    key = model_key if isinstance(model_key, str) else h.manager().key
    gen = generator_for(key)
    model, _, _ = h.manager().model_for(False, key)
    gs = h.manager().gaussian_decoder(key)[0] if kind == "3d" else None
    t0 = time.perf_counter()
    with h.manager().running():
        out = generate(
            model,
            gen,
            prompt,
            kind,
            steps=steps,
            guidance=guidance,
            seed=seed,
            gs_decoder=gs,
            progress=lambda i, n, m: progress(i / n, desc=f"{m} {i}/{n}"),
        )
    folder = run_dir(request, "generate")
    image = video = splat = None
    if kind == "image":
        write_image(folder / "generated.png", out.image)  # true size, for the files
        image = write_image(folder / "generated_shown.png", _bigger(out.image))
    elif kind == "video":
        video = write_video(folder / "generated.mp4", _bigger(out.frames), VIDEO_FPS)
    else:
        splat = folder / "generated.ply"
        out.gaussians.save_ply(splat, frame="y-down")
    summary = {
        "prompt": prompt,
        "kind": kind,
        "tokens": out.info["tokens"],
        "size": "x".join(map(str, out.frames.shape[1:3])) + " px, shown 4x"
        if out.frames is not None
        else None,
        "latent_shape": list(out.latent.feats.shape),
        "seconds": round(time.perf_counter() - t0, 2),
        "generator": registry.generator_for(key),
        "tokenizer": key,
    }
    if out.template:
        summary["template"] = out.template
        summary["voxels"] = out.info["voxels"]
    state = {
        "kind": kind,
        "prompt": prompt,
        "key": key,
        "latent": out.latent.feats.numpy(),
        "coords": out.latent.coords.numpy(),
        "frames": out.frames,
    }
    return (
        None if image is None else str(image),
        None if video is None else str(video),
        None if splat is None else str(splat),
        _latent_picture(out),
        summary,
        state,
        gr.update(interactive=True),
    )


@spaces.GPU(duration=60)
@friendly
def send_handler(state: dict | None, image_st, video_st, asset_st, model_key: str | None = None):
    """Hand the generated result to the zero-shot tab as that tab's image / video / 3D item."""
    if not state:
        raise gr.Error("Generate something first.")
    key = model_key if isinstance(model_key, str) else h.manager().key
    if state["key"] != key:
        raise gr.Error("The model changed since this was generated; generate again.")
    model, _, _ = h.manager().model_for(False, key)
    tag = h.manager().tag(False, key)
    kind = state["kind"]
    with h.manager().running():
        if kind == "image":  # a full image-tab state: interpolation and variations work on it too
            res = reconstruct_image(model, state["frames"][0])
            image_st = h.image_state(res, model, tag, None)
        else:
            out = Generated(
                kind,
                state["prompt"],
                SparseTensor(torch.from_numpy(state["latent"]), torch.from_numpy(state["coords"])),
                state["frames"],
            )
            fresh = {"kind": kind, "tag": tag, "discrete": False}
            fresh["pooled"] = pooled_feature(model, out).numpy()
            if kind == "video":
                video_st = fresh
            else:
                asset_st = fresh
    source = {"image": h.FROM_IMAGE, "video": h.FROM_VIDEO, "3d": h.FROM_3D}[kind]
    note = f"Sent to the Zero-shot tab as its *{source}* item: open that tab and press Classify."
    return image_st, video_st, asset_st, gr.update(value=source), note


def layout() -> dict:
    """The sub-tab's components (call inside a ``gr.Tab``)."""
    gr.Markdown(
        "Type a caption; a rectified-flow transformer turns noise into latent tokens of the "
        "session's tokenizer, which decodes them. The bundled `atoken-tiny-gen` knows only the "
        "generated world (shapes, colours, textures, motions, 3D primitives at 64 px), and "
        "some shape-colour pairs were held out of its training on purpose (see its card)."
    )
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(
                "a photo of a red circle.",
                label="Prompt",
                max_length=MAX_PROMPT,
                elem_id="gen-prompt",
            )
            kind = gr.Radio(KINDS, value="image", label="Kind", elem_id="gen-kind")
            guidance = gr.Slider(0, GUIDANCE_MAX, 4.0, step=0.5, label="Guidance")
            steps = gr.Slider(1, MAX_STEPS, 25, step=1, label="ODE steps")
            seed = gr.Number(0, precision=0, label="Seed", elem_id="gen-seed")
            run = gr.Button("Generate", variant="primary", elem_id="gen-run")
            gr.Examples(EXAMPLES, [prompt, kind], label="Examples")
        with gr.Column():
            image = gr.Image(label="Generated image", format="png", elem_id="gen-image")
            video = gr.Video(label="Generated video", autoplay=True, loop=True, elem_id="gen-video")
            splat = gr.Model3D(
                label="Generated 3D Gaussians (.ply)",
                elem_id="gen-splat",
                **viewer3d.splat_viewer(320),
            )
    with gr.Row():
        latent = gr.Image(
            label="Latent tokens (PCA colours; video: one tile per latent frame)",
            format="png",
            elem_id="gen-latent",
        )
        with gr.Column():
            info = gr.JSON(label="Summary", elem_id="gen-info")
            send = gr.Button("Send to zero-shot", interactive=False, elem_id="gen-send")
            send_note = gr.Markdown(elem_id="gen-send-note")
    gen_st = gr.State(None)
    return locals()


def wire(g: dict, zs: dict, image_st, video_st, asset_st, model_st) -> None:
    """Connect the sub-tab's events (``zs``: the zero-shot tab's components)."""
    g["run"].click(
        generate_handler,
        [g["prompt"], g["kind"], g["guidance"], g["steps"], g["seed"], model_st],
        [g["image"], g["video"], g["splat"], g["latent"], g["info"], g["gen_st"], g["send"]],
        api_name="generate",
        concurrency_id="gpu",
    )
    g["send"].click(
        send_handler,
        [g["gen_st"], image_st, video_st, asset_st, model_st],
        [image_st, video_st, asset_st, zs["source"], g["send_note"]],
        api_visibility="private",
        concurrency_id="gpu",
    )
