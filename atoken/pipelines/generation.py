"""Generation in the shared latent space: interpolation, posterior variations, FSQ token editing.

These are the library verbs behind the app's generation tab; each works without the app:

    frames = interpolate(model, image_a, image_b, steps=8)          # list of uint8 [H, W, 3]
    frames, seed = posterior_variations(model, image, 4, temperature=1.0)
    edited = edit_tokens(model, result.indices, result.latent.coords, mask, source="random")

All of them work on the posterior *mean* ``[N, L]`` of the encoder (the continuous latent). For
FSQ models (So/D) the arithmetic happens on that pre-quantization mean too and the result is
quantized before decoding, so the decoder only ever sees valid codes.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

from atoken.core.model import ATokenModel, Encoded
from atoken.core.patchify import detokenize, to_model_range, to_uint8, tokenize
from atoken.core.sparse import SparseTensor
from atoken.io.media import MediaError, crop_to_grid, image_array
from atoken.pipelines.reconstruct import TOKEN_FORMAT, ImageResult, model_descriptor

MAX_STEPS = 64
MAX_VARIATIONS = 16
MAX_TEMPERATURE = 10.0
INTERPOLATION_MODES = ("slerp", "lerp")

LatentItem = np.ndarray | Encoded | SparseTensor


# -- helpers -------------------------------------------------------------------------------


def token_grid_size(coords: Tensor) -> tuple[int, int]:
    """(rows, columns) of the token grid of one image's ``coords [N, 5]``."""
    c = coords.cpu()
    return int(c[:, 2].max()) + 1, int(c[:, 3].max()) + 1


def _check_one_image(coords: Tensor, what: str) -> None:
    if coords.dim() != 2 or coords.shape[1] != 5 or coords.shape[0] == 0:
        raise ValueError(f"{what}: need coords [N, 5] of one image, got {tuple(coords.shape)}")
    if int(coords[:, 0].max()) != 0 or int(coords[:, 1].max()) != int(coords[:, 1].min()):
        raise ValueError(f"{what}: the latent holds more than one image or frame")
    h, w = token_grid_size(coords)
    if h * w != coords.shape[0]:
        raise ValueError(f"{what}: the tokens do not fill a {h}x{w} grid ({coords.shape[0]} rows)")


def _grid_order(coords: Tensor) -> Tensor:
    """Row permutation that puts tokens in row-major grid order."""
    _, w = token_grid_size(coords)
    key = coords[:, 2].long() * w + coords[:, 3].long()
    return torch.argsort(key)


def latent_map(feats: Tensor, coords: Tensor) -> Tensor:
    """One image's latents ``[N, L]`` -> a dense map ``[L, h, w]`` (float32)."""
    _check_one_image(coords, "latent_map")
    h, w = token_grid_size(coords)
    out = feats.new_zeros(h, w, feats.shape[1], dtype=torch.float32)
    out[coords[:, 2].long(), coords[:, 3].long()] = feats.float()
    return out.permute(2, 0, 1)


def grid_coords(h: int, w: int, *, t: int = 0) -> Tensor:
    """Row-major ``(0, t, x, y, 0)`` coords ``[h*w, 5]`` int32 of an h x w token grid."""
    x, y = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    c = torch.zeros(h * w, 5, dtype=torch.int32)
    c[:, 1], c[:, 2], c[:, 3] = t, x.reshape(-1), y.reshape(-1)
    return c


def resize_latent_grid(feats: Tensor, coords: Tensor, size: tuple[int, int]) -> SparseTensor:
    """Bilinearly resize one image's latent grid to ``size = (rows, cols)`` tokens."""
    m = latent_map(feats, coords)
    if tuple(m.shape[1:]) != tuple(size):
        m = F.interpolate(m[None], size=size, mode="bilinear", align_corners=False)[0]
    h, w = size
    return SparseTensor(m.permute(1, 2, 0).reshape(h * w, -1), grid_coords(h, w))


def resize_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Lanczos-resize a uint8 image to ``(height, width)``."""
    if image.shape[:2] == tuple(size_hw):
        return image
    pil = Image.fromarray(image).resize((size_hw[1], size_hw[0]), Image.LANCZOS)
    return np.array(pil)


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation of each row of ``a`` and ``b`` ``[N, L]`` at ``t`` in [0, 1].

    Rows at (anti)parallel angles, where slerp is undefined, fall back to linear interpolation.
    """
    a32, b32 = a.float(), b.float()
    ua = F.normalize(a32, dim=-1, eps=1e-12)
    ub = F.normalize(b32, dim=-1, eps=1e-12)
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    linear = sin.abs() < 1e-4
    safe = torch.where(linear, torch.ones_like(sin), sin)
    wa = torch.where(linear, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * omega) / safe)
    wb = torch.where(linear, torch.full_like(sin, t), torch.sin(t * omega) / safe)
    return wa * a32 + wb * b32


def _mix(a: Tensor, b: Tensor, t: float, mode: str) -> Tensor:
    if t == 0.0:
        return a.float()
    if t == 1.0:
        return b.float()
    return slerp(a, b, t) if mode == "slerp" else torch.lerp(a.float(), b.float(), t)


@torch.no_grad()
def _decode_frames(model: ATokenModel, latent: SparseTensor, kind: str) -> np.ndarray:
    """Decode one item's latent -> uint8 ``[T, H, W, 3]``."""
    rec = model.decode(latent.to(model.device))
    frames = detokenize(rec, [kind])[0]  # [T, 3, H, W]
    return to_uint8(frames.permute(0, 2, 3, 1))


def _decoder_input(model: ATokenModel, mean: Tensor, coords: Tensor) -> SparseTensor:
    """Continuous mean -> what the decoder sees (FSQ codes for discrete models)."""
    if model.is_discrete:
        codes, _ = model.quantize(mean.to(model.device))
        return SparseTensor(codes, coords)
    return SparseTensor(mean, coords)


def _prepared_image(image: np.ndarray, what: str) -> np.ndarray:
    img = image_array(image)
    if img.ndim != 3:
        raise MediaError(f"{what}: expected one image [H, W, 3], got shape {img.shape}")
    return crop_to_grid(img)


@torch.no_grad()
def _encode(model: ATokenModel, pixels_u8: np.ndarray) -> Encoded:
    return model.encode(tokenize([to_model_range(pixels_u8)]))


def _image_mean(
    model: ATokenModel, item: LatentItem, size: tuple[int, int] | None, what: str
) -> tuple[Tensor, Tensor]:
    """(mean [h*w, L] in grid order, coords) of an image item, resized to ``size`` tokens."""
    if isinstance(item, np.ndarray):
        img = _prepared_image(item, what)
        if size is not None:
            img = resize_image(img, (size[0] * 16, size[1] * 16))
        enc = _encode(model, img)
        feats, coords = enc.mean, enc.coords
    elif isinstance(item, Encoded):
        feats, coords = item.mean, item.coords
    elif isinstance(item, SparseTensor):
        feats, coords = item.feats, item.coords
    else:
        raise ValueError(
            f"{what}: expected a uint8 image array, an Encoded or a latent SparseTensor, got "
            f"{type(item).__name__}"
        )
    if feats.shape[1] != model.config.latent_channels:
        raise ValueError(
            f"{what}: latent has {feats.shape[1]} channels, the model expects "
            f"{model.config.latent_channels}; use latents made by this model"
        )
    _check_one_image(coords, what)
    grid = token_grid_size(coords)
    lat = resize_latent_grid(feats.cpu(), coords.cpu(), size or grid)
    return lat.feats, lat.coords


def _check_steps(steps: int) -> int:
    if not isinstance(steps, (int, np.integer)) or not 2 <= int(steps) <= MAX_STEPS:
        raise ValueError(f"steps must be an integer in 2..{MAX_STEPS}, got {steps!r}")
    return int(steps)


# -- interpolation -------------------------------------------------------------------------


@torch.no_grad()
def interpolate(
    model: ATokenModel,
    item_a: LatentItem,
    item_b: LatentItem,
    steps: int = 8,
    *,
    mode: str = "slerp",
) -> list[np.ndarray]:
    """Decode ``steps`` points from ``item_a`` to ``item_b`` (both ends included) in latent space.

    Items are uint8 images ``[H, W, 3]`` (cropped to the 16-px grid), ``Encoded`` outputs or
    latent ``SparseTensor`` s of one image (the posterior mean, not FSQ codes). When the token
    grids differ, ``item_b`` is resized to ``item_a`` 's grid: an image is Lanczos-resized to
    ``item_a`` 's pixel size before encoding, a latent is bilinearly resized token-wise. ``mode``
    is ``"slerp"`` (per token) or ``"lerp"``. FSQ models interpolate the pre-quantization mean
    and quantize every step. Returns uint8 ``[H, W, 3]`` frames.

    Two videos (uint8 ``[T, H, W, 3]``) are interpolated on their first temporal chunk
    (``frames_batch_size`` frames, cut to the shorter clip); each step is then a clip
    ``[T, H, W, 3]``.
    """
    steps = _check_steps(steps)
    if mode not in INTERPOLATION_MODES:
        raise ValueError(f"mode must be one of {INTERPOLATION_MODES}, got {mode!r}")
    is_video = [
        isinstance(x, np.ndarray) and x.ndim == 4 and x.shape[0] > 1 for x in (item_a, item_b)
    ]
    if any(is_video):
        if not all(is_video):
            raise ValueError("interpolate takes two images or two videos, not one of each")
        return _interpolate_videos(model, item_a, item_b, steps, mode)
    mean_a, coords = _image_mean(model, item_a, None, "item_a")
    mean_b, _ = _image_mean(model, item_b, token_grid_size(coords), "item_b")
    frames = []
    for i in range(steps):
        z = _mix(mean_a, mean_b, i / (steps - 1), mode)
        frames.append(_decode_frames(model, _decoder_input(model, z, coords), "image")[0])
    return frames


def _interpolate_videos(
    model: ATokenModel, a: np.ndarray, b: np.ndarray, steps: int, mode: str
) -> list[np.ndarray]:
    chunk = model.config.frames_batch_size
    pt = model.patch_t
    n = min(chunk, a.shape[0], b.shape[0])
    n = max(pt, n // pt * pt)
    a = crop_to_grid(np.stack([image_array(f) for f in a[:n]]))
    b = np.stack([resize_image(image_array(f), a.shape[1:3]) for f in b[:n]])
    enc_a = model.encode(tokenize([to_model_range(a)]))
    enc_b = model.encode(tokenize([to_model_range(b)]))
    assert torch.equal(enc_a.coords, enc_b.coords), "same size clips tokenize alike"
    clips = []
    for i in range(steps):
        z = _mix(enc_a.mean, enc_b.mean, i / (steps - 1), mode)
        clip = _decode_frames(model, _decoder_input(model, z, enc_a.coords), "video")
        clips.append(clip[: min(a.shape[0], clip.shape[0])])
    return clips


# -- posterior sampling --------------------------------------------------------------------


def new_seed() -> int:
    """A fresh random seed in [0, 2^31)."""
    return secrets.randbelow(2**31 - 1)


@torch.no_grad()
def posterior_variations(
    model: ATokenModel,
    image: np.ndarray | Encoded,
    n: int = 4,
    temperature: float = 1.0,
    seed: int | None = None,
) -> tuple[list[np.ndarray], int]:
    """Decode ``n`` samples ``mean + temperature * std * eps`` of one image's posterior.

    Sample ``i`` uses seed ``seed + i``; with ``seed=None`` a random seed is drawn, and the seed
    used is returned so a result can be reproduced. ``temperature=0`` gives the mean. FSQ models
    sample the continuous posterior and quantize the sample (their decoder only sees codes).
    Returns (uint8 ``[H, W, 3]`` frames, seed).
    """
    if not isinstance(n, (int, np.integer)) or not 1 <= int(n) <= MAX_VARIATIONS:
        raise ValueError(f"n must be an integer in 1..{MAX_VARIATIONS}, got {n!r}")
    if not 0.0 <= float(temperature) <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE}], got {temperature}")
    seed = new_seed() if seed is None else int(seed)
    if not 0 <= seed < 2**63 - int(n):
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if isinstance(image, np.ndarray):
        enc = _encode(model, _prepared_image(image, "image"))
    elif isinstance(image, Encoded):
        enc = image
        _check_one_image(enc.coords, "image")
    else:
        raise ValueError(f"expected a uint8 image or an Encoded, got {type(image).__name__}")
    frames = []
    for i in range(int(n)):
        z = enc.latent(sample=True, seed=seed + i, temperature=float(temperature))
        frames.append(_decode_frames(model, _decoder_input(model, z.feats, z.coords), "image")[0])
    return frames, seed


# -- FSQ token editing ---------------------------------------------------------------------


def mask_to_tokens(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A painted mask of any size -> token mask ``[h, w]`` bool: a token is selected when the
    brush touched any pixel of its cell (the mask is stretched over the grid)."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.any(axis=2)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"mask must be a 2D array (or [H, W, C]), got shape {m.shape}")
    m = m.astype(bool)
    if m.shape == tuple(size):
        return m
    pil = Image.fromarray(m.astype(np.uint8) * 255).resize((size[1], size[0]), Image.BOX)
    return np.asarray(pil) > 0


def resize_index_grid(indices: Tensor, coords: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of one image's FSQ index grid ``[N, G]`` -> ``[h*w, G]``."""
    _check_one_image(coords, "resize_index_grid")
    h0, w0 = token_grid_size(coords)
    grid = indices.new_zeros(h0, w0, indices.shape[1])
    grid[coords[:, 2].long(), coords[:, 3].long()] = indices
    h, w = size
    rows = (torch.arange(h) * h0 // h).long()
    cols = (torch.arange(w) * w0 // w).long()
    return grid[rows][:, cols].reshape(h * w, -1)


@torch.no_grad()
def edit_tokens(
    model: ATokenModel,
    indices: Tensor | np.ndarray,
    coords: Tensor | np.ndarray,
    mask: np.ndarray,
    source: str | tuple[Tensor | np.ndarray, Tensor | np.ndarray] = "random",
    seed: int | None = None,
) -> np.ndarray:
    """Replace the FSQ codes of the painted tokens and decode: a uint8 ``[H, W, 3]`` image.

    ``indices [N, G]`` and ``coords [N, 5]`` are one image's FSQ indices and coordinates; ``mask``
    is bool ``[h, w]`` on the token grid or a painted mask of any size (see `mask_to_tokens`).
    ``source`` is ``"random"`` (uniform codes, seeded) or ``(indices_other, coords_other)`` of
    another image, whose index grid is resized (nearest) to this one's before copying.
    """
    if not model.is_discrete:
        raise ValueError(
            f"token editing needs a discrete (FSQ) model such as so-d or atoken-tiny-d; "
            f"{model.config.name or 'this model'} is continuous"
        )
    idx = torch.as_tensor(np.asarray(indices) if isinstance(indices, np.ndarray) else indices)
    crd = torch.as_tensor(np.asarray(coords) if isinstance(coords, np.ndarray) else coords)
    _check_one_image(crd, "edit_tokens")
    groups = model.config.quantizer_num_codebooks
    if idx.dim() != 2 or idx.shape != (crd.shape[0], groups):
        raise ValueError(
            f"indices must be [N, {groups}] matching coords [N, 5]; got {tuple(idx.shape)} "
            f"and {tuple(crd.shape)}"
        )
    order = _grid_order(crd)
    idx, crd = idx[order].long(), crd[order]
    h, w = token_grid_size(crd)
    sel = torch.from_numpy(mask_to_tokens(mask, (h, w)).reshape(-1))
    if not bool(sel.any()):
        raise ValueError("the mask covers no token: paint over the part of the image to change")
    if isinstance(source, str):
        if source != "random":
            raise ValueError(f"source must be 'random' or (indices, coords), got {source!r}")
        gen = torch.Generator().manual_seed(new_seed() if seed is None else int(seed))
        size = model.config.codebook_size
        new = torch.randint(0, size, (int(sel.sum()), groups), generator=gen)
    else:
        if not (isinstance(source, tuple) and len(source) == 2):
            raise ValueError("source must be 'random' or a pair (indices_other, coords_other)")
        o_idx = torch.as_tensor(np.asarray(source[0])).long()
        o_crd = torch.as_tensor(np.asarray(source[1]))
        if o_idx.dim() != 2 or o_idx.shape[1] != groups or o_idx.shape[0] != o_crd.shape[0]:
            raise ValueError(
                f"the other image's indices must be [M, {groups}] with coords [M, 5], got "
                f"{tuple(o_idx.shape)} and {tuple(o_crd.shape)}"
            )
        new = resize_index_grid(o_idx, o_crd, (h, w))[sel]
    edited = idx.clone()
    edited[sel] = new
    codes = model.dequantize(edited.to(model.device))
    return _decode_frames(model, SparseTensor(codes, crd), "image")[0]


# -- token files from results --------------------------------------------------------------


def save_image_tokens(model: ATokenModel, result: ImageResult, out: str | Path) -> Path:
    """Write an :class:`ImageResult` 's tokens as a token file ``decode_file`` reads.

    Same layout as ``pipeline.encode_file``: ``latent``, ``coords``, ``pooled`` and, for FSQ,
    ``indices``, with format/kind/model/size metadata.
    """
    meta = {
        "format": TOKEN_FORMAT,
        "kind": "image",
        "model": json.dumps(model_descriptor(model)),
        "height": str(result.original.shape[0]),
        "width": str(result.original.shape[1]),
        "frames": "1",
        "latent_mode": result.mode,
    }
    tensors = {
        "latent": result.latent.feats.float().cpu().contiguous(),
        "coords": result.latent.coords.to(torch.int32).cpu().contiguous(),
        "pooled": result.encoded.pooled.float().cpu().contiguous(),
    }
    if result.indices is not None:
        tensors["indices"] = result.indices.to(torch.int32).cpu().contiguous()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)
    return out
