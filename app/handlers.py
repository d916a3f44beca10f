"""Event handlers: UI values in, one ``atoken`` call, UI values out.

Handlers are plain module-level functions (so ZeroGPU's ``@spaces.GPU`` can wrap them) that use
the :class:`~app.models.ModelManager` given to :func:`configure`. Results kept between steps
live in ``gr.State`` as dicts of CPU numpy arrays (see :func:`image_state`), tagged with the
model that made them.
"""

from __future__ import annotations

import base64
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
import spaces
import torch

from app.models import DTYPES, ModelManager, download_official, entries
from app.session import ROOT, friendly, run_dir
from atoken.download import OFFICIAL_WEIGHTS, cached_path
from atoken.generation import edit_tokens, interpolate, posterior_variations, save_image_tokens
from atoken.media import (
    MediaError,
    kind_of,
    prepare_image,
    probe_video,
    read_image,
    write_image,
    write_video,
)
from atoken.mesh import load_mesh, mesh_to_glb
from atoken.metrics import error_heatmap
from atoken.model import ATokenModel, Encoded
from atoken.patchify import to_model_range
from atoken.pipeline import VideoLimits, check_video, reconstruct_image, reconstruct_video
from atoken.sparse import SparseTensor
from atoken.visualize import (
    channel_maps,
    code_usage_figure,
    fit_pca,
    pca_image,
    pca_scatter_figure,
    pooled_figure,
    psnr_figure,
    value_histogram_figure,
)
from atoken.zeroshot import (
    classify,
    classify_features,
    classify_file,
    model_logit_params,
    parse_labels,
    probability_figure,
    resolve_text_tower,
)

CONTINUOUS, DISCRETE = "continuous (KL)", "discrete (FSQ)"
FROM_IMAGE, FROM_VIDEO, FROM_3D, NEW_UPLOAD = "image tab", "video tab", "3D tab", "new upload"
RANDOM_CODES, OTHER_IMAGE = "random codes", "another image's codes"
LABEL_PRESETS = {
    "everyday things": "cat, dog, astronaut, cup of coffee, rocket, car, tree, person, flower, house",
    "shapes and colours": "red circle, blue square, green triangle, yellow star, purple ring, "
    "orange stripes, black and white checkerboard",
    "3D objects": "duck, teapot, panda, torus, toy blocks, chair, airplane, ball",
    "motion": "moving left, moving right, zooming in, zooming out, rotating, standing still",
}


@dataclass
class Limits:
    """Upload limits checked before any model work."""

    image_bytes: int = 50 * 2**20
    video_bytes: int = 200 * 2**20
    mesh_bytes: int = 100 * 2**20
    video: VideoLimits = field(
        default_factory=lambda: VideoLimits(max_frames=256, max_side=1920, max_duration=120.0)
    )
    max_side: int = 1024  # largest max-side the image and video tabs accept


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


def _model_of(state: dict | None, what: str) -> ATokenModel:
    """The model that made a state, refusing states of a model that is no longer running."""
    if not state:
        raise gr.Error(f"Nothing to use yet: run the {what} first.")
    model, _, _ = manager().model_for(state["discrete"])
    if state["tag"] != manager().tag(state["discrete"]):
        raise gr.Error(
            f"The model changed since this {state['kind']} was processed; run the {what} again."
        )
    return model


def _finite(d: dict) -> dict:
    """Round floats for display; infinities (identical images) become strings."""
    out = {}
    for k, v in d.items():
        if isinstance(v, float):
            v = round(v, 4) if math.isfinite(v) else str(v)
        out[k] = v
    return out


def upload_path(value) -> str | None:
    """A file path from an upload: a path, or the raw FileData dict of a ``preprocess=False``
    event (data URLs from paste/webcam are written to a file)."""
    if value is None or isinstance(value, (str, Path)):
        return None if value is None else str(value)
    if isinstance(value, dict):
        if value.get("path"):
            return str(value["path"])
        url = value.get("url") or ""
        if url.startswith("data:") and "," in url:
            ROOT.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=ROOT, suffix=".png", delete=False) as f:
                f.write(base64.b64decode(url.split(",", 1)[1]))
            return f.name
    raise MediaError(f"could not read the upload ({type(value).__name__})")


def _layer_mask(layer) -> np.ndarray:
    """Painted pixels of one ImageEditor layer (an RGBA array or its raw file)."""
    from PIL import Image

    if isinstance(layer, dict):
        with Image.open(upload_path(layer)) as im:
            layer = np.asarray(im.convert("RGBA"))
    layer = np.asarray(layer)
    if layer.ndim == 3 and layer.shape[2] == 4:
        return layer[..., 3] > 0
    return layer.reshape(*layer.shape[:2], -1).any(-1)


def _check_size(path: str, limit: int, what: str) -> None:
    size = Path(path).stat().st_size
    if size > limit:
        raise MediaError(
            f"the {what} file is {size / 2**20:.1f} MB; the limit is {limit / 2**20:.0f} MB"
        )


def _ok(n: int) -> list:
    return [gr.validate(True, "")] * n


def _first_invalid(message: str, n: int) -> list:
    return [gr.validate(False, message), *_ok(n - 1)]


# -- model panel ------------------------------------------------------------------------------


def model_choices() -> list[tuple[str, str]]:
    """(label, key) pairs for the model dropdown."""
    m = manager()
    return [(e.label, e.key) for e in entries(m.custom_path)]


@friendly
def model_info(key: str) -> tuple[str, dict]:
    """Where a model loads from, its licence, and whether the download button applies."""
    entry = {e.key: e for e in entries(manager().custom_path)}.get(key)
    if entry is None:
        raise gr.Error(f"unknown model {key!r}")
    text = f"`{key}`: {entry.note}"
    if entry.source == "official":
        text += f"\n\nLicence: {OFFICIAL_WEIGHTS[key].licence}"
    can_download = entry.source == "official" and cached_path(key) is None
    return text, gr.update(interactive=can_download)


@friendly
def load_model(key: str, path: str, config: str, device: str, dtype: str) -> tuple[str, dict]:
    """Switch the running model (a typed path wins over the dropdown)."""
    if dtype not in DTYPES:
        raise gr.Error(f"dtype must be one of {DTYPES}")
    status = manager().load(
        key, device=device, dtype=dtype, path=path.strip() or None, config=config.strip() or None
    )
    return status, gr.update(choices=model_choices(), value=manager().key)


@friendly
def download_model(key: str, progress=gr.Progress()) -> str:  # noqa: B008
    """Download official weights with a progress bar."""

    def callback(done: int, total: int | None) -> None:
        mb = done / 2**20
        if total:
            progress(done / total, desc=f"{mb:.0f} / {total / 2**20:.0f} MB")
        else:
            progress(None, desc=f"{mb:.0f} MB")

    path = download_official(key, callback)
    return f"Downloaded `{key}` to `{path}`. Press **Load** to use it."


def warm_up(progress=gr.Progress()) -> str:  # noqa: B008
    """Compile the attention (button in the model panel)."""
    manager().warm_up(lambda d, t, msg: progress((d, t), desc=msg))
    return manager().status()


def status() -> str:
    """The 'which model is running' line."""
    return manager().status()


# -- image tab ------------------------------------------------------------------------------


def validate_image(image, max_side, *rest) -> list:
    """Refuse unreadable or oversized images before the model runs."""
    n = 2 + len(rest)
    if image is None:
        return _first_invalid("Upload, paste or take a picture first.", n)
    try:
        image = upload_path(image)
        _check_size(image, LIMITS.image_bytes, "image")
        read_image(image)
    except MediaError as e:
        return _first_invalid(str(e), n)
    if max_side and not 16 <= int(max_side) <= LIMITS.max_side:
        return [*_ok(1), gr.validate(False, f"max side must be 16..{LIMITS.max_side}"), *_ok(n - 2)]
    return _ok(n)


@friendly
def preview_image(image: str | None, max_side: float) -> tuple[np.ndarray | None, str]:
    """What the model will see: the upload downscaled and cropped to the 16-px grid."""
    image = upload_path(image)
    if image is None:
        return None, ""
    _check_size(image, LIMITS.image_bytes, "image")
    img = prepare_image(image, max_side=int(max_side) or None)
    h, w = img.shape[:2]
    return img, f"Model input: {w}x{h} px = {h // 16}x{w // 16} = {h * w // 256} tokens"


@spaces.GPU(duration=60)
@friendly
def reconstruct_image_handler(
    image: str | None,
    max_side: float,
    tokens: str,
    latent_mode: str,
    seed: float,
    temperature: float,
    request: gr.Request = None,
):
    """Encode and decode an image: slider pair, error heatmap, metrics, files, state."""
    image = upload_path(image)
    if image is None:
        raise gr.Error("Upload, paste or take a picture first.")
    _check_size(image, LIMITS.image_bytes, "image")
    discrete = tokens == DISCRETE
    model, mode, name = manager().model_for(discrete)
    if not discrete and latent_mode == "sample":
        mode = "sample"
    side = int(max_side or 0) or None
    with manager().running():
        res = reconstruct_image(
            model,
            image,
            max_side=side,
            mode=mode,
            seed=int(seed or 0),
            temperature=float(1.0 if temperature is None else temperature),
        )
    out = run_dir(request, "image")
    files = [
        write_image(out / "reconstruction.png", res.reconstruction),
        write_image(out / "original.png", res.original),
        save_image_tokens(model, res, out / "tokens.safetensors"),
    ]
    metrics = {
        **res.metrics(),
        "grid": list(res.grid),
        "latent_shape": list(res.latent.feats.shape),
        "mode": res.mode,
        "model": name,
    }
    heat = error_heatmap(res.original, res.reconstruction, data_range=255)
    state = image_state(res, model, manager().tag(discrete), side)
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
    usage = None
    if state["indices"] is not None:
        usage = code_usage_figure(torch.from_numpy(state["indices"]), state["codebook_size"])
    ex = ", ".join(f"{float(e):.0%}" for e in basis.explained)
    return (
        pca_image(lat, coords, basis)[0],
        channel_maps(lat, coords, upscale=4),
        value_histogram_figure(lat),
        gr.update(value=usage, visible=usage is not None),
        pooled_figure(torch.from_numpy(state["pooled"])),
        pca_scatter_figure(lat, basis),
        f"PCA components explain {ex} of the latent variance.",
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
    )


# -- video tab ------------------------------------------------------------------------------


def validate_video(video, stride, max_side, max_frames, *rest) -> list:
    """Refuse unreadable videos and videos beyond the limits before the model runs."""
    n = 4 + len(rest)
    if video is None:
        return _first_invalid("Upload a video first.", n)
    try:
        _check_size(video, LIMITS.video_bytes, "video")
        check_video(
            video,
            LIMITS.video,
            stride=max(1, int(stride or 1)),
            max_side=int(max_side or 0) or None,
            max_frames=int(max_frames or 0) or None,
        )
    except MediaError as e:
        return _first_invalid(str(e), n)
    return _ok(n)


def _video_seconds(video, stride, max_side, max_frames, *args, **kwargs) -> int:
    """ZeroGPU time budget: grows with the number of frames."""
    return int(min(600, 30 + 2 * (max_frames or LIMITS.video.max_frames)))


@spaces.GPU(duration=_video_seconds)
@friendly
def reconstruct_video_handler(
    video: str | None,
    stride: float,
    max_side: float,
    max_frames: float,
    tokens: str,
    request: gr.Request = None,
    progress=gr.Progress(),  # noqa: B008
):
    """Stream a video through the model: side-by-side mp4, PSNR plot, latent PCA video, files."""
    if video is None:
        raise gr.Error("Upload a video first.")
    _check_size(video, LIMITS.video_bytes, "video")
    discrete = tokens == DISCRETE
    model, mode, name = manager().model_for(discrete)
    out = run_dir(request, "video")
    progress((0, 1), desc="reading the video")
    with manager().running():
        res = reconstruct_video(
            model,
            video,
            out,
            stride=int(stride),
            max_side=int(max_side) or None,
            max_frames=int(max_frames) or None,
            mode=mode,
            limits=LIMITS.video,
            progress=lambda done, total, msg: progress((done, total), desc=msg, unit="frames"),
        )
    metrics = {
        "psnr_mean": res.mean_psnr,
        "frames": res.num_frames,
        "fps": res.fps,
        "size": list(res.size),
        "tokens": res.num_tokens,
        "mode": mode,
        "model": name,
    }
    state = {
        "kind": "video",
        "tag": manager().tag(discrete),
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


# -- 3D tab ---------------------------------------------------------------------------------


def validate_mesh(mesh, *rest) -> list:
    """Refuse unreadable meshes before the model runs."""
    n = 1 + len(rest)
    if mesh is None:
        return _first_invalid("Upload a mesh first.", n)
    try:
        _check_size(mesh, LIMITS.mesh_bytes, "mesh")
        load_mesh(mesh)
    except ValueError as e:  # MeshError and MediaError
        return _first_invalid(str(e), n)
    return _ok(n)


@friendly
def preview_mesh(mesh: str | None, request: gr.Request = None) -> str | None:
    """The uploaded mesh, normalised and as .glb, for the input viewer."""
    if mesh is None:
        return None
    _check_size(mesh, LIMITS.mesh_bytes, "mesh")
    return str(mesh_to_glb(load_mesh(mesh), run_dir(request, "mesh") / "input.glb"))


def _mesh_seconds(mesh, num_views, resolution, turntable_frames, *args, **kwargs) -> int:
    return int(min(300, 60 + 2 * int(num_views or 32) + 2 * int(turntable_frames or 0)))


@spaces.GPU(duration=_mesh_seconds)
@friendly
def reconstruct_3d_handler(
    mesh: str | None,
    num_views: float,
    resolution: float,
    turntable_frames: float,
    request: gr.Request = None,
    progress=gr.Progress(),  # noqa: B008
):
    """Mesh -> voxels -> tokens -> Gaussians: input and .ply viewers, turntable, metrics."""
    from atoken import pipeline3d

    if mesh is None:
        raise gr.Error("Upload a mesh first.")
    _check_size(mesh, LIMITS.mesh_bytes, "mesh")
    m = manager()
    model, discrete = m.model, m.model.is_discrete
    gs, gs_name = m.gaussian_decoder()
    out = run_dir(request, "3d")
    frames = int(turntable_frames)
    with m.running():
        res = pipeline3d.reconstruct_asset(
            model,
            gs,
            mesh,
            out / "reconstruction.ply",
            num_views=int(num_views),
            resolution=int(resolution),
            turntable=out / "turntable.mp4" if frames else None,
            turntable_frames=max(frames, 1),
            progress=lambda done, total, msg: progress((done, total), desc=msg),
        )
    metrics = {
        **res.metrics,
        "voxels": res.num_voxels,
        "gaussians": res.num_gaussians,
        "model": m.key,
        "gaussian_decoder": gs_name,
    }
    state = {
        "kind": "3d",
        "tag": m.tag(discrete),
        "discrete": discrete,
        "pooled": res.pooled.float().cpu().numpy(),
    }
    turntable = str(res.turntable) if res.turntable else None
    files = [str(p) for p in (res.ply, res.input_glb, res.turntable) if p]
    return str(res.input_glb), str(res.ply), turntable, _finite(metrics), files, state


# -- zero-shot tab --------------------------------------------------------------------------


def validate_upload(source, upload, *rest) -> list:
    """Check a zero-shot upload by kind before the model runs."""
    n = 2 + len(rest)
    if source != NEW_UPLOAD or upload is None:
        return _ok(n)
    try:
        kind = kind_of(upload)
        if kind == "image":
            _check_size(upload, LIMITS.image_bytes, "image")
            read_image(upload)
        elif kind == "video":
            _check_size(upload, LIMITS.video_bytes, "video")
            probe_video(upload)
        else:
            _check_size(upload, LIMITS.mesh_bytes, "mesh")
            load_mesh(upload)
    except ValueError as e:
        return [gr.validate(True, ""), gr.validate(False, str(e)), *_ok(n - 2)]
    return _ok(n)


@spaces.GPU(duration=60)
@friendly
def classify_handler(
    source: str,
    upload: str | None,
    labels: str,
    kind: str,
    image_st: dict | None,
    video_st: dict | None,
    asset_st: dict | None,
):
    """Zero-shot probabilities of typed labels for a tab's result or a new upload."""
    names = parse_labels(labels)
    if source == NEW_UPLOAD:
        if upload is None:
            raise gr.Error("Upload an image, a video or a mesh to classify.")
        model = manager().model
        with manager().running():
            if kind_of(upload) == "image":
                item = to_model_range(prepare_image(upload, max_side=512)).numpy()
                probs = classify(model, item, names, kind=kind)
            else:
                probs = classify_file(model, upload, names, kind=kind)
    else:
        state = {FROM_IMAGE: image_st, FROM_VIDEO: video_st, FROM_3D: asset_st}[source]
        model = _model_of(state, f"reconstruction in the {source}")
        tower = resolve_text_tower(model)
        scale, bias = model_logit_params(model)
        modality = {"image": "image", "video": "video", "3d": "3d"}[state["kind"]]
        probs = classify_features(
            torch.from_numpy(state["pooled"]), names, tower, scale, bias, modality, kind=kind
        )
    return probability_figure(probs), probs


def fill_labels(preset: str) -> str:
    """Label text of a preset."""
    return LABEL_PRESETS.get(preset, "")


# -- generation tab -------------------------------------------------------------------------


def validate_second_image(image_b, *rest) -> list:
    """Refuse an unreadable image B before the model runs."""
    n = 1 + len(rest)
    if image_b is None:
        return _first_invalid("Upload the second image (B) to interpolate towards.", n)
    return validate_image(image_b, 0)[:1] + _ok(n - 1)


@spaces.GPU(duration=90)
@friendly
def interpolate_handler(
    image_b: str | None,
    steps: float,
    mode: str,
    image_st: dict | None,
    request: gr.Request = None,
):
    """Decode the path from the image tab's latent to another image's: an mp4 and a gallery."""
    model = _model_of(image_st, "reconstruction in the image tab")
    image_b = upload_path(image_b)
    if image_b is None:
        raise gr.Error("Upload the second image (B) to interpolate towards.")
    _check_size(image_b, LIMITS.image_bytes, "image")
    a = SparseTensor(torch.from_numpy(image_st["mean"]), torch.from_numpy(image_st["coords"]))
    b = prepare_image(image_b, max_side=image_st["max_side"])
    with manager().running():
        frames = interpolate(model, a, b, int(steps), mode=mode)
    path = write_video(run_dir(request, "interp") / "interpolation.mp4", frames + frames[::-1], 8)
    n = len(frames)
    gallery = [(f, f"t = {i / (n - 1):.2f}") for i, f in enumerate(frames)]
    return str(path), gallery


@spaces.GPU(duration=60)
@friendly
def variations_handler(
    n: float, temperature: float, seed: float, new_seed: bool, image_st: dict | None
):
    """Samples of the image's posterior; the seed used goes back into the seed box."""
    model = _model_of(image_st, "reconstruction in the image tab")
    with manager().running():
        frames, used = posterior_variations(
            model, _encoded(image_st), int(n), float(temperature), None if new_seed else int(seed)
        )
    gallery = [(f, f"seed {used + i}") for i, f in enumerate(frames)]
    return gallery, used


@spaces.GPU(duration=60)
@friendly
def edit_handler(
    editor: dict | None, source: str, other: str | None, seed: float, image_st: dict | None
):
    """Swap the painted tokens' FSQ codes, decode, compare with the reconstruction."""
    model = _model_of(image_st, "reconstruction in the image tab")
    if image_st["indices"] is None:
        raise gr.Error(f"Token editing needs discrete tokens: reconstruct with '{DISCRETE}'.")
    layers = [_layer_mask(x) for x in (editor or {}).get("layers") or [] if x is not None]
    if not layers:
        raise gr.Error("Paint over the part of the image whose tokens should change.")
    mask = np.logical_or.reduce(layers)
    other = upload_path(other)
    src: str | tuple = "random"
    with manager().running():
        if source == OTHER_IMAGE:
            if other is None:
                raise gr.Error("Upload the image whose codes should be pasted in.")
            res = reconstruct_image(model, other, max_side=image_st["max_side"], mode="fsq")
            src = (res.indices, res.latent.coords)
        edited = edit_tokens(model, image_st["indices"], image_st["coords"], mask, src, int(seed))
    return (image_st["reconstruction"], edited)
