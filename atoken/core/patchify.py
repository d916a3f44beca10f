"""Images / videos / 3D voxels <-> sparse patch tokens in the official layout (§1.2-1.4)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from atoken.core.sparse import SparseTensor

PATCH = (4, 16, 16)  # (frames, rows, cols)
TOKEN_CHANNELS = 4 * 16 * 16 * 3
VOXEL_CHANNELS = 16 * 16 * 3  # one frame slot of a token: a 16x16 RGB patch


def _as_tensor(item) -> Tensor:
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(np.ascontiguousarray(item))
    if not isinstance(item, Tensor):
        raise ValueError(f"expected a numpy array or torch tensor, got {type(item).__name__}")
    if not item.is_floating_point():
        raise ValueError(
            f"expected float pixels in [-1, 1], got dtype {item.dtype} (convert uint8 with "
            "atoken.to_model_range)"
        )
    return item


def to_model_range(pixels_u8) -> Tensor:
    """uint8 pixels (any shape) -> float32 in [-1, 1], as the official README does."""
    t = torch.from_numpy(np.array(pixels_u8, dtype=np.uint8))  # a writable copy
    return t.float() / 255.0 * 2.0 - 1.0


def to_uint8(frames: Tensor) -> np.ndarray:
    """[-1, 1] floats -> uint8, clamped and rounded to the nearest grey level.

    The one conversion used everywhere (app, command line, training evaluation, metrics). The
    official test script truncates instead, which darkens every pixel by half a level on
    average; the model's outputs are the same, only this last step differs.
    """
    return ((frames.float() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8).cpu().numpy()


def as_video(item) -> Tensor:
    """Image ``[H,W,3]`` or video ``[T,H,W,3]`` (or channel-first) -> float ``[T,H,W,3]``."""
    x = _as_tensor(item)
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise ValueError(f"expected an image [H,W,3] or a video [T,H,W,3], got {tuple(x.shape)}")
    if x.shape[-1] != 3:
        if x.shape[1] != 3:
            raise ValueError(
                f"expected 3 colour channels (last or second axis), got {tuple(x.shape)}"
            )
        x = x.permute(0, 2, 3, 1)  # channel-first -> channel-last
    return x


def crop_box(height: int, width: int, patch: int = 16) -> tuple[int, int, int, int]:
    """Official centre crop to a multiple of ``patch``: (top, left, new_h, new_w).

    The one centre crop: tokenization, the app's and the command line's inputs
    (`atoken.io.media.crop_to_grid`) and the PCA baselines all cut the same pixels.
    """
    h, w = height // patch * patch, width // patch * patch
    if h == 0 or w == 0:
        raise ValueError(f"image {width}x{height} is smaller than one {patch}x{patch} patch")
    return (height - h) // 2, (width - w) // 2, h, w


def prepare_clip(item, patch: tuple[int, int, int] = PATCH) -> Tensor:
    """Pad short clips with zero frames to ``patch_t``, truncate to a multiple, centre-crop."""
    x = as_video(item)
    pt, ph, pw = patch
    t = x.shape[0]
    if t < pt:
        x = torch.cat([x, x.new_zeros((pt - t, *x.shape[1:]))])
    x = x[: x.shape[0] // pt * pt]
    top, left, h, w = crop_box(x.shape[1], x.shape[2], ph)
    if (h, w) != (x.shape[1], x.shape[2]):
        assert ph == pw, "non-square spatial patches are not used by any release"
    return x[:, top : top + h, left : left + w]


def patchify(clip: Tensor, patch: tuple[int, int, int] = PATCH) -> tuple[Tensor, Tensor]:
    """A prepared clip ``[T,H,W,3]`` -> feats ``[N, pt*ph*pw*3]`` and ``(t, x, y)`` ``[N, 3]``.

    Features are ordered (pt, ph, pw, c) with c fastest; tokens row-major over (t, row, col).
    """
    pt, ph, pw = patch
    t, h, w, c = clip.shape
    nt, nh, nw = t // pt, h // ph, w // pw
    x = clip.reshape(nt, pt, nh, ph, nw, pw, c).permute(0, 2, 4, 1, 3, 5, 6)
    feats = x.reshape(nt * nh * nw, pt * ph * pw * c)
    grid = torch.stack(
        torch.meshgrid(torch.arange(nt), torch.arange(nh), torch.arange(nw), indexing="ij"), -1
    ).reshape(-1, 3)
    return feats, grid.to(torch.int32)


def tokenize(items: Sequence, patch: tuple[int, int, int] = PATCH) -> SparseTensor:
    """Images ``[H,W,3]`` / videos ``[T,H,W,3]`` in [-1, 1] -> one batched SparseTensor.

    Coordinates are ``(b, t, x, y, z)`` int32 with x = patch row, y = patch column, z = 0,
    exactly as the official ``image_video_to_sparse_tensor``.
    """
    if isinstance(items, (np.ndarray, Tensor)):
        raise ValueError("tokenize takes a list of items; wrap a single image as [image]")
    if len(items) == 0:
        raise ValueError("tokenize got an empty list")
    feats, coords = [], []
    for b, item in enumerate(items):
        f, grid = patchify(prepare_clip(item, patch), patch)
        c = torch.zeros(grid.shape[0], 5, dtype=torch.int32)
        c[:, 0] = b
        c[:, 1:4] = grid
        feats.append(f.float())
        coords.append(c)
    return SparseTensor(torch.cat(feats), torch.cat(coords))


def unpatchify(feats: Tensor, coords: Tensor, patch: tuple[int, int, int] = PATCH) -> Tensor:
    """Tokens of one item -> frames ``[T, 3, H, W]`` (channel-first), scattered by coordinates.

    ``coords``: ``[N, >=3]`` whose last three used columns are (t, x, y) in columns 1..3 of the
    official 5-column form. Missing tokens stay 0 (mid-grey). The temporal patch follows from the
    channel count as officially (3072 -> 4 frames, 768 -> 1 frame).
    """
    _, ph, pw = patch
    c = feats.shape[1]
    pt = c // (ph * pw * 3)
    if pt * ph * pw * 3 != c:
        raise ValueError(f"token width {c} is not a multiple of {ph}x{pw}x3")
    t, x, y = (coords[:, i].long() for i in (1, 2, 3))
    t = t - t.min()  # 3D-style inputs start at t = 1
    nt, nh, nw = int(t.max()) + 1, int(x.max()) + 1, int(y.max()) + 1
    grid = feats.new_zeros(nt, nh, nw, pt, ph, pw, 3)
    grid[t, x, y] = feats.reshape(-1, pt, ph, pw, 3)
    video = grid.permute(0, 3, 6, 1, 4, 2, 5).reshape(nt * pt, 3, nh * ph, nw * pw)
    return video


def detokenize(rec: SparseTensor, kinds: Sequence[str] | str) -> list[Tensor]:
    """Decoder output -> one ``[T, 3, H, W]`` tensor per item (images keep frame 0 only)."""
    out = []
    slices = rec.item_slices()
    if isinstance(kinds, str):
        kinds = [kinds] * len(slices)
    if len(kinds) != len(slices):
        raise ValueError(f"{len(kinds)} kinds given for {len(slices)} batch items")
    for sl, kind in zip(slices, kinds):
        if kind not in ("image", "video"):
            raise ValueError(
                f"kind must be 'image' or 'video', got {kind!r} (3D: use the GS decoder)"
            )
        frames = unpatchify(rec.feats[sl], rec.coords[sl])
        out.append(frames[:1] if kind == "image" else frames)
    return out


def tokenize_3d(feats768, coords_xyz, *, batch: int = 0) -> SparseTensor:
    """One 3D asset (voxel features in [0, 1], ``[N, 768]``, and ``[N, 3]`` ids) -> tokens.

    As the official ``inference_3d``: features mapped to [-1, 1] (NaN -> 0) and zero-padded to
    3072 channels (the slot of frame 0), coordinates ``(b, 1, x, y, z)``.
    """
    f = torch.as_tensor(np.asarray(feats768) if not isinstance(feats768, Tensor) else feats768)
    c = torch.as_tensor(
        np.asarray(coords_xyz) if not isinstance(coords_xyz, Tensor) else coords_xyz
    )
    if f.dim() != 2 or f.shape[1] != VOXEL_CHANNELS:
        raise ValueError(f"3D features must be [N, {VOXEL_CHANNELS}], got {tuple(f.shape)}")
    if c.dim() != 2 or c.shape[1] != 3 or c.shape[0] != f.shape[0]:
        raise ValueError(f"3D coords must be [N, 3] matching the features, got {tuple(c.shape)}")
    if f.shape[0] == 0:
        raise ValueError("the 3D asset has no occupied voxels")
    if int(c.min()) < 0 or int(c.max()) > 4095:
        raise ValueError("voxel coordinates must lie in [0, 4095]")
    f = torch.nan_to_num(f.float() * 2.0 - 1.0, nan=0.0)
    feats = torch.cat([f, f.new_zeros(f.shape[0], TOKEN_CHANNELS - VOXEL_CHANNELS)], 1)
    coords = torch.zeros(f.shape[0], 5, dtype=torch.int32)
    coords[:, 0] = batch
    coords[:, 1] = 1
    coords[:, 2:] = c.to(torch.int32)
    return SparseTensor(feats, coords)


def gs_input(rec: SparseTensor) -> SparseTensor:
    """Reconstructed 3D tokens -> the Gaussian decoder's input: first 768 channels, (b, x, y, z)."""
    coords = rec.coords[:, [0, 2, 3, 4]].contiguous()
    return SparseTensor(rec.feats[:, :VOXEL_CHANNELS], coords)
