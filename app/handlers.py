"""Event handlers: UI values in, one ``atoken`` call, UI values out.

Handlers are plain module-level functions (so ZeroGPU's ``@spaces.GPU`` can wrap them) that use
the :class:`~app.models.ModelManager` given to :func:`configure`. Results kept between steps
live in ``gr.State`` as dicts of CPU numpy arrays (see :func:`image_state`), tagged with the
model that made them; the visitor's model choice is a key in ``gr.State`` too (``model_key``).

Nothing a visitor sends is trusted: files go through :func:`app.uploads.upload_path` (only this
server's uploads), numbers and choices through :mod:`app.inputs`, and every request's work is
checked against :attr:`Limits.budget` from cheap header reads before decoding or model work.
Validators (run in the join request, outside the queue's concurrency limit) only do cheap
checks; whatever must read a whole file runs in the handler, inside the queue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
import spaces
import torch
from PIL import Image

from app import inputs
from app.models import ModelManager, download_official
from app.session import error_message, friendly, log, run_dir
from app.uploads import upload_path
from atoken.core.model import ATokenModel, Encoded
from atoken.core.patchify import to_model_range
from atoken.core.sparse import SparseTensor
from atoken.io.budget import Budget, check_video_budget, image_header_size, plan_image
from atoken.io.media import (
    MediaError,
    kind_of,
    prepare_image,
    probe_video,
    read_image,
    write_image,
    write_video,
)
from atoken.pipelines.codecs import LABELS, compare_codecs, encode_image
from atoken.pipelines.generation import (
    edit_tokens,
    interpolate,
    posterior_variations,
    save_image_tokens,
)
from atoken.pipelines.metrics import MIN_SIDE, effnet_taps, error_heatmap, perceptual_distance, psnr
from atoken.pipelines.rate import token_rate
from atoken.pipelines.reconstruct import (
    VideoLimits,
    check_video,
    reconstruct_image,
    reconstruct_video,
)
from atoken.pipelines.visualize import (
    channel_maps,
    code_usage_figure,
    fit_pca,
    note_figure,
    pca_image,
    pca_scatter_figure,
    pooled_figure,
    psnr_figure,
    rate_distortion_figure,
    value_histogram_figure,
)
from atoken.pretrained import registry
from atoken.pretrained.download import cached_path
from atoken.text.zeroshot import (
    classify,
    classify_features,
    load_video,
    model_logit_params,
    parse_labels,
    probability_figure,
    resolve_text_tower,
)
from atoken.threed.mesh import MeshError, load_mesh, mesh_to_glb
from atoken.threed.mesh_count import count_mesh_elements

CONTINUOUS, DISCRETE = "continuous (KL)", "discrete (FSQ)"
FROM_IMAGE, FROM_VIDEO, FROM_3D, NEW_UPLOAD = "image tab", "video tab", "3D tab", "new upload"
SOURCES = [FROM_IMAGE, FROM_VIDEO, FROM_3D, NEW_UPLOAD]
RANDOM_CODES, OTHER_IMAGE = "random codes", "another image's codes"
ZERO_SHOT_SIDE = 512  # new uploads are classified at this max side
MAX_LABELS = 64
# Validators run in the join request, outside the queue: they decode only images this small.
VALIDATOR_DECODE_PIXELS = 4_000_000
VALIDATOR_COUNT_SECONDS = 5.0  # a header without a duration: count packets for this long at most
LABEL_PRESETS = {
    "everyday things": "cat, dog, astronaut, cup of coffee, rocket, car, tree, person, flower, house",
    "shapes and colours": "red circle, blue square, green triangle, yellow star, purple ring, "
    "orange stripes, black and white checkerboard",
    "3D objects": "duck, teapot, panda, torus, toy blocks, chair, airplane, ball",
    "motion": "moving left, moving right, zooming in, zooming out, rotating, standing still",
    "generated world (what atoken-tiny knows)": "red circle, green square, blue triangle, "
    "yellow star, purple hexagon, orange cross, white heart, black ring",
}
SIGMOID_NONE = 0.1  # below this, no label of a sigmoid score fits
PERCEPTUAL_MEANS = (
    "EfficientNet-Lite0 feature distance (ImageNet-trained network, five layers, LPIPS-style "
    "but without learned weights, so not comparable with LPIPS numbers): 0 = the same "
    "features, lower is closer; images under 32 px get none"
)
VIDEO_PERCEPTUAL_FRAMES = 8  # the video tab scores at most this many evenly spaced frames
CODEC_QUALITIES = (10, 30, 50, 70, 90)  # the rate-distortion curve of each codec
CODEC_EXT = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}
TINY_ZERO_SHOT = (
    "`{key}` learnt zero-shot only on the project's generated world: 8 flat shapes and 5 solid "
    'primitives in 8 colours ("a red striped star"). It gets the colour of such pictures right '
    "almost always and the shape about a third of the time; on real photos its labels are "
    'guesses. Official weights (or the "generated world" preset on a world picture) show what '
    "zero-shot classification can do."
)


@dataclass
class Limits:
    """Upload limits and the per-request work budget, checked before any model work."""

    image_bytes: int = 50 * 2**20
    video_bytes: int = 200 * 2**20
    mesh_bytes: int = 100 * 2**20
    video: VideoLimits = field(
        default_factory=lambda: VideoLimits(
            max_frames=256, max_side=1920, max_duration=120.0, max_read_frames=2048
        )
    )
    max_side: int = 1024  # largest max-side the image and video tabs accept
    budget: Budget = field(default_factory=Budget)


M: ModelManager | None = None
LIMITS = Limits()


def configure(manager: ModelManager, limits: Limits | None = None) -> None:
    """Set the model manager (and limits) every handler uses."""
    global M, LIMITS
    M = manager
    LIMITS = limits or Limits()


def manager() -> ModelManager:
    """The configured model manager."""
    if M is None:
        raise RuntimeError("app.handlers.configure(manager) was not called")
    return M


# -- state ----------------------------------------------------------------------------------


def image_state(res, model: ATokenModel, tag: str, max_side: int | None) -> dict:
    """An ImageResult as CPU numpy for ``gr.State``."""
    enc = res.encoded
    return {
        "kind": "image",
        "tag": tag,
        "discrete": res.indices is not None,
        "max_side": max_side,
        "original": res.original,
        "reconstruction": res.reconstruction,
        "mean": enc.mean.float().cpu().numpy(),
        "logvar": enc.logvar.float().cpu().numpy(),
        "coords": enc.coords.cpu().numpy(),
        "latent": res.latent.feats.float().cpu().numpy(),
        "indices": None if res.indices is None else res.indices.cpu().numpy(),
        "pooled": enc.pooled.float().cpu().numpy(),
        "codebook_size": model.config.codebook_size if model.is_discrete else None,
    }


def _encoded(state: dict) -> Encoded:
    mean = torch.from_numpy(state["mean"])
    return Encoded(
        mean,
        torch.from_numpy(state["logvar"]),
        torch.from_numpy(state["pooled"]),
        mean.new_zeros(0, 0),
        torch.from_numpy(state["coords"]),
    )


def _model_of(state: dict | None, model_key: str | None, what: str) -> ATokenModel:
    """The model that made a state, refusing states of a model the session no longer runs."""
    if not state:
        raise gr.Error(f"Nothing to use yet: run the {what} first.")
    if state["tag"] != manager().tag(state["discrete"], model_key):
        raise gr.Error(
            f"The model changed since this {state['kind']} was processed; run the {what} again."
        )
    model, _, _ = manager().model_for(state["discrete"], model_key)
    return model


def _finite(d: dict) -> dict:
    """Round floats for display; infinities (identical images) become strings."""
    out = {}
    for k, v in d.items():
        if isinstance(v, float):
            v = round(v, 4) if math.isfinite(v) else str(v)
        out[k] = v
    return out


def _layer_mask(layer, shape: tuple[int, int], request=None) -> np.ndarray:
    """Painted pixels of one ImageEditor layer (its raw upload), checked against the image."""
    if isinstance(layer, np.ndarray):  # direct calls (tests); visitors always send a file
        arr = layer
    else:
        path = upload_path(layer, request, max_bytes=LIMITS.image_bytes, what="painted layer")
        if path is None:
            raise MediaError("a painted layer is missing: paint the mask again")
        w, h = image_header_size(path)  # before decoding: it must match the image
        if (h, w) != tuple(shape):
            raise MediaError(f"the painted layer is {w}x{h}; the image is {shape[1]}x{shape[0]}")
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGBA"))
    if arr.shape[:2] != tuple(shape):
        raise MediaError(
            f"the painted layer is {arr.shape[1]}x{arr.shape[0]}; the image is "
            f"{shape[1]}x{shape[0]}"
        )
    if arr.ndim == 3 and arr.shape[2] == 4:
        return arr[..., 3] > 0
    return arr.reshape(*arr.shape[:2], -1).any(-1)


def _image(value, request=None, what: str = "image") -> str | None:
    """A visitor's image upload as a trusted path (None when nothing was sent)."""
    return upload_path(value, request, max_bytes=LIMITS.image_bytes, what=what)


def _plan(path: str, max_side: int | None):
    """The image's cost from its header, within the budget (MediaError naming the limit)."""
    return plan_image(path, max_side, LIMITS.budget)


def _max_side(value) -> int | None:
    """The max-side control: 0 keeps the size (within the budget)."""
    side = inputs.integer(value if value is not None else 0, 0, LIMITS.max_side, "max side")
    if side and side < 16:
        raise inputs.InputError(f"max side must be 0 (keep) or 16 to {LIMITS.max_side}")
    return side or None


def _tokens(value) -> bool:
    """True for discrete tokens."""
    return inputs.choice(value, [CONTINUOUS, DISCRETE], "tokens") == DISCRETE


def _ok(n: int) -> list:
    return [gr.validate(True, "")] * n


def _first_invalid(message: str, n: int) -> list:
    return [gr.validate(False, message), *_ok(n - 1)]


# -- model panel ------------------------------------------------------------------------------


def model_choices() -> list[tuple[str, str]]:
    """(label, key) pairs for the model dropdown: what the operator lets visitors pick."""
    return [(e.label, e.key) for e in manager().entries()]


def _entry(key) -> object:
    entry = {e.key: e for e in manager().entries()}.get(key) if isinstance(key, str) else None
    if entry is None:
        raise gr.Error(f"unknown model {str(key)[:60]!r}; pick one from the list")
    return entry


@friendly
def model_info(key: str) -> tuple[str, dict]:
    """Where a model loads from, its licence, and whether the download button applies."""
    entry = _entry(key)
    text = f"`{key}`: {entry.note}"
    if entry.source == "official":
        text += f"\n\nLicence: {registry.MODELS[key].licence}"
    can_download = (
        manager().policy.allow_downloads and entry.source == "official" and cached_path(key) is None
    )
    return text, gr.update(interactive=can_download)


def load_model(key: str, model_key: str | None = None) -> tuple[str, dict, str]:
    """Switch this visitor's session to another model (other visitors keep theirs).

    A failed load never raises: an error would cover the dropdown with Gradio's error badge and
    block it. The session keeps its model, the dropdown goes back to it, and the status line
    says what went wrong."""
    m = manager()
    offered = {e.key for e in m.entries()}
    current = model_key if isinstance(model_key, str) and model_key in offered else m.key
    try:
        status = m.load(key)  # refuses what the operator does not offer
    except Exception as e:  # noqa: BLE001 - shown in the status line, the panel stays usable
        message = error_message(e)
        log.info("load_model refused %r: %s", str(key)[:60], message)
        gr.Warning(message)
        text = f"**Could not load `{str(key)[:60]}`:** {message}\n\n{m.status(current)}"
        return text, gr.update(value=current), current
    return status, gr.update(value=key), key


@friendly
def download_model(key: str, progress=gr.Progress()) -> str:  # noqa: B008
    """Download official weights with a progress bar (only when the operator allows it)."""
    if not manager().policy.allow_downloads:
        raise gr.Error("Downloads are turned off on this server (operator flag --allow-downloads).")
    if _entry(key).source != "official":
        raise gr.Error(f"{key} is not an official checkpoint")

    def callback(done: int, total: int | None) -> None:
        mb = done / 2**20
        if total:
            progress(done / total, desc=f"{mb:.0f} / {total / 2**20:.0f} MB")
        else:
            progress(None, desc=f"{mb:.0f} MB")

    download_official(key, callback)
    return f"Downloaded `{key}`. Press **Load** to use it."


def status(model_key: str | None = None) -> str:
    """The 'which model is running' line of a session."""
    return manager().status(model_key)


# -- image tab ------------------------------------------------------------------------------


def _cheap(fn, n: int, index: int = 0) -> list:
    """Run a cheap check; a readable failure marks input ``index`` invalid."""
    try:
        fn()
    except (ValueError, gr.Error) as e:  # MediaError, MeshError and InputError are ValueErrors
        out = _ok(n)
        out[index] = gr.validate(False, str(e))
        return out
    return _ok(n)


def validate_image(image, max_side, *rest) -> list:
    """Refuse non-uploads, oversized files and over-budget images from the header alone."""
    n = 2 + len(rest)
    if image is None:
        return _first_invalid("Upload, paste or take a picture first.", n)
    if not (isinstance(image, dict) and "url" in image and not image.get("path")):
        out = _cheap(lambda: _check_image(_image(image)), n)
        if not out[0]["is_valid"]:
            return out
    return _cheap(lambda: _plan_side(image, max_side), n, 1)


def _check_image(path: str) -> None:
    """Header checks; a small image is also decoded (cheap), so damage shows at upload."""
    plan = _plan(path, None)
    if plan.width * plan.height <= VALIDATOR_DECODE_PIXELS:
        read_image(path)


def _plan_side(image, max_side) -> None:
    side = _max_side(max_side)
    if side is not None and not (isinstance(image, dict) and not image.get("path")):
        _plan(_image(image), side)


def preview_image(
    image, max_side: float, request: gr.Request = None
) -> tuple[np.ndarray | None, str]:
    """What the model will see: the upload downscaled and cropped to the 16-px grid.

    A file that cannot be previewed is explained under the preview, not raised: the Reconstruct
    button's check says it once more at the input, and two error toasts for one upload (plus an
    error badge over the preview) only confuse."""
    try:
        path = _image(image, request)
        if path is None:
            return None, ""
        plan = _plan(path, _max_side(max_side))
        img = prepare_image(path, max_side=plan.max_side)
    except Exception as e:  # noqa: BLE001 - shown as text under the preview
        message = error_message(e)
        log.info("preview_image refused: %s", message)
        return None, f"**Cannot use this file:** {message}"
    h, w = img.shape[:2]
    text = f"Model input: {w}x{h} px = {h // 16}x{w // 16} = {h * w // 256} tokens"
    return img, text + (f" ({plan.note})" if plan.note else "")


@spaces.GPU(duration=60)
@friendly
def reconstruct_image_handler(
    image,
    max_side: float,
    tokens: str,
    latent_mode: str,
    seed: float,
    temperature: float,
    model_key: str | None = None,
    request: gr.Request = None,
):
    """Encode and decode an image: slider pair, error heatmap, metrics, files, state."""
    side, discrete = _max_side(max_side), _tokens(tokens)
    latent_mode = inputs.choice(latent_mode, ["mean", "sample"], "latent")
    seed = inputs.seed(seed)
    temperature = inputs.number(1.0 if temperature is None else temperature, 0, 3, "temperature")
    image = _image(image, request)
    if image is None:
        raise gr.Error("Upload, paste or take a picture first.")
    plan = _plan(image, side)
    model, mode, name = manager().model_for(discrete, model_key)
    if not discrete and latent_mode == "sample":
        mode = "sample"
    with manager().running():
        res = reconstruct_image(
            model, image, max_side=plan.max_side, mode=mode, seed=seed, temperature=temperature
        )
        seen = min(res.original.shape[:2]) >= MIN_SIDE
        dist = perceptual_distance(res.original, res.reconstruction, model.device) if seen else None
    out = run_dir(request, "image")
    files = [
        write_image(out / "reconstruction.png", res.reconstruction),
        write_image(out / "original.png", res.original),
        save_image_tokens(model, res, out / "tokens.safetensors"),
    ]
    metrics = {
        **res.metrics(),
        "perceptual": dist,
        "perceptual_means": PERCEPTUAL_MEANS,
        "grid": list(res.grid),
        "latent_shape": list(res.latent.feats.shape),
        "mode": res.mode,
        "model": name,
    }
    metrics["compression_means"] = compression_means(metrics, res.original.shape, discrete)
    if plan.note:
        metrics["note"] = plan.note
    heat = error_heatmap(res.original, res.reconstruction, data_range=255)
    state = image_state(res, model, manager().tag(discrete, model_key), plan.max_side)
    state["metrics"] = {k: metrics[k] for k in ("psnr", "ssim", "perceptual")}
    return (
        (res.original, res.reconstruction),
        heat,
        _finite(metrics),
        [str(f) for f in files],
        state,
    )


@friendly
def latent_view(state: dict | None):
    """PCA colours, channel maps and figures of the last image's latent."""
    if not state:
        raise gr.Error("Reconstruct an image first.")
    lat, coords = torch.from_numpy(state["latent"]), torch.from_numpy(state["coords"])
    basis = fit_pca(lat)
    if state["indices"] is not None:
        usage = code_usage_figure(torch.from_numpy(state["indices"]), state["codebook_size"])
    else:  # the plot stays on screen: a layout that changes leaves plotly drawn at the old width
        usage = note_figure(
            "Continuous (KL) tokens use no codebook.<br>Reconstruct with discrete (FSQ) tokens "
            "to see how many codes each group uses.",
            "FSQ code usage",
        )
    ex = ", ".join(f"{float(e):.0%}" for e in basis.explained)
    return (
        pca_image(lat, coords, basis)[0],
        channel_maps(lat, coords, upscale=4),
        value_histogram_figure(lat),
        usage,
        pooled_figure(torch.from_numpy(state["pooled"])),
        pca_scatter_figure(lat, basis),
        f"PCA components explain {ex} of the latent variance.",
    )


def compression_means(metrics: dict, shape: tuple, discrete: bool) -> str:
    """What the bare "compression" number is: raw bits over latent bits, spelt out."""
    h_, w_ = shape[:2]
    tokens, channels = metrics["latent_shape"]
    bits = h_ * w_ * 3 * 8 / metrics["compression"]
    per_token = (
        f"{round(bits / tokens)} bits of FSQ codes" if discrete else f"{channels} float16 values"
    )
    return (
        f"raw 8-bit RGB ({h_}x{w_}x3 bytes) is {metrics['compression']:.1f}x the size of the "
        f"latent ({tokens} tokens x {per_token} = {bits / (h_ * w_):.2f} bits per pixel, "
        "before any entropy coding)"
    )


def after_image(state: dict | None):
    """Enable the follow-up buttons and load the token editor once an image is reconstructed."""
    has = bool(state)
    discrete = has and state["discrete"]
    editor = {"background": state["original"], "layers": [], "composite": None} if has else None
    return (
        gr.update(interactive=has),
        gr.update(interactive=has),
        gr.update(interactive=discrete),
        gr.update(value=editor),
        ""
        if discrete
        else f"Token editing needs discrete tokens: reconstruct with '{DISCRETE}' selected.",
        posterior_note(state),
    )


def _codec_row(name: str, bpp: float, psnr_db: float, ssim_v, dist, extra: str = "") -> str:
    def num(v, f: str) -> str:
        return "n/a" if v is None else ("inf" if not math.isfinite(v) else format(v, f))

    return (
        f"| {name} | {bpp:.3f} | {num(psnr_db, '.2f')} | {num(ssim_v, '.3f')} | "
        f"{num(dist, '.3f')} | {extra} |"
    )


@spaces.GPU(duration=60)
@friendly
def compare_codecs_handler(
    state: dict | None, model_key: str | None = None, request: gr.Request = None
):
    """The last image against JPEG / WebP / AVIF at the tokens' bits: pictures with their
    numbers, a table, a rate-distortion plot and the codec files."""
    model = _model_of(state, model_key, "image reconstruction")
    original, rec = state["original"], state["reconstruction"]
    if min(original.shape[:2]) < MIN_SIDE:
        raise gr.Error(f"The codec comparison needs an image of at least {MIN_SIDE} px per side.")
    latent = SparseTensor(torch.from_numpy(state["latent"]), torch.from_numpy(state["coords"]))
    with manager().running():
        rate = token_rate(model, latent, original, rec, fsq=state["discrete"])
        ref = effnet_taps(original, model.device)
        cmp = compare_codecs(
            original, rate.bits, qualities=CODEC_QUALITIES, reference_taps=ref, device=model.device
        )
    mine = state["metrics"]
    out = run_dir(request, "codecs")
    gallery = [(str(write_image(out / "tokens.png", rec)), f"tokens: {rate.bpp:.3f} bpp")]
    row = _codec_row("tokens", rate.bpp, mine["psnr"], mine["ssim"], mine["perceptual"], rate.kind)
    rows, files = [row], []
    for name, p in cmp.at_budget.items():
        data, _ = encode_image(original, name, p.quality)
        files.append(out / f"{name}_q{p.quality}.{CODEC_EXT[name]}")
        files[-1].write_bytes(data)
        shown = f"{LABELS[name]} q{p.quality}: {p.bpp:.3f} bpp, {p.psnr:.2f} dB"
        gallery.append((str(write_image(out / f"{name}.png", p.decoded)), shown))
        extra = f"quality {p.quality}" + ("" if p.fits else ": its smallest file is larger")
        rows.append(_codec_row(LABELS[name], p.bpp, p.psnr, p.ssim, p.perceptual, extra))
    lines = [
        f"**How the tokens' bits are counted:** {rate.explanation()}",
        "",
        "| | bits per pixel | PSNR (dB) | SSIM | perceptual distance | |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    lines += [f"\n**{LABELS[n]} is missing:** {why}." for n, why in cmp.missing.items()]
    points = {
        f"tokens ({rate.kind}, counted bits)": (rate.bpp, mine["psnr"] - (rate.psnr_drop or 0))
    }
    if rate.stored_bits != rate.bits:
        points[f"tokens as stored ({rate.precision})"] = (rate.stored_bpp, mine["psnr"])
    fig = rate_distortion_figure(
        {LABELS[n]: [(p.bpp, p.psnr) for p in pts] for n, pts in cmp.curves.items()},
        {LABELS[n]: (p.bpp, p.psnr) for n, p in cmp.at_budget.items()},
        points,
    )
    return gallery, "\n".join(lines), fig, [str(f) for f in files]


def codecs_stale() -> tuple:
    """Empty the codec panel when a new reconstruction starts (its numbers were for the last)."""
    return None, "Press the button to compare this reconstruction with the codecs.", None, None


# -- video tab ------------------------------------------------------------------------------


def _video_inputs(stride, max_side, max_frames) -> tuple[int, int | None, int | None]:
    """The video controls, checked: (stride, max side or None, max frames or None)."""
    stride = inputs.integer(stride if stride is not None else 1, 1, 8, "frame stride")
    side = _max_side(max_side)
    frames = inputs.integer(
        max_frames if max_frames is not None else 0, 0, LIMITS.video.max_frames, "max frames"
    )
    return stride, side, frames or None


def _video(value, request=None) -> str | None:
    return upload_path(value, request, max_bytes=LIMITS.video_bytes, what="video")


def validate_video(video, stride, max_side, max_frames, *rest) -> list:
    """Refuse non-uploads, oversized files and bad settings (cheap: no decoding here)."""
    n = 4 + len(rest)
    if video is None:
        return _first_invalid("Upload a video first.", n)
    out = _cheap(lambda: _video_inputs(stride, max_side, max_frames), n, 1)
    if not out[1]["is_valid"]:
        return out
    return _cheap(lambda: _check_video_header(_video(video), max_side), n)


def _check_video_header(path: str, max_side) -> None:
    """The header's size and duration (cheap; the frames are counted in the handler)."""
    info = probe_video(path, count=False, max_count_seconds=VALIDATOR_COUNT_SECONDS)
    lim = LIMITS.video
    if max(info.width, info.height) > lim.max_side and not _max_side(max_side):
        raise MediaError(
            f"video is {info.width}x{info.height}; the limit is {lim.max_side} px per side "
            "(set a max side to downscale)"
        )
    if info.duration > lim.max_duration:
        raise MediaError(
            f"video lasts {info.duration:.1f} s; the limit is {lim.max_duration:.0f} s"
        )


def preview_video(video, stride, max_frames, request: gr.Request = None) -> str:
    """What part of the clip the settings cover, from the header (cheap), before the run."""
    try:
        path = _video(video, request)
        if path is None:
            return ""
        stride, _, frames = _video_inputs(stride, 0, max_frames)
        info = probe_video(path, count=False, max_count_seconds=VALIDATOR_COUNT_SECONDS)
    except Exception as e:  # noqa: BLE001 - said here; the run's check says it again
        return f"**Cannot use this file:** {error_message(e)}"
    about = "" if info.counted else "about "
    text = (
        f"This clip: {about}{info.num_frames} frames at {info.fps:g} fps ({info.duration:.1f} s)."
    )
    done = math.ceil(info.num_frames / stride)
    if frames:
        done = min(done, frames)
    note = coverage_note(info.num_frames, info.fps, stride, done, ahead=True)
    return f"{text} {note or 'All of it will be reconstructed.'}"


def _video_seconds(video, stride, max_side, max_frames, *args, **kwargs) -> int:
    """ZeroGPU time budget: grows with the number of frames."""
    frames = max_frames if isinstance(max_frames, (int, float)) else 0
    return int(min(600, 30 + 2 * (int(frames or 0) or LIMITS.video.max_frames)))


@spaces.GPU(duration=_video_seconds)
@friendly
def reconstruct_video_handler(
    video,
    stride: float,
    max_side: float,
    max_frames: float,
    tokens: str,
    model_key: str | None = None,
    request: gr.Request = None,
    progress=gr.Progress(),  # noqa: B008
):
    """Stream a video through the model: side-by-side mp4, PSNR plot, latent PCA video, files."""
    stride, side, frames = _video_inputs(stride, max_side, max_frames)
    discrete = _tokens(tokens)
    video = _video(video, request)
    if video is None:
        raise gr.Error("Upload a video first.")
    progress((0, 1), desc="counting the video's frames")
    # the real frame count from the container (not fps x duration), then the budget
    info = check_video(video, LIMITS.video, stride=stride, max_side=side, max_frames=frames)
    check_video_budget(
        info.num_frames,
        info.width,
        info.height,
        LIMITS.budget,
        stride=stride,
        max_side=side,
        max_frames=frames,
    )
    model, mode, name = manager().model_for(discrete, model_key)
    out = run_dir(request, "video")
    with manager().running():
        res = reconstruct_video(
            model,
            video,
            out,
            stride=stride,
            max_side=side,
            max_frames=frames,
            mode=mode,
            limits=LIMITS.video,
            perceptual_frames=VIDEO_PERCEPTUAL_FRAMES,
            progress=lambda done, total, msg: progress((done, total), desc=msg, unit="frames"),
        )
    note = coverage_note(info.num_frames, info.fps, stride, res.num_frames)
    scored = [i for i, _ in res.perceptual_per_frame]
    metrics = {
        "psnr_mean": res.mean_psnr,
        "perceptual_mean": res.mean_perceptual,
        "perceptual_frames": f"{len(scored)} of {res.num_frames} frames scored"
        + (f", evenly spaced: {', '.join(map(str, scored))}" if len(scored) > 1 else ""),
        "perceptual_means": PERCEPTUAL_MEANS + "; here the mean over the scored frames",
        "frames": res.num_frames,
        "fps": res.fps,
        "size": list(res.size),
        "tokens": res.num_tokens,
        "mode": mode,
        "model": name,
        "covers": note or f"the whole clip ({info.num_frames} frames)",
    }
    if note:
        gr.Warning(note)
    state = {
        "kind": "video",
        "tag": manager().tag(discrete, model_key),
        "discrete": discrete,
        "pooled": res.pooled.float().numpy(),
    }
    files = [
        str(res.files[k]) for k in ("side_by_side", "reconstruction", "original", "latent_pca")
    ]
    return (
        str(res.files["side_by_side"]),
        psnr_figure(res.psnr_per_frame),
        str(res.files["latent_pca"]),
        _finite(metrics),
        files,
        state,
    )


def coverage_note(frames: int, fps: float, stride: int, done: int, *, ahead: bool = False) -> str:
    """What part of a clip a reconstruction covers (or, ``ahead``, will cover), when it is not
    all of it (else "")."""
    used = min(frames, done * stride)
    if used >= frames:
        return ""
    seconds = f"{used / fps:.1f} s of {frames / fps:.1f} s" if fps > 0 else f"of {frames} frames"
    return (
        f"Only the first {used} of {frames} frames ({seconds}) "
        f"{'will be' if ahead else 'were'} reconstructed: raise "
        '"max frames" (or the frame stride) to cover more.'
    )


# -- 3D tab ---------------------------------------------------------------------------------


def _mesh(value, request=None) -> str | None:
    return upload_path(value, request, max_bytes=LIMITS.mesh_bytes, what="mesh")


def _check_mesh_counts(path: str) -> None:
    """Faces and vertices from a streaming count or the header, against the budget (cheap)."""
    if Path(path).suffix.lower() == ".zip":
        return  # counted after the (bounded) extraction, inside the queue
    try:
        counts = count_mesh_elements(path)
    except (ValueError, OSError) as e:
        raise MeshError(f"{Path(path).name}: {e}") from e
    b = LIMITS.budget
    if counts.faces > b.max_faces:
        raise MeshError(f"the mesh has {counts.faces} faces; the limit is {b.max_faces}")
    if counts.vertices > b.max_vertices:
        raise MeshError(f"the mesh has {counts.vertices} vertices; the limit is {b.max_vertices}")


def _load_mesh(path: str):
    """Parse a mesh inside the queue, within the budget's faces and vertices."""
    b = LIMITS.budget
    return load_mesh(
        path, max_faces=b.max_faces, max_vertices=b.max_vertices, max_bytes=LIMITS.mesh_bytes
    )


def _mesh_inputs(views, resolution, frames) -> tuple[int, int, int]:
    views = inputs.integer(views if views is not None else 16, 4, 64, "views")
    resolution = inputs.integer(
        resolution if resolution is not None else 256, 128, 512, "render resolution"
    )
    frames = inputs.integer(frames if frames is not None else 0, 0, 48, "turntable frames")
    return views, resolution, frames


def validate_mesh(mesh, *rest) -> list:
    """Refuse non-uploads and meshes over the budget from a cheap count (no parsing here)."""
    n = 1 + len(rest)
    if mesh is None:
        return _first_invalid("Upload a mesh first.", n)
    out = _cheap(lambda: _check_mesh_counts(_mesh(mesh)), n)
    if not out[0]["is_valid"] or len(rest) < 3:
        return out
    return _cheap(lambda: _mesh_inputs(*rest[:3]), n, 1)


@friendly
def preview_mesh(mesh, request: gr.Request = None) -> str | None:
    """The uploaded mesh, normalised and as .glb, for the input viewer."""
    path = _mesh(mesh, request)
    if path is None:
        return None
    _check_mesh_counts(path)
    return str(mesh_to_glb(_load_mesh(path), run_dir(request, "mesh") / "input.glb"))


def _mesh_seconds(mesh, num_views, resolution, turntable_frames, *args, **kwargs) -> int:
    views = num_views if isinstance(num_views, (int, float)) else 32
    frames = turntable_frames if isinstance(turntable_frames, (int, float)) else 0
    return int(min(300, 60 + 2 * min(64, int(views or 32)) + 2 * min(48, int(frames or 0))))


@spaces.GPU(duration=_mesh_seconds)
@friendly
def reconstruct_3d_handler(
    mesh,
    num_views: float,
    resolution: float,
    turntable_frames: float,
    model_key: str | None = None,
    request: gr.Request = None,
    progress=gr.Progress(),  # noqa: B008
):
    """Mesh -> voxels -> tokens -> Gaussians: input and .ply viewers, turntable, metrics."""
    from atoken.pipelines import reconstruct3d as pipeline3d

    views, resolution, frames = _mesh_inputs(num_views, resolution, turntable_frames)
    path = _mesh(mesh, request)
    if path is None:
        raise gr.Error("Upload a mesh first.")
    _check_mesh_counts(path)
    asset = _load_mesh(path)  # parsed once, within the budget
    m = manager()
    key = model_key or m.key
    model = m.get(key)
    gs, gs_name = m.gaussian_decoder(key)
    out = run_dir(request, "3d")
    with m.running():
        res = pipeline3d.reconstruct_asset(
            model,
            gs,
            asset,
            out / "reconstruction.ply",
            num_views=views,
            resolution=resolution,
            turntable=out / "turntable.mp4" if frames else None,
            turntable_frames=max(frames, 1),
            progress=lambda done, total, msg: progress((done, total), desc=msg),
        )
    metrics = {
        **res.metrics,
        "voxels": res.num_voxels,
        "gaussians": res.num_gaussians,
        "model": key,
        "gaussian_decoder": gs_name,
    }
    state = {
        "kind": "3d",
        "tag": m.tag(model.is_discrete, key),
        "discrete": model.is_discrete,
        "pooled": res.pooled.float().cpu().numpy(),
    }
    turntable = str(res.turntable) if res.turntable else None
    files = [str(p) for p in (res.ply, res.input_glb, res.turntable) if p]
    return str(res.input_glb), str(res.ply), turntable, _finite(metrics), files, state


# -- zero-shot tab --------------------------------------------------------------------------


def _any_upload(value, request=None) -> str | None:
    """A zero-shot upload: trusted, and within the size limit of its kind."""
    path = upload_path(value, request, max_bytes=LIMITS.video_bytes, what="upload")
    if path is None:
        return None
    kind = kind_of(path)
    limit = {"image": LIMITS.image_bytes, "video": LIMITS.video_bytes}.get(kind, LIMITS.mesh_bytes)
    return upload_path(path, request, max_bytes=limit, what=kind)


def _check_upload(path: str) -> str:
    """The kind of a zero-shot upload, checked cheaply against the budget."""
    kind = kind_of(path)
    if kind == "image":
        _plan(path, ZERO_SHOT_SIDE)
    elif kind == "mesh":
        _check_mesh_counts(path)
    return kind


def validate_upload(source, upload, *rest) -> list:
    """Check a zero-shot upload by kind before the model runs (cheap: headers only)."""
    n = 2 + len(rest)
    out = _cheap(lambda: inputs.choice(source, SOURCES, "item"), n)
    if not out[0]["is_valid"] or source != NEW_UPLOAD or upload is None:
        return out
    return _cheap(lambda: _check_upload(_any_upload(upload)), n, 1)


def _classify_upload(path: str, names: list[str], kind: str, model_key: str | None) -> dict:
    """Zero-shot probabilities of a new upload, each kind within the budget."""
    model = manager().get(model_key or manager().key)
    modality = _check_upload(path)
    if modality == "image":
        item = to_model_range(prepare_image(path, max_side=ZERO_SHOT_SIDE)).numpy()
    elif modality == "video":
        info = probe_video(path)  # the real frame count: the 16 frames span the whole clip
        b = LIMITS.budget
        if info.num_frames > b.max_read_frames:
            raise MediaError(
                f"the video has {info.num_frames} frames; the limit is {b.max_read_frames}"
            )
        if max(info.width, info.height) > LIMITS.video.max_side:
            raise MediaError(
                f"the video is {info.width}x{info.height}; the limit is "
                f"{LIMITS.video.max_side} px per side"
            )
        item = load_video(path, num_frames=16, max_side=ZERO_SHOT_SIDE)
    else:
        from atoken.threed.mesh_render import mesh_to_voxels

        feats, coords = mesh_to_voxels(_load_mesh(path))
        item, modality = (np.asarray(feats, np.float32), np.asarray(coords)), "3d"
    with manager().running():
        return classify(model, item, names, kind=kind, modality=modality)


@spaces.GPU(duration=60)
@friendly
def classify_handler(
    source: str,
    upload,
    labels: str,
    kind: str,
    image_st: dict | None,
    video_st: dict | None,
    asset_st: dict | None,
    model_key: str | None = None,
    request: gr.Request = None,
):
    """Zero-shot probabilities of typed labels for a tab's result or a new upload."""
    source = inputs.choice(source, SOURCES, "item")
    kind = inputs.choice(kind, ["sigmoid", "softmax"], "probabilities")
    names = parse_labels(inputs.text(labels, "labels"))
    if len(names) > MAX_LABELS:
        raise inputs.InputError(f"{len(names)} labels; the limit is {MAX_LABELS}")
    if source == NEW_UPLOAD:
        path = _any_upload(upload, request)
        if path is None:
            raise gr.Error("Upload an image, a video or a mesh to classify.")
        probs = _classify_upload(path, names, kind, model_key)
        model_key = _session_key(model_key)
    else:
        state = {FROM_IMAGE: image_st, FROM_VIDEO: video_st, FROM_3D: asset_st}[source]
        model = _model_of(state, model_key, f"reconstruction in the {source}")
        tower = resolve_text_tower(model)
        scale, bias = model_logit_params(model)
        probs = classify_features(
            torch.from_numpy(state["pooled"]), names, tower, scale, bias, state["kind"], kind=kind
        )
        model_key = _session_key(model_key)
    return probability_figure(probs), verdict(probs, kind, model_key), probs


def _session_key(model_key: str | None) -> str:
    return model_key if isinstance(model_key, str) else manager().key


def verdict(probs: dict[str, float], kind: str, model_key: str | None = None) -> str:
    """One honest sentence on the scores: the best label, or that none fits; and what the model
    running can be expected to know."""
    best = max(probs, key=probs.get)
    p = probs[best]
    if kind == "softmax":
        text = (
            f"Most likely of these labels: **{best}** ({p:.0%}). Softmax shares 100% among the "
            "labels you typed, so it always picks one, even when none fits (sigmoid scores each "
            "label on its own)."
        )
    elif p < SIGMOID_NONE:
        text = (
            f"**None of these labels fits**: the best, *{best}*, scores {p:.1%} (sigmoid scores "
            f"each label on its own; below {SIGMOID_NONE:.0%} the model says no)."
        )
    else:
        text = f"Best match: **{best}** ({p:.0%})."
    key = _session_key(model_key)
    if manager().is_random(key):
        text += f"\n\n`{key}` has random weights: these scores mean nothing."
    elif key.startswith("atoken-tiny"):
        text += "\n\n" + TINY_ZERO_SHOT.format(key=key)
    return text


def fill_labels(preset: str) -> str:
    """Label text of a preset."""
    return LABEL_PRESETS.get(preset, "") if isinstance(preset, str) else ""


# -- generation tab -------------------------------------------------------------------------


def validate_second_image(image_b, *rest) -> list:
    """Refuse a non-upload or over-budget image B before the model runs (header only)."""
    n = 1 + len(rest)
    if image_b is None:
        return _first_invalid("Upload the second image (B) to interpolate towards.", n)
    return validate_image(image_b, 0)[:1] + _ok(n - 1)


def _check_decodes(count: int, state: dict, what: str) -> None:
    """Several decodes of one latent: bounded by 8 full-budget images' tokens."""
    tokens = len(state["coords"])
    limit = 8 * LIMITS.budget.max_tokens
    if count * tokens > limit:
        raise inputs.InputError(
            f"{count} {what} of {tokens} tokens each make {count * tokens} tokens; the limit is "
            f"{limit} (use at most {max(1, limit // tokens)}, or a smaller image)"
        )


@spaces.GPU(duration=90)
@friendly
def interpolate_handler(
    image_b,
    steps: float,
    mode: str,
    image_st: dict | None,
    model_key: str | None = None,
    request: gr.Request = None,
):
    """Decode the path from the image tab's latent to another image's: an mp4 and a gallery."""
    steps = inputs.integer(steps, 2, 32, "steps")
    mode = inputs.choice(mode, ["slerp", "lerp"], "path")
    model = _model_of(image_st, model_key, "reconstruction in the image tab")
    _check_decodes(steps, image_st, "steps")
    image_b = _image(image_b, request, "image B")
    if image_b is None:
        raise gr.Error("Upload the second image (B) to interpolate towards.")
    plan = _plan(image_b, image_st["max_side"])
    a = SparseTensor(torch.from_numpy(image_st["mean"]), torch.from_numpy(image_st["coords"]))
    b = prepare_image(image_b, max_side=plan.max_side)
    with manager().running():
        frames = interpolate(model, a, b, steps, mode=mode)
    path = write_video(run_dir(request, "interp") / "interpolation.mp4", frames + frames[::-1], 8)
    n = len(frames)
    gallery = [(f, f"t = {i / (n - 1):.2f}") for i, f in enumerate(frames)]
    return str(path), gallery


@spaces.GPU(duration=60)
@friendly
def variations_handler(
    n: float,
    temperature: float,
    seed: float,
    new_seed: bool,
    image_st: dict | None,
    model_key: str | None = None,
):
    """Samples of the image's posterior; the seed used goes back into the seed box."""
    n = inputs.integer(n, 1, 8, "samples")
    temperature = inputs.number(temperature, 0, 3, "temperature")
    new_seed = inputs.flag(new_seed, "new seed")
    seed = inputs.seed(seed)
    model = _model_of(image_st, model_key, "reconstruction in the image tab")
    _check_decodes(n, image_st, "samples")
    with manager().running():
        frames, used = posterior_variations(
            model, _encoded(image_st), n, temperature, None if new_seed else seed
        )
    rec = image_st["reconstruction"]
    gallery = []
    for i, f in enumerate(frames):
        moved = int(np.abs(f.astype(np.int16) - rec).max())
        gallery.append(
            (
                f,
                f"seed {used + i}: {_db(psnr(f, rec, data_range=255))} from the reconstruction, "
                f"pixels moved by at most {moved}/255",
            )
        )
    return gallery, used


def _db(value: float) -> str:
    return "identical" if not math.isfinite(value) else f"{value:.1f} dB"


def posterior_note(state: dict | None) -> str:
    """How wide this image's posterior is, in numbers, and what that means for the samples."""
    if not state:
        return ""
    std = np.exp(0.5 * state["logvar"])
    spread = float(state["mean"].std(axis=0).mean())
    typical = float(np.median(std))
    ratio = spread / max(typical, 1e-12)
    text = (
        f"This image's posterior: standard deviation {typical:.2g} (median; largest "
        f"{float(std.max()):.2g}), against a spread of {spread:.2g} of the latent means across "
        f"tokens (about 1:{ratio:,.0f}). A sample is mean + temperature x std x noise."
    )
    if ratio > 100:
        text += (
            " At this ratio samples differ from the reconstruction by a grey level or two, even "
            "at temperature 3: the model's posterior is that narrow (it was trained with a small "
            "KL weight, as in the paper), nothing is broken. Each caption says how far a "
            "sample moved."
        )
    if state.get("discrete"):
        text += (
            " With FSQ tokens the sample is quantized before decoding, so most samples land on "
            "the very same codes as the mean."
        )
    return text


@spaces.GPU(duration=60)
@friendly
def edit_handler(
    editor: dict | None,
    source: str,
    other,
    seed: float,
    image_st: dict | None,
    model_key: str | None = None,
    request: gr.Request = None,
):
    """Swap the painted tokens' FSQ codes, decode, compare with the reconstruction."""
    source = inputs.choice(source, [RANDOM_CODES, OTHER_IMAGE], "new codes")
    seed = inputs.seed(seed)
    model = _model_of(image_st, model_key, "reconstruction in the image tab")
    if image_st["indices"] is None:
        raise gr.Error(f"Token editing needs discrete tokens: reconstruct with '{DISCRETE}'.")
    layers = (editor or {}).get("layers") if isinstance(editor, dict) else None
    if not isinstance(layers, list) or len(layers) > 16:
        raise MediaError("the painted mask is missing or malformed: paint it again")
    shape = image_st["original"].shape[:2]
    masks = [_layer_mask(x, shape, request) for x in layers if x is not None]
    if not masks:
        raise gr.Error("Paint over the part of the image whose tokens should change.")
    mask = np.logical_or.reduce(masks)
    src: str | tuple = "random"
    with manager().running():
        if source == OTHER_IMAGE:
            other = _image(other, request, "other image")
            if other is None:
                raise gr.Error("Upload the image whose codes should be pasted in.")
            plan = _plan(other, image_st["max_side"])
            res = reconstruct_image(model, other, max_side=plan.max_side, mode="fsq")
            src = (res.indices, res.latent.coords)
        edited = edit_tokens(model, image_st["indices"], image_st["coords"], mask, src, seed)
    return (image_st["reconstruction"], edited)
