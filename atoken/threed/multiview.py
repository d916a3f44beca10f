"""Multiview renders -> AToken's 3D input: occupied voxels of a 64^3 grid with RGB-patch feats.

This reproduces the official packing script (``pack_multiview_feat.py``, §1.4.1 of the format
spec, refined by ``golden/multiview/README.md``) bit for bit, but fast: the official occupancy
test compares every point with every voxel (minutes per asset); here each point only tests the
three candidate voxels per axis around ``floor((p + 0.5) * 64)`` with the official closed-box
comparison ``|centre - p| <= 1/128`` done in float32, so boundary points still mark both
neighbours.

The official rules, including the surprising ones:

* Views: each image is resized to 256 px with Pillow's LANCZOS and pasted without a mask onto a
  black RGB canvas. A 256 px RGBA image is therefore used as stored with alpha dropped; any other
  size is filtered in premultiplied alpha first. Pixels / 255 in float32, cut into a 16 x 16 grid
  of 768-wide patches ordered ``(p1, p2, c)``.
* Surface points: every depth pixel with camera-z ``d >= 0`` is back-projected from its
  top-left corner ``(q / W, r / H)`` in normalised coordinates. Points are pooled view-major,
  then row-major; above ``max_points`` a ``torch.randperm`` subset is kept.
* Occupancy: voxel ``(i, j, k) <-> (X, Y, Z)`` over ``[-0.5, 0.5]^3`` is occupied iff some point
  lies in its closed box. ``coords`` come out sorted lexicographically.
* Features: each voxel centre takes the single patch ``(round(15 v), round(15 u))`` (half to even)
  of the view with the smallest camera-z of the centre (no visibility test); a patch index
  outside ``[0, 15]`` gives an all-zero row.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from atoken.core.cameras import Camera, w2c_from_blender

RESOLUTION = 64  # voxels per axis
BOUND = 0.5  # the grid spans [-BOUND, BOUND]^3
FEATURE_SIZE = 256  # views are resized to this many pixels per side
PATCH = 16  # 16 x 16 patches of 16 x 16 pixels, 768 channels each
MAX_SURFACE_POINTS = 500_000  # MvFeatVol.max_surface_points
MAX_VIEWS = 1024


def preprocess_view(image: Image.Image | np.ndarray) -> Tensor:
    """Official ``process_pil_image``: LANCZOS to 256 px, paste on black -> uint8 [256, 256, 3]."""
    if isinstance(image, np.ndarray):
        image = image_from_array(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"a view must be a PIL image or a uint8 array, got {type(image).__name__}")
    # Pillow returns an unfiltered copy at the target size and filters RGBA in premultiplied
    # alpha otherwise; paste() without a mask then drops alpha (README fact 4).
    resized = image.resize((FEATURE_SIZE, FEATURE_SIZE), Image.LANCZOS)
    canvas = Image.new("RGB", (FEATURE_SIZE, FEATURE_SIZE))
    canvas.paste(resized, (0, 0))
    return torch.from_numpy(np.asarray(canvas).copy())


def image_from_array(array: np.ndarray) -> Image.Image:
    """PIL image from a uint8 ``[H, W, 3|4]`` or ``[H, W]`` array."""
    if array.dtype != np.uint8:
        raise ValueError(f"view arrays must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] not in (3, 4) or array.ndim not in (2, 3):
        raise ValueError(f"view arrays must be [H, W], [H, W, 3] or [H, W, 4], got {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array))


def patch_grid(view_u8: Tensor) -> Tensor:
    """``[256, 256, 3]`` -> ``[16, 16, 768]`` patches, channel order ``(p1, p2, c)``."""
    g = view_u8.reshape(PATCH, PATCH, PATCH, PATCH, 3)  # (row, p1, col, p2, c)
    return g.permute(0, 2, 1, 3, 4).reshape(PATCH, PATCH, PATCH * PATCH * 3)


def surface_points(
    depths: Sequence[Tensor | np.ndarray],
    cameras: Sequence[Camera],
    *,
    max_points: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Back-project every pixel with depth ``>= 0`` from its top-left corner -> ``[N, 3]`` float32.

    Points are pooled view-major, then row-major over pixels (the official order). With more
    than ``max_points`` of them, the official ``randperm(n)[:max_points]`` subset is kept
    (drawn from ``generator``, or the global RNG), returned in pooled order. Only the kept
    pixels are back-projected, so a 150-view 512 px input costs no more than the cap.
    """
    valid = []  # per view: flat depth, flat indices of valid pixels (row-major), shape
    for depth in depths:
        d = depth.numpy() if isinstance(depth, Tensor) else np.asarray(depth)
        if d.ndim != 2:
            raise ValueError(f"each depth map must be [H, W], got {tuple(d.shape)}")
        flat = d.reshape(-1)
        valid.append((flat, np.flatnonzero(flat >= 0), d.shape))  # numpy: one cheap pass
    counts = np.array([len(v[1]) for v in valid], np.int64)
    n = int(counts.sum())
    keep = None
    if max_points is not None and n > max_points:
        keep = torch.randperm(n, generator=generator)[:max_points].sort().values.numpy()
    offsets = np.cumsum(counts) - counts
    out = []
    for (flat_d, flat_i, (h, w)), cam, off, cnt in zip(valid, cameras, offsets, counts):
        if keep is not None:
            lo, hi = np.searchsorted(keep, [off, off + cnt])
            flat_i = flat_i[keep[lo:hi] - off]
        z = torch.from_numpy(flat_d[flat_i].astype(np.float32))
        idx = torch.from_numpy(flat_i)
        u = (idx % w).float() / w  # top-left corner, not (q + 0.5) / W (README fact 6)
        v = (idx // w).float() / h
        x = (u * z - cam.cx * z) / cam.fx
        y = (v * z - cam.cy * z) / cam.fy
        c2w = torch.linalg.inv(cam.w2c.float())
        out.append(torch.stack([x, y, z], 1) @ c2w[:3, :3].T + c2w[:3, 3])
    return torch.cat(out) if out else torch.zeros(0, 3)


def occupied_voxels(points: Tensor, resolution: int = RESOLUTION, bound: float = BOUND) -> Tensor:
    """Voxels whose closed box holds a point -> ``[M, 3]`` int32 ``(i, j, k)``, sorted."""
    grid = torch.zeros(resolution**3, dtype=torch.bool)
    for chunk in points.float().split(1 << 20):
        _mark_voxels(grid, chunk, resolution, bound)
    return grid.view(resolution, resolution, resolution).nonzero().int()


def _mark_voxels(grid: Tensor, p: Tensor, resolution: int, bound: float) -> None:
    size = 2.0 * bound / resolution
    half = torch.tensor(size / 2.0, dtype=torch.float32)
    p = p[torch.isfinite(p).all(1) & (p.abs() <= bound + size).all(1)]
    base = torch.floor((p.double() + bound) / size).long()  # [N, 3]
    idx = base[:, :, None] + torch.tensor([-1, 0, 1])  # [N, 3, 3] candidates per axis
    # The official test, in float32: |centre - p| <= size / 2 on every axis (closed box).
    centre = (-bound + (idx.double() + 0.5) * size).float()
    ok = ((centre - p[:, :, None]).abs() <= half) & (idx >= 0) & (idx < resolution)
    # Usually only the middle candidate passes on every axis: mark those points at once.
    simple = ok[:, :, 1].all(1) & ~ok[:, :, 0].any(1) & ~ok[:, :, 2].any(1)
    b = base[simple]
    grid[(b[:, 0] * resolution + b[:, 1]) * resolution + b[:, 2]] = True
    ok, idx = ok[~simple], idx[~simple]
    for a in range(3):
        for b in range(3):
            for c in range(3):
                m = ok[:, 0, a] & ok[:, 1, b] & ok[:, 2, c]
                if bool(m.any()):
                    lin = (idx[m, 0, a] * resolution + idx[m, 1, b]) * resolution + idx[m, 2, c]
                    grid[lin] = True


def voxel_centres(coords: Tensor, resolution: int = RESOLUTION, bound: float = BOUND) -> Tensor:
    """World centres ``[M, 3]`` float32 of voxel indices."""
    size = 2.0 * bound / resolution
    return (-bound + (coords.double() + 0.5) * size).float()


def nearest_views(
    coords: Tensor, cameras: Sequence[Camera], resolution: int = RESOLUTION, bound: float = BOUND
) -> tuple[Tensor, Tensor]:
    """View with the smallest camera-z of each voxel centre and the centre's ``(u, v)`` there.

    Returns ``view [M]`` int64 (first index on a tie) and ``uv [M, 2]`` float32, normalised so
    that ``[0, 1]`` spans the image.
    """
    centres = voxel_centres(coords, resolution, bound)
    w2c = torch.stack([c.w2c.float() for c in cameras])  # [V, 4, 4]
    cam = torch.einsum("vij,mj->vmi", w2c[:, :3, :3], centres) + w2c[:, None, :3, 3]  # [V, M, 3]
    view = torch.argmin(cam[..., 2], dim=0)
    sel = cam[view, torch.arange(len(view))]  # [M, 3]
    fx = torch.tensor([c.fx for c in cameras], dtype=torch.float32)[view]
    fy = torch.tensor([c.fy for c in cameras], dtype=torch.float32)[view]
    cx = torch.tensor([c.cx for c in cameras], dtype=torch.float32)[view]
    cy = torch.tensor([c.cy for c in cameras], dtype=torch.float32)[view]
    x, y, z = sel.unbind(1)
    uv = torch.stack([(fx * x + cx * z) / z, (fy * y + cy * z) / z], 1)  # utils3d project_cv
    return view, uv


def patch_indices(uv: Tensor) -> tuple[Tensor, Tensor]:
    """Patch ``(row, col)`` the official nearest ``grid_sample`` reads, and an in-range mask.

    The index is ``round_half_even(15 u)``, computed as PyTorch's CPU kernel does, not the
    patch ``floor(16 u)`` that contains the point.
    """
    g = uv.float() * 2 - 1
    idx = torch.round((g + 1) * ((PATCH - 1) / 2)).long()  # [M, 2] (col, row)
    inside = ((idx >= 0) & (idx < PATCH)).all(1)
    return idx.flip(1), inside


def pack_arrays(
    images: Sequence[Image.Image | np.ndarray],
    depths: Sequence[Tensor | np.ndarray] | np.ndarray,
    cameras: Sequence[Camera],
    *,
    max_points: int = MAX_SURFACE_POINTS,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Views + camera-z depths (negative = empty) + cameras -> ``(feats [M, 768], coords [M, 3])``.

    ``feats`` is float32 in [0, 1], ``coords`` int32 ``(i, j, k)`` sorted. Above ``max_points``
    surface points a ``torch.randperm`` subset is kept, drawn from ``generator`` or, if None,
    from the global RNG exactly as the official script does (so ``torch.manual_seed(s)`` right
    before reproduces its capped output). Below the cap the result is deterministic.
    """
    n = len(cameras)
    if not 0 < n <= MAX_VIEWS:
        raise ValueError(f"need between 1 and {MAX_VIEWS} views, got {n}")
    if len(images) != n or len(depths) != n:
        raise ValueError(
            f"images, depths and cameras disagree: {len(images)}, {len(depths)} and {n} views"
        )
    if max_points < 1:
        raise ValueError(f"max_points must be positive, got {max_points}")
    points = surface_points(depths, cameras, max_points=max_points, generator=generator)
    coords = occupied_voxels(points)
    grids = torch.stack([patch_grid(preprocess_view(im)) for im in images])  # [V, 16, 16, 768]
    view, uv = nearest_views(coords, cameras)
    rowcol, inside = patch_indices(uv)
    rc = rowcol.clamp(0, PATCH - 1)
    feats = grids[view, rc[:, 0], rc[:, 1]].float() / 255.0
    feats[~inside] = 0.0
    return feats, coords


def read_exr_depth(path: str | Path) -> np.ndarray:
    """Official EXR step: channel 0 of OpenCV's BGR order, ``> 1e6 -> -1``, float16 ``[H, W]``."""
    path = Path(path)
    try:
        import OpenEXR
    except ImportError:
        OpenEXR = None
    if OpenEXR is not None:
        with OpenEXR.File(str(path), separate_channels=True) as f:
            channels = {k: v.pixels for k, v in f.channels().items()}
        if "B" in channels:  # OpenCV orders R, G, B as B, G, R: its channel 0 is B
            depth = channels["B"]
        elif len(channels) == 1:
            depth = next(iter(channels.values()))
        else:
            raise ValueError(f"{path}: expected a B channel or one channel, got {sorted(channels)}")
    else:
        os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")
        try:
            import cv2
        except ImportError as e:
            raise ValueError(
                f"{path}: reading EXR depth needs the 'openexr' package (or OpenCV); "
                "or provide {i:03d}_depth.npy files"
            ) from e
        img = cv2.imread(str(path), cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
        if img is None:
            raise ValueError(f"{path}: OpenCV could not read this EXR file")
        depth = img[..., 0] if img.ndim == 3 else img
    depth = np.asarray(depth, dtype=np.float32).copy()
    depth[depth > 1e6] = -1
    return depth.astype(np.float16)


def load_views(folder: str | Path) -> tuple[list[Image.Image], list[np.ndarray], list[Camera]]:
    """Read the official layout: ``{i:03d}.png``, ``{i:03d}_depth.npy|exr``, ``transforms.json``."""
    folder = Path(folder)
    tf = folder / "transforms.json"
    if not tf.is_file():
        raise ValueError(f"{folder}: no transforms.json")
    meta = json.loads(tf.read_text())
    frames = meta.get("frames")
    if not isinstance(frames, list) or not 0 < len(frames) <= MAX_VIEWS:
        raise ValueError(f"{tf}: 'frames' must list 1 to {MAX_VIEWS} views")
    images, depths, cameras = [], [], []
    for i, frame in enumerate(frames):
        if frame.get("file_path") != f"{i:03d}.png":
            raise ValueError(f"{tf}: frame {i} has file_path {frame.get('file_path')!r}")
        image = Image.open(folder / f"{i:03d}.png")
        image.load()
        npy, exr = folder / f"{i:03d}_depth.npy", folder / f"{i:03d}_depth.exr"
        if npy.is_file():
            depth = np.load(npy, allow_pickle=False)
        elif exr.is_file():
            depth = read_exr_depth(exr)
        else:
            raise ValueError(f"{folder}: view {i} has neither {npy.name} nor {exr.name}")
        # The official code reads the per-frame angle; the NeRF top-level one is a fallback.
        fov = frame.get("camera_angle_x", meta.get("camera_angle_x"))
        if fov is None or not 0 < float(fov) < math.pi:
            raise ValueError(f"{tf}: frame {i} needs camera_angle_x in (0, pi), got {fov}")
        c2w = torch.tensor(frame["transform_matrix"], dtype=torch.float32)
        if c2w.shape != (4, 4):
            raise ValueError(f"{tf}: frame {i} transform_matrix must be 4x4")
        # utils3d intrinsics_from_fov_xy in float32: f = 0.5 / tan(fov / 2), fx = fy.
        f = float(0.5 / torch.tan(torch.tensor(float(fov), dtype=torch.float32) / 2))
        w, h = image.size
        cameras.append(Camera(w2c=w2c_from_blender(c2w), fx=f, fy=f, width=w, height=h))
        images.append(image)
        depths.append(depth)
    return images, depths, cameras


def pack_views(
    folder: str | Path,
    *,
    max_points: int = MAX_SURFACE_POINTS,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Official on-disk views folder -> ``(feats [M, 768] float32, coords [M, 3] int32)``."""
    images, depths, cameras = load_views(folder)
    return pack_arrays(images, depths, cameras, max_points=max_points, generator=generator)
