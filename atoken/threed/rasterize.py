"""Tile-based EWA splatting of 3D Gaussians in pure PyTorch (official renderer semantics, §5.6).

The official renderer (TRELLIS ``GaussianRenderer`` over the mip-splatting fork of
diff-gaussian-rasterization) is CUDA-only. This module reproduces its forward pass with
vectorised torch ops so it runs on CPU (and on any torch device):

* cull Gaussians with camera-space ``z <= 0.2``;
* 2D mean through the full projection matrix, ``ndc -> ((ndc + 1) * S - 1) / 2`` (pixel centres
  at integer coordinates);
* EWA 2D covariance ``J W Sigma W^T J^T`` with ``x/z``, ``y/z`` clamped to ``1.3 tan(fov / 2)``;
* mip 2D filter: ``+0.1`` on the diagonal, opacity times ``sqrt(det0 / (det1 + 1e-6) + 1e-6)``;
* radius ``ceil(3 sqrt(lambda_max))`` and the official 16x16 tile rectangle: a Gaussian touches
  every pixel of the tiles its rectangle covers and no other pixel;
* front-to-back compositing in camera-z order, ``alpha = min(0.99, o exp(power))``, skipping
  ``power > 0`` and ``alpha < 1/255``, stopping a pixel before a Gaussian would take the
  transmittance below ``1e-4``.

Compositing runs over all active tiles at once, ``K`` list entries per tile per round; the
transmittance inside a round is a cumulative product seeded with the pixel's current ``T``, so
every product is evaluated in the same order as the sequential loop of the CUDA kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.functional import threshold_

from atoken.core.cameras import Camera
from atoken.core.gaussians import FILTER_2D, Gaussians

TILE = 16  # official BLOCK_X = BLOCK_Y
NEAR_CULL = 0.2  # in_frustum: z <= 0.2 is culled
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4
CLAMP_FOV = 1.3  # view-space x/z, y/z clamp factor in computeCov2D
DEFAULT_NEAR, DEFAULT_FAR = 0.8, 1.6  # TRELLIS GaussianRenderer defaults
BACKENDS = ("torch", "gsplat")

# The float32 just below float32(1/255): ``threshold(alpha, _ALPHA_CUT)`` keeps exactly the
# alphas the kernel keeps (``alpha >= 1.0f / 255.0f``).
_ALPHA_CUT = 0.003921568393707275
_POWER_FLOOR = -60.0  # exp() input floor (see _blend_step)
_ELEMENTS_PER_STEP = 1 << 21  # pixel x Gaussian pairs evaluated per vectorised step
_MAX_PAIRS = 1 << 22  # (Gaussian, tile) pairs listed at once
_MAX_K = 512


@dataclass
class RenderResult:
    """One rendered view: ``image [H, W, 3]`` in [0, 1], ``alpha [H, W]``, ``depth [H, W]``.

    ``image`` is clamped to [0, 1] (the blended sum exceeds 1 where SH colours do, as the
    official raw output; TRELLIS clips it when it saves frames). ``alpha = 1 - T_final``.
    ``depth`` is the expected camera-space z, ``sum(w z) / alpha`` with the compositing weights
    ``w``, and 0 where nothing was drawn.
    """

    image: Tensor
    alpha: Tensor
    depth: Tensor


@dataclass
class ProjectedGaussians:
    """Screen-space Gaussians that survive culling, sorted front to back (camera z).

    ``index [N]`` maps back to input rows; ``mean2d [N, 2]`` pixels (x, y); ``conic [N, 3]``
    the inverse filtered 2D covariance (a, b, c); ``opacity [N]`` after the mip compensation;
    ``depth [N]`` camera z; ``radius [N]`` pixels; ``rect [N, 4]`` tiles (x0, y0, x1, y1),
    end-exclusive; ``colors [N, 3]`` SH-degree-0 RGB.
    """

    index: Tensor
    mean2d: Tensor
    conic: Tensor
    opacity: Tensor
    depth: Tensor
    radius: Tensor
    rect: Tensor
    colors: Tensor


def projection_matrix(
    camera: Camera, near: float = DEFAULT_NEAR, far: float = DEFAULT_FAR
) -> Tensor:
    """TRELLIS ``intrinsics_to_projection``: the 4x4 OpenCV-camera projection matrix."""
    proj = torch.zeros(4, 4, dtype=torch.float32)
    proj[0, 0] = 2.0 * camera.fx
    proj[1, 1] = 2.0 * camera.fy
    proj[0, 2] = 2.0 * camera.cx - 1.0
    proj[1, 2] = -2.0 * camera.cy + 1.0  # official sign; identical to the x row when cy = 0.5
    proj[2, 2] = far / (far - near)
    proj[2, 3] = near * far / (near - far)
    proj[3, 2] = 1.0
    return proj


def quaternion_to_matrix(q: Tensor) -> Tensor:
    """Rotation matrices ``[M, 3, 3]`` from (w, x, y, z) quaternions, used as given."""
    r, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - r * z), 2 * (x * z + r * y),
        2 * (x * y + r * z), 1 - 2 * (x * x + z * z), 2 * (y * z - r * x),
        2 * (x * z - r * y), 2 * (y * z + r * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, -1).reshape(*q.shape[:-1], 3, 3)


def _check_camera(camera: Camera, near: float, far: float) -> None:
    if camera.width <= 0 or camera.height <= 0:
        raise ValueError(f"camera size must be positive, got {camera.width}x{camera.height}")
    if not (camera.fx > 0 and camera.fy > 0):
        raise ValueError(f"camera focal lengths must be > 0, got fx={camera.fx}, fy={camera.fy}")
    if tuple(camera.w2c.shape) != (4, 4):
        raise ValueError(f"camera.w2c must be [4, 4], got {tuple(camera.w2c.shape)}")
    if not (0 < near < far):
        raise ValueError(f"need 0 < near < far, got near={near}, far={far}")


class ScreenSpace(NamedTuple):
    """Screen-space quantities of Gaussians (see `screen_space`)."""

    mean2d: Tensor  # [M, 2] pixel centres
    conic: Tensor  # [M, 3] inverse of the filtered 2D covariance (a, b, c)
    coef: Tensor  # [M] mip-splatting opacity compensation
    depth: Tensor  # [M] view-space z
    c00: Tensor  # [M] filtered 2D covariance diagonal
    c11: Tensor
    det: Tensor  # [M] its determinant


def screen_space(
    xyz: Tensor,
    rotation: Tensor,
    scaling: Tensor,
    camera: Camera,
    near: float = DEFAULT_NEAR,
    far: float = DEFAULT_FAR,
) -> ScreenSpace:
    """Official ``preprocessCUDA`` maths (project, EWA with the clamped tangent, mip 2D filter)
    in the dtype of ``xyz`` and with autograd: `project_gaussians` runs it on detached float32
    tensors, the training renderer (`atoken.training.gs`) on the live parameters."""
    dtype, device = xyz.dtype, xyz.device
    width, height = camera.width, camera.height
    w2c = camera.w2c.detach().to(device, dtype)
    full = projection_matrix(camera, near, far).to(device, dtype) @ w2c  # full_proj_transform

    p_view = xyz @ w2c[:3, :3].T + w2c[:3, 3]
    p_hom = xyz @ full[:, :3].T + full[:, 3]
    p_w = 1.0 / (p_hom[:, 3] + 1e-7)
    size = torch.tensor([width, height], dtype=dtype, device=device)
    mean2d = ((p_hom[:, :2] * p_w[:, None] + 1.0) * size - 1.0) * 0.5  # ndc2Pix

    # computeCov2D: EWA with the view-space tangent clamped at 1.3 tan(fov / 2).
    tan_x, tan_y = 0.5 / camera.fx, 0.5 / camera.fy  # tan(fov / 2) of fov = 2 atan(0.5 / f)
    focal_x, focal_y = width / (2.0 * tan_x), height / (2.0 * tan_y)
    tz = p_view[:, 2]
    tx = (p_view[:, 0] / tz).clamp(-CLAMP_FOV * tan_x, CLAMP_FOV * tan_x) * tz
    ty = (p_view[:, 1] / tz).clamp(-CLAMP_FOV * tan_y, CLAMP_FOV * tan_y) * tz
    zeros = torch.zeros_like(tz)
    jac = torch.stack(
        [focal_x / tz, zeros, -(focal_x * tx) / (tz * tz),
         zeros, focal_y / tz, -(focal_y * ty) / (tz * tz)], -1,
    ).reshape(-1, 2, 3)  # fmt: skip
    rot = quaternion_to_matrix(rotation)
    scaled = rot * scaling[:, None, :]  # R diag(s): Sigma = M M^T
    proj_m = jac @ (w2c[:3, :3] @ scaled)  # [M, 2, 3]: J W R S
    cov = proj_m @ proj_m.transpose(1, 2)  # [M, 2, 2]
    c00, c01, c11 = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]

    # Mip-splatting 2D filter with opacity compensation.
    det0 = (c00 * c11 - c01 * c01).clamp_min(1e-6)
    det1 = ((c00 + FILTER_2D) * (c11 + FILTER_2D) - c01 * c01).clamp_min(1e-6)
    coef = torch.sqrt(det0 / (det1 + 1e-6) + 1e-6)
    coef = torch.where((det0 <= 1e-6) | (det1 <= 1e-6), torch.zeros_like(coef), coef)
    c00, c11 = c00 + FILTER_2D, c11 + FILTER_2D

    det = c00 * c11 - c01 * c01
    det_inv = 1.0 / det
    conic = torch.stack([c11 * det_inv, -c01 * det_inv, c00 * det_inv], -1)
    return ScreenSpace(mean2d, conic, coef, tz, c00, c11, det)


def project_gaussians(
    gaussians: Gaussians,
    camera: Camera,
    *,
    near: float = DEFAULT_NEAR,
    far: float = DEFAULT_FAR,
) -> ProjectedGaussians:
    """Official ``preprocessCUDA`` in float32: cull, project, EWA + mip filter, tile rectangles."""
    _check_camera(camera, near, far)
    width, height = camera.width, camera.height
    grid_x, grid_y = -(-width // TILE), -(-height // TILE)
    mean2d, conic, coef, tz, c00, c11, det = screen_space(
        gaussians.xyz.detach().float(),
        gaussians.rotation.detach().float(),
        gaussians.scaling.detach().float(),
        camera,
        near,
        far,
    )
    mid = 0.5 * (c00 + c11)
    lambda1 = mid + torch.sqrt((mid * mid - det).clamp_min(0.1))
    radius = torch.ceil(3.0 * torch.sqrt(lambda1))

    # getRect: truncation toward zero, clamped to the tile grid.
    r = radius.int().float()
    x0 = torch.trunc((mean2d[:, 0] - r) / TILE).clamp(0, grid_x)
    y0 = torch.trunc((mean2d[:, 1] - r) / TILE).clamp(0, grid_y)
    x1 = torch.trunc((mean2d[:, 0] + r + TILE - 1) / TILE).clamp(0, grid_x)
    y1 = torch.trunc((mean2d[:, 1] + r + TILE - 1) / TILE).clamp(0, grid_y)
    rect = torch.stack([x0, y0, x1, y1], -1).long()

    keep = (tz > NEAR_CULL) & (det != 0) & ((x1 - x0) * (y1 - y0) > 0)
    index = keep.nonzero().squeeze(1)
    index = index[torch.argsort(tz[index], stable=True)]  # CUB radix sort is stable too
    opacity = gaussians.opacity.detach().float()[:, 0] * coef
    return ProjectedGaussians(
        index=index,
        mean2d=mean2d[index],
        conic=conic[index],
        opacity=opacity[index],
        depth=tz[index],
        radius=radius[index],
        rect=rect[index],
        colors=gaussians.colors.detach().float()[index],
    )


def _tile_lists(rect: Tensor, num_tiles: int, grid_x: int) -> tuple[Tensor, Tensor]:
    """Duplicate Gaussians (rows of ``rect``, depth-sorted) per covered tile.

    Returns the row ids sorted by (tile, depth) and the per-tile counts ``[num_tiles]``.
    """
    device = rect.device
    x0, y0, x1, y1 = rect.unbind(-1)
    w = x1 - x0
    n = w * (y1 - y0)
    gid = torch.repeat_interleave(torch.arange(len(n), device=device), n)
    local = torch.arange(len(gid), device=device) - (torch.cumsum(n, 0) - n)[gid]
    tile = (y0[gid] + local // w[gid]) * grid_x + x0[gid] + local % w[gid]
    # Rows are already in depth order, so a stable sort by tile gives the (tile, depth) order.
    tile, order = torch.sort(tile, stable=True)
    counts = torch.bincount(tile, minlength=num_tiles)
    return gid[order], counts


def _row_bands(rect: Tensor, grid_y: int, max_pairs: int) -> list[tuple[int, int]]:
    """Split the tile rows into bands of at most ``max_pairs`` (Gaussian, tile) pairs each.

    A single row holding more pairs than that still forms its own band.
    """
    x0, y0, x1, y1 = rect.unbind(-1)
    w = x1 - x0
    diff = torch.zeros(grid_y + 1, dtype=torch.long, device=rect.device)
    diff.index_add_(0, y0, w).index_add_(0, y1, -w)
    per_row = torch.cumsum(diff, 0)[:grid_y].tolist()
    bands, start, total = [], 0, 0
    for row, num in enumerate(per_row):
        if row > start and total + num > max_pairs:
            bands.append((start, row))
            start, total = row, 0
        total += num
    bands.append((start, grid_y))
    return bands


@dataclass
class _Canvas:
    """Per-tile blending state: ``trans [T, 256]``, ``accum [T, 256, 4]`` (rgb, depth), ``done``."""

    trans: Tensor
    accum: Tensor
    done: Tensor
    tile_x: Tensor  # [T] left pixel of each tile
    tile_y: Tensor
    ramp: Tensor  # [16] pixel offsets inside a tile


def _composite(proj: ProjectedGaussians, width: int, height: int) -> tuple[Tensor, Tensor]:
    """Blend the tile lists front to back; returns ``(rgb+depth sums [H,W,4], T [H,W])``."""
    device = proj.mean2d.device
    grid_x, grid_y = -(-width // TILE), -(-height // TILE)
    num_tiles = grid_x * grid_y
    # alpha <= opacity, so Gaussians with opacity < 1/255 are never drawn: drop them early.
    drawable = proj.opacity > _ALPHA_CUT
    if not bool(drawable.all()):
        proj = ProjectedGaussians(*(getattr(proj, f.name)[drawable] for f in fields(proj)))

    # Per-Gaussian table; the extra last row is a dummy with opacity 0 (always skipped).
    a, b, c = proj.conic.unbind(-1)
    # Conics that are positive definite with a margin cannot give power > 0 even after float
    # rounding (the error is ~1e-6 of a dx^2 + c dy^2), so only the others need that check.
    unsafe = (a <= 0) | (c <= 0) | (b * b >= (1.0 - 1e-4) * a * c)
    table = torch.cat(
        [
            proj.mean2d,
            torch.stack([-0.5 * a, -b, -0.5 * c, proj.opacity, unsafe.float()], -1),
            proj.colors,
            proj.depth[:, None],
        ],
        1,
    )
    table = torch.cat([table, table.new_zeros(1, table.shape[1])])
    dummy = torch.tensor([len(proj.depth)], device=device)

    ramp = torch.arange(TILE, device=device, dtype=torch.float32)
    tile_x = (torch.arange(num_tiles, device=device) % grid_x) * TILE
    tile_y = (torch.arange(num_tiles, device=device) // grid_x) * TILE
    # Pixels outside the image start "done", as in the CUDA kernel.
    inside = ((tile_y[:, None, None] + ramp[:, None]) < height) & (
        (tile_x[:, None, None] + ramp[None, :]) < width
    )
    canvas = _Canvas(
        trans=torch.ones(num_tiles, TILE * TILE, device=device),
        accum=torch.zeros(num_tiles, TILE * TILE, 4, device=device),
        done=~inside.reshape(num_tiles, TILE * TILE),
        tile_x=tile_x,
        tile_y=tile_y,
        ramp=ramp,
    )
    # Bands of tile rows bound the memory of the (Gaussian, tile) pair lists.
    for row0, row1 in _row_bands(proj.rect, grid_y, _MAX_PAIRS):
        rect = proj.rect
        rows = None
        if (row0, row1) != (0, grid_y):
            rows = ((rect[:, 1] < row1) & (rect[:, 3] > row0)).nonzero().squeeze(1)
            rect = rect[rows].clone()
            rect[:, 1].clamp_(min=row0)
            rect[:, 3].clamp_(max=row1)
        ids, counts = _tile_lists(rect, num_tiles, grid_x)
        if rows is not None:
            ids = rows[ids]
        _blend_tiles(torch.cat([ids, dummy]), counts, table, canvas)

    def to_image(t: Tensor) -> Tensor:
        t = t.reshape(grid_y, grid_x, TILE, TILE, *t.shape[2:]).transpose(1, 2)
        return t.reshape(grid_y * TILE, grid_x * TILE, *t.shape[4:])[:height, :width]

    return to_image(canvas.accum), to_image(canvas.trans)


def _blend_tiles(ids: Tensor, counts: Tensor, table: Tensor, canvas: _Canvas) -> None:
    """Run every tile's list (``ids`` sorted by tile, a dummy id last) through the canvas."""
    num_pix = TILE * TILE
    starts = torch.cumsum(counts, 0) - counts
    progress = torch.zeros_like(counts)
    active = (counts > 0).nonzero().squeeze(1)
    while len(active) > 0:
        remaining = int((counts[active] - progress[active]).max())
        k = max(16, min(_MAX_K, _ELEMENTS_PER_STEP // (num_pix * len(active)), remaining))
        k = min(-(-k // 8) * 8, max(8, -(-remaining // 8) * 8))
        batch = max(1, _ELEMENTS_PER_STEP // (num_pix * k))
        for tiles in active.split(batch):
            pos = progress[tiles, None] + torch.arange(k, device=ids.device)
            idx = torch.where(pos < counts[tiles, None], starts[tiles, None] + pos, len(ids) - 1)
            _blend_step(tiles, table[ids[idx]], canvas)
        progress[active] += k
        finished = (progress[active] >= counts[active]) | canvas.done[active].all(1)
        active = active[~finished]


def _blend_step(tiles: Tensor, prm: Tensor, canvas: _Canvas) -> None:
    """Blend the next ``k`` list entries ``prm [nt, k, 11]`` of each tile in ``tiles``."""
    nt, k = prm.shape[:2]
    mx, my, na, nb, nc, opac, unsafe = prm[..., :7].unbind(-1)
    feats = prm[..., 7:]  # rgb, depth

    # d = mean - pixel; power = -0.5 (a dx^2 + c dy^2) - b dx dy, split into row/column terms.
    ramp = canvas.ramp
    dx = mx[:, None, :] - (canvas.tile_x[tiles, None].float() + ramp)[:, :, None]  # [nt, 16x, k]
    dy = my[:, None, :] - (canvas.tile_y[tiles, None].float() + ramp)[:, :, None]  # [nt, 16y, k]
    term_x = na[:, None, :] * dx * dx
    term_y = nc[:, None, :] * dy * dy
    power = term_y[:, :, None, :] + term_x[:, None, :, :]  # [nt, 16y, 16x, k]
    power.addcmul_((nb[:, None, :] * dy)[:, :, None, :], dx[:, None, :, :])
    power = power.view(nt, TILE * TILE, k)

    if bool(unsafe.any()):
        power.masked_fill_(power > 0, -math.inf)  # skip power > 0
    # exp() is ~30x slower when it underflows; any power <= -60 gives alpha < 1/255 anyway
    # (opacity >= 1/255 after the drop above), so flooring it changes no result.
    threshold_(power, _POWER_FLOOR, _POWER_FLOOR)
    alpha = power.exp_().mul_(opac[:, None, :])
    threshold_(alpha, _ALPHA_CUT, 0.0)  # skip alpha < 1/255
    alpha.clamp_max_(ALPHA_MAX)

    # Transmittance after each entry, seeded with the pixel's T (0 once it is done), so the
    # products run in the kernel's order: T_k = T_{k-1} (1 - alpha_k).
    done_t, trans_t = canvas.done[tiles], canvas.trans[tiles]  # [nt, 256]
    seed = torch.where(done_t, 0.0, trans_t)
    t_after = torch.rsub(alpha, 1.0)
    t_after[..., 0] *= seed
    t_after.cumprod_(-1)
    weight = alpha
    weight[..., 1:] *= t_after[..., :-1]
    weight[..., 0] *= seed
    contrib = torch.bmm(weight, feats)  # [nt, 256, 4]

    # T only decreases, so a pixel stopped inside this step iff its last T is below 1e-4;
    # only those few pixels need their weights cut at the stop.
    last = t_after[..., -1]
    stopped = last < T_MIN
    new_trans = torch.where(stopped, trans_t, last)
    fresh = stopped & ~done_t
    if bool(fresh.any()):
        ti, pi = fresh.nonzero(as_tuple=True)
        rows = t_after[ti, pi]  # [S, k]
        applied = rows >= T_MIN  # a prefix
        num = applied.sum(-1)
        contrib[ti, pi] = torch.einsum("sk,skc->sc", weight[ti, pi] * applied, feats[ti])
        t_stop = rows.gather(-1, (num - 1).clamp_min(0)[:, None])[:, 0]
        new_trans[ti, pi] = torch.where(num > 0, t_stop, seed[ti, pi])
    canvas.accum[tiles] += contrib
    canvas.trans[tiles] = new_trans
    canvas.done[tiles] = done_t | stopped


def _render_torch(
    gaussians: Gaussians, camera: Camera, background: Tensor, near: float, far: float
) -> RenderResult:
    proj = project_gaussians(gaussians, camera, near=near, far=far)
    accum, trans = _composite(proj, camera.width, camera.height)
    alpha = 1.0 - trans
    image = accum[..., :3] + trans[..., None] * background
    depth = torch.where(alpha > 0, accum[..., 3] / alpha.clamp_min(1e-12), 0.0)
    return RenderResult(image=image.clamp(0.0, 1.0), alpha=alpha, depth=depth)


def _render_gsplat(
    gaussians: Gaussians, camera: Camera, background: Tensor, near: float, far: float
) -> RenderResult:
    """gsplat ``rasterization`` with the official filter; the tile cut-off differs slightly."""
    import gsplat  # lazy: optional CUDA-only dependency

    del near, far  # only the z row of the projection uses them; gsplat culls at NEAR_CULL
    device = gaussians.xyz.device
    w, h = camera.width, camera.height
    # gsplat samples pixel centres at j + 0.5, so shift the principal point by half a pixel
    # to land on the official integer-centre convention.
    ks = torch.tensor(
        [[camera.fx * w, 0.0, camera.cx * w], [0.0, camera.fy * h, camera.cy * h], [0, 0, 1]],
        dtype=torch.float32,
        device=device,
    )
    colors, alphas, _ = gsplat.rasterization(
        means=gaussians.xyz.float(),
        quats=gaussians.rotation.float(),
        scales=gaussians.scaling.float(),
        opacities=gaussians.opacity.float()[:, 0],
        colors=gaussians.colors.float(),
        viewmats=camera.w2c.to(device, torch.float32)[None],
        Ks=ks[None],
        width=w,
        height=h,
        near_plane=NEAR_CULL,
        eps2d=FILTER_2D,
        rasterize_mode="antialiased",
        backgrounds=background[None],
        render_mode="RGB+ED",
        packed=False,
    )
    alpha = alphas[0, ..., 0]
    depth = torch.where(alpha > 0, colors[0, ..., 3], 0.0)
    return RenderResult(image=colors[0, ..., :3].clamp(0.0, 1.0), alpha=alpha, depth=depth)


def gsplat_available(device: torch.device | str) -> bool:
    """Whether the gsplat backend can run for tensors on ``device`` (CUDA + importable)."""
    if torch.device(device).type != "cuda":
        return False
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return True


def render_gaussians(
    gaussians: Gaussians,
    camera: Camera,
    *,
    background: Sequence[float] | Tensor = (0.0, 0.0, 0.0),
    backend: str | None = None,
    near: float = DEFAULT_NEAR,
    far: float = DEFAULT_FAR,
) -> RenderResult:
    """Render one view with the official rasteriser's rules (see the module docstring).

    Args:
        background: RGB in [0, 1] blended where the transmittance is left.
        backend: ``"torch"`` (any device) or ``"gsplat"`` (CUDA tensors, gsplat installed);
            ``None`` picks gsplat when it can run, else torch.
        near, far: the official projection's clip planes; like the official rasteriser, only
            the (unused) depth row depends on them, the cull is camera ``z <= 0.2``.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    _check_camera(camera, near, far)
    device = gaussians.xyz.device
    bg = torch.as_tensor(background, dtype=torch.float32).to(device).reshape(-1)
    if bg.numel() != 3:
        raise ValueError(f"background must have 3 values (RGB), got {bg.numel()}")
    if backend is None:
        backend = "gsplat" if gsplat_available(device) else "torch"
    if backend == "gsplat":
        if not gsplat_available(device):
            raise ValueError(f"backend 'gsplat' needs gsplat installed and CUDA tensors ({device})")
        return _render_gsplat(gaussians, camera, bg, near, far)
    return _render_torch(gaussians, camera, bg, near, far)


def render_turntable(
    gaussians: Gaussians,
    cameras: Sequence[Camera],
    *,
    background: Sequence[float] | Tensor = (0.0, 0.0, 0.0),
    backend: str | None = None,
) -> Tensor:
    """Render each camera; returns uint8 frames ``[F, H, W, 3]`` (rounded, on the CPU)."""
    if len(cameras) == 0:
        raise ValueError("render_turntable needs at least one camera, got 0")
    sizes = {(c.height, c.width) for c in cameras}
    if len(sizes) != 1:
        raise ValueError(f"all cameras must share one image size, got {sorted(sizes)}")
    frames = []
    for cam in cameras:
        img = render_gaussians(gaussians, cam, background=background, backend=backend).image
        frames.append((img * 255.0).round().to(torch.uint8).cpu())
    return torch.stack(frames)
