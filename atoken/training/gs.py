"""Training our own small 3D Gaussian decoder: a differentiable renderer, data and the loop.

The official Gaussian decoder is trained with rendering losses: its Gaussians are rendered from
several views and compared with ground-truth renders of the asset (§5; TRELLIS's recipe). Our
rasteriser (``atoken.threed.rasterize``) is forward only, so this module adds a *deferred*
differentiable compositor for training:

1. ``select_contributors`` (no gradients): project with the rasteriser's own
   ``project_gaussians``, test each Gaussian against the pixels of its ``alpha >= 1/255``
   ellipse box (cut to its official 16x16 tile rectangle), and keep per pixel, front to back,
   the entries the CUDA kernel blends: ``power <= 0``, ``alpha >= 1/255``, up to the stop before
   the transmittance would fall below ``1e-4`` (and at most ``k``). The lists are ragged
   (``Selection``: pixel and row per entry), so the cost follows the real contributors.
2. ``composite_selected`` (autograd): recompute 2D means, conics (EWA + mip 2D filter),
   opacities and colours of the used Gaussians with plain torch ops (``screen_gaussians``),
   then ``alpha = min(0.99, o exp(power))`` and front-to-back weights ``alpha T`` with segmented
   products (float64 sums of ``log(1 - alpha)``).

Whenever no pixel needs more than ``k`` entries the result equals ``render_gaussians``
(tested to 2e-5), so the training loss sees exactly what users will see.

Training data are procedural meshes (unions of spheres, ellipsoids, boxes, cylinders, cones,
tori and capsules with random colours, 3D patterns, procedural textures or plain grey), packed
into voxels with ``atoken.threed.mesh_render.mesh_to_voxels`` at the app's defaults and rendered with
the same shading on black from random orbit cameras, with depth. Steps train on random cubic
crops of about 5k voxels; the loss covers only pixels the crop explains (background, or a
surface point inside the crop), see ``crop_mask``. ``scripts/build_atoken_tiny_gs.py`` rebuilds
``assets/atoken-tiny-gs.safetensors``; ``assets/atoken-tiny-gs.md`` is its card.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from PIL import Image
from torch import Tensor

from atoken.core.attention import attention_backend
from atoken.core.cameras import Camera, camera_from_fov, orbit_cameras
from atoken.core.checkpoint import save_checkpoint
from atoken.core.config import GSDecoderConfig
from atoken.core.gaussians import Gaussians
from atoken.core.gs_decoder import GaussianDecoder
from atoken.core.sparse import SparseTensor
from atoken.threed.mesh import normalize_mesh
from atoken.threed.mesh_render import DEFAULT_FOV, DEFAULT_RADIUS, mesh_to_voxels, render_views
from atoken.threed.multiview import RESOLUTION as GRID
from atoken.threed.rasterize import (
    ALPHA_MAX,
    DEFAULT_FAR,
    DEFAULT_NEAR,
    T_MIN,
    TILE,
    ProjectedGaussians,
    project_gaussians,
    screen_space,
)

ALPHA_CUT = 1.0 / 255.0
DEFAULT_K = 128
MAX_K = 1024
_SELECT_ELEMENTS = 1 << 22  # (Gaussian, pixel) pairs tested per selection step
_BOX_MARGIN = 0.01  # pixels added to the ellipse box against float rounding
_PROJ_FIELDS = ("index", "mean2d", "conic", "opacity", "depth", "radius", "rect", "colors")


# ---------------------------------------------------------------------------------------------
# Differentiable deferred rendering
# ---------------------------------------------------------------------------------------------


@dataclass
class ScreenGaussians:
    """Per-Gaussian screen quantities with autograd (all input rows, no culling).

    ``mean2d [M, 2]`` pixels, ``conic [M, 3]`` (a, b, c) of the filtered 2D covariance,
    ``opacity [M]`` after the mip-filter compensation, ``colors [M, 3]`` SH-degree-0 RGB.
    """

    mean2d: Tensor
    conic: Tensor
    opacity: Tensor
    colors: Tensor


@dataclass
class DiffRender:
    """A differentiable render: ``image [H, W, 3]`` (unclamped) and ``alpha [H, W]``."""

    image: Tensor
    alpha: Tensor


def screen_gaussians(
    gaussians: Gaussians,
    camera: Camera,
    *,
    near: float = DEFAULT_NEAR,
    far: float = DEFAULT_FAR,
) -> ScreenGaussians:
    """The rasteriser's projection (`atoken.threed.rasterize.screen_space`) with autograd, in the
    input dtype."""
    s = screen_space(gaussians.xyz, gaussians.rotation, gaussians.scaling, camera, near, far)
    opacity = gaussians.opacity[:, 0] * s.coef
    return ScreenGaussians(mean2d=s.mean2d, conic=s.conic, opacity=opacity, colors=gaussians.colors)


def _footprints(proj: ProjectedGaussians, width: int, height: int) -> Tensor:
    """Pixel boxes ``[N, 4]`` (x0, y0, x1, y1 inclusive) that hold every pixel a projected
    Gaussian can reach: its ``alpha >= 1/255`` ellipse (+0.01 px for rounding) cut to its tile
    rectangle and the image. Empty boxes have ``x1 < x0`` or ``y1 < y0``."""
    a, b, c = proj.conic.unbind(-1)
    det = a * c - b * b
    # alpha >= 1/255  <=>  d^T Q d <= 2 ln(255 o) with Q the conic; its half extents are
    # sqrt(r2 Q^-1_xx) and sqrt(r2 Q^-1_yy). Non-definite conics fall back to the rectangle.
    r2 = 2.0 * torch.log((255.0 * proj.opacity).clamp_min(1.0))
    big = float(max(width, height))
    hx = torch.nan_to_num(torch.sqrt(r2 * c / det), nan=big, posinf=big).clamp(0, big)
    hy = torch.nan_to_num(torch.sqrt(r2 * a / det), nan=big, posinf=big).clamp(0, big)
    hx = torch.where(det > 0, hx, big)
    hy = torch.where(det > 0, hy, big)
    mx, my = proj.mean2d.unbind(-1)
    rect = proj.rect
    x0 = torch.maximum(torch.ceil(mx - hx - _BOX_MARGIN), (rect[:, 0] * TILE).float()).clamp_min(0)
    y0 = torch.maximum(torch.ceil(my - hy - _BOX_MARGIN), (rect[:, 1] * TILE).float()).clamp_min(0)
    x1 = torch.minimum(torch.floor(mx + hx + _BOX_MARGIN), (rect[:, 2] * TILE - 1).float())
    y1 = torch.minimum(torch.floor(my + hy + _BOX_MARGIN), (rect[:, 3] * TILE - 1).float())
    x1, y1 = x1.clamp_max(width - 1), y1.clamp_max(height - 1)
    return torch.stack([x0, y0, x1, y1], -1).long()


@dataclass
class Selection:
    """Per-pixel blending lists: ``pixel [P]`` (``y * width + x``, ascending) and ``row [P]``
    (input Gaussian rows), each pixel's entries front to back, cut at the kernel's stop."""

    pixel: Tensor
    row: Tensor
    height: int
    width: int

    def counts(self) -> Tensor:
        """Entries per pixel ``[H, W]``."""
        n = torch.bincount(self.pixel, minlength=self.height * self.width)
        return n.reshape(self.height, self.width)

    def dense(self, k: int) -> Tensor:
        """The first ``k`` rows per pixel as ``[H, W, k]``, padded with -1."""
        counts = self.counts().reshape(-1)
        rank = torch.arange(len(self.pixel), device=self.pixel.device)
        rank = rank - (torch.cumsum(counts, 0) - counts)[self.pixel]
        out = torch.full(
            (self.height * self.width, k), -1, dtype=torch.long, device=self.pixel.device
        )
        first = rank < k
        out[self.pixel[first], rank[first]] = self.row[first]
        return out.reshape(self.height, self.width, k)


def _segment_transmittance(log_factor: Tensor, pixel: Tensor, num_pixels: int):
    """Transmittance before each entry ``[P]`` and left after each pixel's list
    ``[num_pixels]``, from ``log(1 - alpha)`` of entries grouped by ascending ``pixel``.

    Segmented products as float64 sums of logs (a global cumsum minus each segment's offset),
    so the error does not grow with the number of entries.
    """
    log64 = log_factor.double()
    exclusive = torch.cumsum(log64, 0) - log64
    counts = torch.bincount(pixel, minlength=num_pixels)
    starts = torch.cumsum(counts, 0) - counts
    before = torch.exp(exclusive - exclusive[starts[pixel]])
    total = torch.zeros(num_pixels, dtype=torch.float64, device=log64.device)
    final = torch.exp(total.index_add(0, pixel, log64))
    return before.to(log_factor.dtype), final.to(log_factor.dtype)


@torch.no_grad()
def select_contributors(
    gaussians: Gaussians,
    camera: Camera,
    k: int = DEFAULT_K,
    *,
    near: float = DEFAULT_NEAR,
    far: float = DEFAULT_FAR,
) -> Selection:
    """Per pixel, the Gaussians the official kernel blends, front to back (at most ``k``).

    A Gaussian reaches a pixel when the pixel lies in the tiles of its official tile rectangle,
    ``power <= 0`` and ``alpha >= 1/255``; a pixel's list ends before the entry that would take
    its transmittance below ``1e-4`` (the kernel's tests). Only pixels inside each Gaussian's
    ``alpha >= 1/255`` ellipse box are tested, so the cost follows the footprints.
    """
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in 1..{MAX_K}, got {k}")
    proj: ProjectedGaussians = project_gaussians(gaussians, camera, near=near, far=far)
    device = gaussians.xyz.device
    width, height = camera.width, camera.height
    keep = (proj.opacity >= ALPHA_CUT).nonzero().squeeze(1)  # alpha <= opacity
    box = _footprints(
        ProjectedGaussians(*(getattr(proj, n)[keep] for n in _PROJ_FIELDS)), width, height
    )
    bw = (box[:, 2] - box[:, 0] + 1).clamp_min(0)
    count = bw * (box[:, 3] - box[:, 1] + 1).clamp_min(0)
    ends = torch.cumsum(count, 0)
    pixels, owners, alphas = [], [], []
    start = 0
    while start < len(keep):  # chunks of at most _SELECT_ELEMENTS (Gaussian, pixel) pairs
        base = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(torch.searchsorted(ends, base + _SELECT_ELEMENTS, right=True)))
        sel = torch.arange(start, min(stop, len(keep)), device=device)
        g = torch.repeat_interleave(sel, count[sel])
        local = torch.arange(base, base + len(g), device=device) - (ends[g] - count[g])
        px = box[g, 0] + local % bw[g]
        py = box[g, 1] + local // bw[g]
        src = keep[g]
        dx = proj.mean2d[src, 0] - px.float()
        dy = proj.mean2d[src, 1] - py.float()
        ca, cb, cc = proj.conic[src].unbind(-1)
        power = -0.5 * (ca * dx * dx + cc * dy * dy) - cb * dx * dy
        alpha = (proj.opacity[src] * torch.exp(power)).clamp_max(ALPHA_MAX)
        ok = (alpha >= ALPHA_CUT) & (power <= 0)
        pixels.append((py * width + px)[ok])
        owners.append(src[ok])
        alphas.append(alpha[ok])
        start = stop
    num_pix = height * width
    if not pixels:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Selection(empty, empty, height, width)
    pix = torch.cat(pixels)
    pix, order = torch.sort(pix, stable=True)  # rows were depth-sorted: (pixel, depth) order
    own, alpha = torch.cat(owners)[order], torch.cat(alphas)[order]
    before, _ = _segment_transmittance(torch.log1p(-alpha), pix, num_pix)
    counts = torch.bincount(pix, minlength=num_pix)
    rank = torch.arange(len(pix), device=device) - (torch.cumsum(counts, 0) - counts)[pix]
    # T only falls, so "T after the entry >= 1e-4" keeps a prefix of each list.
    applied = (before * (1.0 - alpha) >= T_MIN) & (rank < k)
    return Selection(pix[applied], proj.index[own[applied]], height, width)


def composite_selected(
    screen: ScreenGaussians,
    selection: Selection,
    background: Sequence[float] | Tensor = (0.0, 0.0, 0.0),
) -> DiffRender:
    """Front-to-back compositing of the selected lists with autograd (rows index ``screen``)."""
    height, width = selection.height, selection.width
    dtype, device = screen.mean2d.dtype, screen.mean2d.device
    # One gather of a per-Gaussian table (one scatter in the backward).
    table = torch.cat([screen.mean2d, screen.conic, screen.opacity[:, None], screen.colors], 1)
    prm = table[selection.row]  # [P, 9]
    pix = selection.pixel
    dx = prm[:, 0] - (pix % width).to(dtype)
    dy = prm[:, 1] - torch.div(pix, width, rounding_mode="floor").to(dtype)
    power = -0.5 * (prm[:, 2] * dx * dx + prm[:, 4] * dy * dy) - prm[:, 3] * dx * dy
    alpha = (prm[:, 5] * torch.exp(power.clamp_max(0.0))).clamp_max(ALPHA_MAX)
    before, final_t = _segment_transmittance(torch.log1p(-alpha), pix, height * width)
    weight = alpha * before
    rgb = torch.zeros(height * width, 3, dtype=dtype, device=device)
    rgb = rgb.index_add(0, pix, weight[:, None] * prm[:, 6:])
    bg = torch.as_tensor(background, dtype=dtype, device=device).reshape(3)
    image = rgb + final_t[:, None] * bg
    return DiffRender(
        image=image.reshape(height, width, 3), alpha=(1.0 - final_t).reshape(height, width)
    )


def render_differentiable(
    gaussians: Gaussians,
    camera: Camera,
    *,
    k: int = DEFAULT_K,
    background: Sequence[float] | Tensor = (0.0, 0.0, 0.0),
    near: float = DEFAULT_NEAR,
    far: float = DEFAULT_FAR,
) -> DiffRender:
    """Render one view with gradients to every Gaussian field (at most ``k`` entries a pixel)."""
    sel = select_contributors(gaussians, camera, k, near=near, far=far)
    # Project only the Gaussians some pixel uses (usually the visible surface).
    used, inverse = torch.unique(sel.row, return_inverse=True)
    sel = Selection(sel.pixel, inverse, sel.height, sel.width)
    screen = screen_gaussians(gaussians.subset(used), camera, near=near, far=far)
    return composite_selected(screen, sel, background)


# ---------------------------------------------------------------------------------------------
# Procedural training assets
# ---------------------------------------------------------------------------------------------

PART_KINDS = ("sphere", "ellipsoid", "box", "cylinder", "cone", "torus", "capsule")
MAX_EDGE = 0.03  # subdivision edge length in the unit box, so face colours can draw patterns
GREY = 204.0 / 255.0


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB in [0, 1]: saturated hues, pastels, darks and greys."""
    h = rng.random()
    s = rng.choice([rng.uniform(0.6, 1.0), rng.uniform(0.1, 0.6), 0.0], p=[0.55, 0.3, 0.15])
    v = rng.uniform(0.25, 1.0)
    k = (h * 6 + np.array([5.0, 3.0, 1.0])) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def _unit(rng: np.random.Generator) -> np.ndarray:
    d = rng.standard_normal(3)
    return d / np.linalg.norm(d)


def _random_part(rng: np.random.Generator, kind: str) -> trimesh.Trimesh:
    c = trimesh.creation
    if kind in ("sphere", "ellipsoid"):
        m = c.icosphere(subdivisions=3, radius=0.5)
        if kind == "ellipsoid":
            m.apply_scale(rng.uniform(0.3, 1.0, 3))
    elif kind == "box":
        m = c.box(extents=rng.uniform(0.15, 1.0, 3))
    elif kind == "cylinder":
        m = c.cylinder(radius=rng.uniform(0.08, 0.5), height=rng.uniform(0.2, 1.0), sections=40)
    elif kind == "cone":
        m = c.cone(radius=rng.uniform(0.15, 0.5), height=rng.uniform(0.3, 1.0), sections=40)
        m.apply_translation(-m.bounds.mean(0))
    elif kind == "torus":
        major = rng.uniform(0.2, 0.45)
        m = c.torus(
            major_radius=major,
            minor_radius=major * rng.uniform(0.15, 0.6),
            major_sections=48,
            minor_sections=20,
        )
    elif kind == "capsule":
        m = c.capsule(height=rng.uniform(0.2, 0.8), radius=rng.uniform(0.08, 0.3), count=[24, 24])
    else:
        raise ValueError(f"unknown part kind {kind!r}; choose from {PART_KINDS}")
    q = rng.standard_normal(4)
    m.apply_transform(trimesh.transformations.quaternion_matrix(q / np.linalg.norm(q)))
    return m


def _pattern_colours(rng: np.random.Generator, points: np.ndarray) -> np.ndarray:
    """RGB ``[N, 3]`` of one random 3D pattern (solid, stripes, checker, dots, gradient, bands)."""
    c1, c2 = _random_colour(rng), _random_colour(rng)
    kind = rng.choice(
        ["solid", "stripes", "checker", "dots", "gradient", "waves"],
        p=[0.35, 0.15, 0.15, 0.1, 0.15, 0.1],
    )
    period = rng.uniform(0.04, 0.3)
    if kind == "solid":
        t = np.zeros(len(points))
    elif kind == "stripes":
        t = ((points @ _unit(rng)) / period % 1.0 < rng.uniform(0.3, 0.7)).astype(float)
    elif kind == "checker":
        t = (np.floor(points / period).sum(1) % 2).astype(float)
    elif kind == "dots":
        cell = points / period
        t = (np.linalg.norm(cell - np.round(cell), axis=1) < rng.uniform(0.2, 0.45)).astype(float)
    elif kind == "gradient":
        s = points @ _unit(rng)
        t = (s - s.min()) / max(np.ptp(s), 1e-9)
    else:
        t = 0.5 + 0.5 * np.sin(points @ _unit(rng) / period * 2 * np.pi + rng.uniform(0, 6.3))
    return c1 * (1 - t[:, None]) + c2 * t[:, None]


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random ``cells x cells`` grid upsampled bicubically."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    img = Image.fromarray(grid).resize((size, size), Image.BICUBIC)
    return np.asarray(img, np.float32) / 255.0


def texture_image(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A random procedural texture uint8 ``[size, size, 3]`` (noise, checker, stripes, blobs)."""
    kind = rng.choice(["noise", "checker", "stripes", "blobs", "patches"])
    yy, xx = np.mgrid[0:size, 0:size] / size
    c1, c2 = _random_colour(rng), _random_colour(rng)
    if kind == "noise":
        t = sum(
            _value_noise(rng, size, int(cells)) * w for cells, w in ((4, 0.5), (12, 0.3), (40, 0.2))
        )
        t = (t - t.min()) / max(np.ptp(t), 1e-6)
    elif kind == "checker":
        n = rng.integers(2, 16)
        t = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(np.float32)
    elif kind == "stripes":
        a = rng.uniform(0, np.pi)
        t = ((np.cos(a) * xx + np.sin(a) * yy) * rng.integers(3, 20) % 1.0 < 0.5).astype(float)
    elif kind == "blobs":
        t = (_value_noise(rng, size, int(rng.integers(4, 16))) > 0.5).astype(np.float32)
    else:  # random rectangles of random colours on c1
        img = np.broadcast_to(c1, (size, size, 3)).copy()
        for _ in range(int(rng.integers(5, 30))):
            x0, y0 = rng.integers(0, size, 2)
            w, h = rng.integers(size // 32, size // 3, 2)
            img[y0 : y0 + h, x0 : x0 + w] = _random_colour(rng)
        return (img * 255).round().astype(np.uint8)
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def random_asset(rng: np.random.Generator) -> trimesh.Trimesh:
    """A random procedural asset in [-0.5, 0.5]^3: a union of 1-4 primitives, coloured by face
    or vertex 3D patterns per part, one UV-mapped procedural texture, or plain grey."""
    n = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.3, 0.2, 0.15]))
    parts = []
    for i in range(n):
        part = _random_part(rng, str(rng.choice(PART_KINDS)))
        part.apply_scale(rng.uniform(0.5, 1.2))
        if i:
            part.apply_translation(rng.uniform(-0.45, 0.45, 3))
        parts.append(part)
    labels = np.concatenate([np.full(len(p.faces), i) for i, p in enumerate(parts)])
    mesh = normalize_mesh(trimesh.util.concatenate(parts))
    verts, faces, src = trimesh.remesh.subdivide_to_size(
        mesh.vertices, mesh.faces, MAX_EDGE, max_iter=12, return_index=True
    )
    labels = labels[src]
    mode = rng.choice(["face", "vertex", "texture", "grey"], p=[0.4, 0.25, 0.25, 0.1])
    out = trimesh.Trimesh(verts, faces, process=False)
    if mode == "texture":
        d = verts - verts.mean(0)
        u = np.arctan2(d[:, 1], d[:, 0]) / (2 * np.pi) + 0.5
        v = np.arccos(np.clip(d[:, 2] / np.maximum(np.linalg.norm(d, axis=1), 1e-9), -1, 1))
        uv = np.stack([u, 1.0 - v / np.pi], 1) * rng.integers(1, 4)
        tex = Image.fromarray(texture_image(rng))
        out.visual = trimesh.visual.TextureVisuals(uv=uv, image=tex)
        return out
    if mode == "grey":
        rgb = np.full((len(faces), 3), GREY)
        out.visual = trimesh.visual.ColorVisuals(out, face_colors=_rgba(rgb))
        return out
    points = verts[faces].mean(1) if mode == "face" else verts
    lab = labels if mode == "face" else _vertex_labels(faces, labels, len(verts))
    rgb = np.zeros((len(points), 3))
    for i in range(n):
        m = lab == i
        if m.any():
            rgb[m] = _pattern_colours(rng, points[m])
    if mode == "face":
        out.visual = trimesh.visual.ColorVisuals(out, face_colors=_rgba(rgb))
    else:
        out.visual = trimesh.visual.ColorVisuals(out, vertex_colors=_rgba(rgb))
    return out


def _vertex_labels(faces: np.ndarray, labels: np.ndarray, num_verts: int) -> np.ndarray:
    out = np.zeros(num_verts, np.int64)
    out[faces.reshape(-1)] = np.repeat(labels, 3)
    return out


def _rgba(rgb: np.ndarray) -> np.ndarray:
    rgba = np.concatenate([np.clip(rgb, 0, 1), np.ones((len(rgb), 1))], 1)
    return (rgba * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Training samples: packed voxels + target renders
# ---------------------------------------------------------------------------------------------


@dataclass
class GSSample:
    """One asset: ``feats [M, 768]`` uint8 (voxel features x 255), ``coords [M, 3]`` int,
    target ``views [V, H, W, 3]`` uint8 (mesh renders on black) from cameras ``w2c [V, 4, 4]``
    and their camera-z ``depth [V, H, W]`` float16 (-1 where empty)."""

    feats: np.ndarray
    coords: np.ndarray
    views: np.ndarray
    w2c: np.ndarray
    depth: np.ndarray | None = None
    fov: float = DEFAULT_FOV
    name: str = ""

    def cameras(self, resolution: int | None = None) -> list[Camera]:
        """The target cameras, optionally at another square resolution."""
        res = resolution or self.views.shape[2]
        return [camera_from_fov(torch.from_numpy(m), self.fov, res) for m in self.w2c]

    def surface_points(self, view: int) -> np.ndarray:
        """World points ``[H, W, 3]`` seen by each target pixel (NaN where empty)."""
        if self.depth is None:
            raise ValueError(f"sample {self.name!r} has no depth maps")
        cam = self.cameras()[view]
        h, w = self.depth.shape[1:]
        z = self.depth[view].astype(np.float64)
        u = (np.arange(w) + 0.5) / w
        v = (np.arange(h) + 0.5) / h
        x = (u[None, :] - cam.cx) / cam.fx * z
        y = (v[:, None] - cam.cy) / cam.fy * z
        pc = np.stack([x, y, z], -1)
        c2w = np.linalg.inv(self.w2c[view].astype(np.float64))
        pw = pc @ c2w[:3, :3].T + c2w[:3, 3]
        return np.where((z >= 0)[..., None], pw, np.nan)

    def save(self, path: str | Path) -> Path:
        """Write an uncompressed .npz."""
        path = Path(path)
        extra = {} if self.depth is None else {"depth": self.depth}
        np.savez(
            path,
            feats=self.feats,
            coords=self.coords,
            views=self.views,
            w2c=self.w2c,
            fov=np.float64(self.fov),
            name=np.str_(self.name),
            **extra,
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> GSSample:
        """Read a sample written by :meth:`save`."""
        with np.load(path) as z:
            depth = z["depth"] if "depth" in z.files else None
            return cls(
                z["feats"],
                z["coords"],
                z["views"],
                z["w2c"],
                depth,
                float(z["fov"]),
                str(z["name"]),
            )


def target_cameras(
    num_views: int, resolution: int, rng: np.random.Generator, *, jitter: float = 0.0
) -> list[Camera]:
    """Orbit cameras (radius 2, fov 40, as ``pipeline3d.eval_cameras``) at random offsets,
    radius jittered by a factor in ``[1 - jitter, 1 + jitter]``."""
    offset = (float(rng.random()), float(rng.random()))
    radius = DEFAULT_RADIUS * float(rng.uniform(1 - jitter, 1 + jitter))
    return orbit_cameras(
        num_views, radius=radius, fov=DEFAULT_FOV, resolution=resolution, offset=offset
    )


def mesh_views(mesh: trimesh.Trimesh, cameras: list[Camera]) -> tuple[np.ndarray, np.ndarray]:
    """Mesh renders on black (as ``pipeline3d.render_mesh_views``), uint8 ``[V, H, W, 3]``, and
    camera-z depth ``[V, H, W]`` float16 (-1 where empty)."""
    rgba, depth = render_views(mesh, cameras)
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = (rgba[..., :3].astype(np.float32) * a).round().astype(np.uint8)
    return rgb, depth.astype(np.float16)


def make_sample(
    mesh: trimesh.Trimesh,
    rng: np.random.Generator,
    *,
    num_targets: int = 8,
    target_resolution: int = 256,
    name: str = "",
) -> GSSample:
    """Pack a normalised mesh into voxels (app defaults) and render target views."""
    feats, coords = mesh_to_voxels(mesh, normalize=False)
    cams = target_cameras(num_targets, target_resolution, rng, jitter=0.1)
    views, depth = mesh_views(mesh, cams)
    return GSSample(
        feats=(feats.numpy() * 255.0).round().astype(np.uint8),
        coords=coords.numpy().astype(np.int16),
        views=views,
        w2c=np.stack([c.w2c.numpy() for c in cams]),
        depth=depth,
        name=name,
    )


def build_dataset(
    folder: str | Path,
    count: int,
    seed: int,
    *,
    num_targets: int = 8,
    target_resolution: int = 256,
    log: Callable[[str], None] | None = print,
) -> list[Path]:
    """Write ``count`` procedural samples ``{seed}_{i}.npz`` into ``folder`` (kept if present)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, t0 = [], time.perf_counter()
    for i in range(count):
        path = folder / f"{seed}_{i:05d}.npz"
        if not path.is_file():
            rng = np.random.default_rng([seed, i])
            sample = make_sample(
                random_asset(rng),
                rng,
                num_targets=num_targets,
                target_resolution=target_resolution,
                name=path.stem,
            )
            sample.save(path.with_suffix(".tmp.npz"))
            path.with_suffix(".tmp.npz").replace(path)
        paths.append(path)
        if log and (i + 1) % 25 == 0:
            log(f"data {folder.name}: {i + 1}/{count} ({time.perf_counter() - t0:.0f} s)")
    return paths


# ---------------------------------------------------------------------------------------------
# The decoder, its losses and the training loop
# ---------------------------------------------------------------------------------------------

TINY_GS_NAME = "atoken-tiny-gs"


def tiny_gs_config(
    channels: int = 128, num_blocks: int = 4, num_gaussians: int = 8
) -> GSDecoderConfig:
    """Our small decoder: the official architecture, narrower and shallower, fewer Gaussians."""
    return GSDecoderConfig(
        channels=channels,
        num_blocks=num_blocks,
        num_heads=channels // 32,
        mlp_channels=channels * 4,
        window_size=8,
        softcap=0.0,  # no soft cap: plain SDPA windows (3x faster on CPU than the capped path)
        num_gaussians=num_gaussians,
        name=TINY_GS_NAME,
    )


def init_gs_decoder(decoder: GaussianDecoder, *, scale: float = 1.0, opacity: float = 0.9):
    """Start from visible Gaussians: a small head, opacity ``opacity`` and ``scale`` x the
    spacing of ``num_gaussians`` points in a voxel (instead of the official 0.1 / 4e-3 biases)."""
    cfg, g = decoder.config, decoder.config.num_gaussians
    spacing = 1.0 / cfg.resolution / g ** (1 / 3)
    with torch.no_grad():
        decoder.out_layer.weight.normal_(0.0, 1e-3)
        bias = decoder.out_layer.bias
        bias.zero_()
        sl = slice(6 * g, 9 * g)  # raw scaling (after xyz, features_dc)
        inv = inverse_softplus_t(torch.tensor(scale * spacing))
        bias[sl] = (inv - inverse_softplus_t(torch.tensor(cfg.scaling_bias))) / cfg.lr["_scaling"]
        ob = cfg.opacity_bias
        logit = math.log(opacity / (1 - opacity)) - math.log(ob / (1 - ob))
        bias[13 * g :] = logit / cfg.lr["_opacity"]


def inverse_softplus_t(x: Tensor) -> Tensor:
    """Inverse of softplus for tensors."""
    return x + torch.log(-torch.expm1(-x))


def ssim_map_loss(x: Tensor, y: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """``1 - SSIM`` of images ``[B, 3, H, W]`` in [0, 1] (Gaussian window, differentiable)."""
    coords = torch.arange(window, dtype=x.dtype, device=x.device) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, groups=x.shape[1])

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return 1.0 - s.mean()


def augment_features(
    feats: Tensor, generator: torch.Generator, *, noise: float = 0.1, blur_prob: float = 0.5
) -> Tensor:
    """Simulate AToken reconstruction error on ``[M, 768]`` features in [-1, 1]: random patch
    blur (2x or 4x box down/up-sampling of the 16x16 patch) and Gaussian noise of random std."""
    m = feats.shape[0]
    if blur_prob > 0 and float(torch.rand((), generator=generator)) < blur_prob:
        f = int(2 ** int(torch.randint(1, 3, (), generator=generator)))
        p = feats.reshape(m, 16, 16, 3).permute(0, 3, 1, 2)
        p = F.interpolate(F.avg_pool2d(p, f), scale_factor=f, mode="bilinear", align_corners=False)
        feats = p.permute(0, 2, 3, 1).reshape(m, -1)
    if noise > 0:
        std = float(torch.rand((), generator=generator)) * noise
        feats = feats + torch.randn(feats.shape, generator=generator) * std
    return feats


def sample_input(sample: GSSample) -> SparseTensor:
    """Decoder input of a sample: features mapped to [-1, 1], coords ``(0, x, y, z)``."""
    feats = torch.from_numpy(sample.feats).float() / 255.0 * 2.0 - 1.0
    coords = torch.from_numpy(sample.coords.astype(np.int32))
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1)
    return SparseTensor(feats, coords)


def downsample_views(views: np.ndarray, resolution: int) -> Tensor:
    """uint8 ``[V, H, W, 3]`` -> float ``[V, 3, r, r]`` in [0, 1] by area averaging."""
    t = torch.from_numpy(views).permute(0, 3, 1, 2).float() / 255.0
    if t.shape[-1] == resolution:
        return t
    return F.interpolate(t, size=(resolution, resolution), mode="area")


@dataclass
class GSTrainConfig:
    """Hyper-parameters of :func:`train_gs_decoder`."""

    steps: int = 2000
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    views_per_step: int = 2
    resolution: int = 128
    k: int = DEFAULT_K
    crop_voxels: int | None = 5000
    ssim_weight: float = 0.2
    colour_weight: float = 0.5  # voxel colour term, fading linearly to 0 over the run
    noise: float = 0.1
    blur_prob: float = 0.5
    seed: int = 0
    log_every: int = 25
    time_limit_s: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain-dict form."""
        return asdict(self)


def render_loss(
    decoder: GaussianDecoder,
    x: SparseTensor,
    targets: Tensor,
    cameras: list[Camera],
    *,
    mask: Tensor | None = None,
    k: int = DEFAULT_K,
    ssim_weight: float = 0.2,
    colour_targets: tuple[Tensor, Tensor] | None = None,
    colour_weight: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """L1 (+ ``ssim_weight`` x (1 - SSIM)) between renders of the decoded Gaussians (one asset)
    and ``targets [V, 3, H, W]`` from ``cameras``, over the pixels of ``mask [V, 1, H, W]``;
    plus ``colour_weight`` x the L1 between each voxel's Gaussian colours and
    ``colour_targets = (rgb [M, 3], valid [M])`` (see :func:`voxel_colours`)."""
    (gaussians,) = decoder(x)
    renders = torch.stack(
        [render_differentiable(gaussians, cam, k=k).image.permute(2, 0, 1) for cam in cameras]
    )
    if mask is None:
        mask = torch.ones_like(targets[:, :1])
    renders, targets = renders * mask, targets * mask
    l1 = (renders - targets).abs().sum() / (3 * mask.sum()).clamp_min(1.0)
    loss = l1
    stats = {"l1": float(l1.detach()), "coverage": float(mask.mean())}
    if ssim_weight > 0:
        ds = ssim_map_loss(renders.clamp(0, 1), targets)
        loss = loss + ssim_weight * ds
        stats["ssim"] = 1.0 - float(ds.detach())
    if colour_targets is not None and colour_weight > 0 and bool(colour_targets[1].any()):
        rgb, valid = colour_targets
        g = decoder.config.num_gaussians
        colours = gaussians.colors.reshape(-1, g, 3)[valid]
        dc = (colours - rgb[valid][:, None]).abs().mean()
        loss = loss + colour_weight * dc
        stats["colour_l1"] = float(dc.detach())
    stats["loss"] = float(loss.detach())
    return loss, stats


def voxel_colours(
    sample: GSSample, coords_xyz: Tensor, views: Sequence[int], tolerance: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Colour each voxel shows in the target views: ``(rgb [M, 3] in [0, 1], valid [M])``.

    A voxel centre counts as seen in a view when the depth map at its pixel is within
    ``tolerance`` voxel sizes of its camera z; its colour is the mean over those views.
    """
    if sample.depth is None:
        raise ValueError(f"sample {sample.name!r} has no depth maps")
    centres = (coords_xyz.double().numpy() + 0.5) / GRID - 0.5
    total = np.zeros((len(centres), 3))
    hits = np.zeros(len(centres))
    h, w = sample.depth.shape[1:]
    for v, cam in zip(views, (sample.cameras()[i] for i in views)):
        w2c = sample.w2c[v].astype(np.float64)
        pc = centres @ w2c[:3, :3].T + w2c[:3, 3]
        z = pc[:, 2]
        q = np.floor((cam.fx * pc[:, 0] / z + cam.cx) * w).astype(np.int64)
        r = np.floor((cam.fy * pc[:, 1] / z + cam.cy) * h).astype(np.int64)
        inside = (q >= 0) & (q < w) & (r >= 0) & (r < h) & (z > 0)
        d = np.full(len(z), -1.0)
        d[inside] = sample.depth[v][r[inside], q[inside]]
        seen = inside & (d >= 0) & (np.abs(d - z) <= tolerance / GRID)
        total[seen] += sample.views[v][r[seen], q[seen]] / 255.0
        hits += seen
    valid = hits > 0
    rgb = np.where(valid[:, None], total / np.maximum(hits, 1)[:, None], 0.0)
    return torch.from_numpy(rgb).float(), torch.from_numpy(valid)


def crop_voxels(
    coords: Tensor, count: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, int]:
    """A random cube of about ``count`` voxels: ``(keep mask [M], centre [3], half size)``.

    The cube is centred on a random voxel and grown (Chebyshev distance) until it holds
    ``count`` voxels.
    """
    c = coords.long()
    centre = c[int(torch.randint(len(c), (), generator=generator))]
    dist = (c - centre).abs().amax(1)
    radius = int(torch.kthvalue(dist, min(count, len(c))).values)
    return dist <= radius, centre, radius


def crop_mask(
    sample: GSSample,
    views: Sequence[int],
    centre: Tensor,
    radius: int,
    resolution: int,
    margin: float = 1.5,
) -> Tensor:
    """Pixels whose target is explained by a crop: background, or a surface point inside the
    cube shrunk by ``margin`` voxels. ``[V, 1, r, r]`` float, min-pooled to ``resolution``."""
    res = sample.views.shape[1]
    out = []
    for v in views:
        p = sample.surface_points(v)
        g = (p + 0.5) * GRID - 0.5  # voxel units (centres at integers)
        inside = np.abs(g - centre.numpy()).max(-1) <= radius - margin
        out.append(np.where(np.isnan(p[..., 0]), True, inside))
    m = torch.from_numpy(np.stack(out)).float()[:, None]
    if res != resolution:
        m = -F.adaptive_max_pool2d(-m, resolution)
    return m


@contextlib.contextmanager
def training_attention():
    """Run attention with the ``bucketed`` backend inside the block (same maths as SDPA, fast
    backward over hundreds of uneven windows)."""
    with attention_backend("bucketed"):
        yield


def lr_at(progress: float, cfg: GSTrainConfig, step: int) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine to ``min_lr_ratio`` over
    ``progress`` in [0, 1] (the larger of the step and time fractions)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, max(0.0, progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train_gs_decoder(
    decoder: GaussianDecoder,
    samples: Sequence[Path | GSSample],
    cfg: GSTrainConfig,
    *,
    inputs: Callable[[GSSample, int], SparseTensor] | None = None,
    log: Callable[[str], None] | None = print,
    callback: Callable[[int, GaussianDecoder], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``decoder`` in place on samples (paths are loaded lazily); returns per-step stats.

    ``inputs(sample, index)`` may replace the decoder input (e.g. AToken reconstructions of the
    sample's voxels); by default the ground-truth features with :func:`augment_features`.
    With ``cfg.time_limit_s`` the run stops at that wall time and the cosine schedule follows
    the larger of the step and time fractions. ``callback(step, decoder)`` runs after each step.
    """
    if not samples:
        raise ValueError("train_gs_decoder needs at least one sample")
    decoder.train()
    opt = torch.optim.AdamW(
        decoder.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    history, t0 = [], time.perf_counter()
    for step in range(cfg.steps):
        if cfg.time_limit_s is not None and time.perf_counter() - t0 > cfg.time_limit_s:
            if log:
                log(f"time limit {cfg.time_limit_s:.0f} s reached at step {step}")
            break
        i = int(rng.integers(len(samples)))
        sample = samples[i] if isinstance(samples[i], GSSample) else GSSample.load(samples[i])
        x = inputs(sample, i) if inputs is not None else sample_input(sample)
        views = rng.choice(
            len(sample.views), size=min(cfg.views_per_step, len(sample.views)), replace=False
        )
        mask = None
        if cfg.crop_voxels and len(x) > cfg.crop_voxels and sample.depth is not None:
            keep, centre, radius = crop_voxels(x.coords[:, 1:], cfg.crop_voxels, gen)
            x = SparseTensor(x.feats[keep], x.coords[keep])
            mask = crop_mask(sample, views, centre, radius, cfg.resolution)
        if inputs is None:
            feats = augment_features(x.feats, gen, noise=cfg.noise, blur_prob=cfg.blur_prob)
            x = SparseTensor(feats, x.coords)
        cams = sample.cameras(cfg.resolution)
        targets = downsample_views(sample.views[views], cfg.resolution)
        elapsed = time.perf_counter() - t0
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        if cfg.time_limit_s:
            progress = max(progress, elapsed / cfg.time_limit_s)
        lr = lr_at(progress, cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        colour_weight = cfg.colour_weight * max(0.0, 1.0 - progress)
        colours = None
        if colour_weight > 0 and sample.depth is not None:
            colours = voxel_colours(sample, x.coords[:, 1:], range(len(sample.views)))
        with training_attention():
            loss, stats = render_loss(
                decoder,
                x,
                targets,
                [cams[v] for v in views],
                mask=mask,
                k=cfg.k,
                ssim_weight=cfg.ssim_weight,
                colour_targets=colours,
                colour_weight=colour_weight,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
        stats["grad_norm"] = float(
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), cfg.grad_clip)
        )
        opt.step()
        stats.update(step=step, seconds=time.perf_counter() - t0, voxels=len(x), lr=lr)
        history.append(stats)
        if log and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            recent = history[-cfg.log_every :]
            mean = {k: float(np.mean([h[k] for h in recent])) for k in ("loss", "l1")}
            log(
                f"step {step} loss {mean['loss']:.4f} l1 {mean['l1']:.4f} "
                f"lr {lr:.2e} {stats['seconds']:.0f} s"
            )
        if callback is not None:
            callback(step, decoder)
    decoder.eval()
    return history


# ---------------------------------------------------------------------------------------------
# Evaluation and the checkpoint
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_samples(
    decoder: GaussianDecoder, samples: Sequence[Path | GSSample], *, num_views: int = 4
) -> dict[str, float]:
    """Mean PSNR / SSIM (``pipeline3d.view_metrics``) of the official-rule renders
    (``render_gaussians``) of decoded ground-truth voxels vs the samples' mesh renders."""
    from atoken.pipelines.reconstruct3d import render_gaussian_views, view_metrics

    decoder.eval()
    scores = []
    for s in samples:
        sample = s if isinstance(s, GSSample) else GSSample.load(s)
        (gaussians,) = decoder(sample_input(sample))
        cams = sample.cameras()[:num_views]
        scores.append(
            view_metrics(sample.views[:num_views], render_gaussian_views(gaussians, cams))
        )
    return {k: float(np.mean([s[k] for s in scores])) for k in ("psnr", "ssim")}


def save_gs_decoder(
    decoder: GaussianDecoder, path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write the decoder as safetensors with its config under ``gs_config`` (read back by
    ``atoken.load_gaussian_decoder(path, None)``)."""
    meta = {"gs_config": json.dumps(decoder.config.to_dict()), **(metadata or {})}
    return save_checkpoint(decoder, path, meta)


@torch.no_grad()
def evaluate_meshes(
    decoder: GaussianDecoder,
    paths: Sequence[str | Path],
    *,
    model=None,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """PSNR / SSIM per mesh file with the app's protocol (``pipeline3d``): voxels from
    ``mesh_to_voxels`` at its defaults, decoded straight (``model=None``: ground-truth features)
    or after an AToken round trip (``model``), rendered from ``eval_cameras()`` and compared with
    the mesh renders."""
    from atoken.core.patchify import gs_input
    from atoken.pipelines.reconstruct3d import (
        encode_voxels,
        eval_cameras,
        render_gaussian_views,
        render_mesh_views,
        view_metrics,
    )
    from atoken.threed.mesh import load_mesh

    decoder.eval()
    out = {}
    for path in paths:
        mesh = load_mesh(path)
        feats, coords = mesh_to_voxels(mesh, normalize=False)
        if model is None:
            b = torch.zeros(len(coords), 1, dtype=torch.int32)
            x = SparseTensor(feats * 2.0 - 1.0, torch.cat([b, coords.int()], 1))
        else:
            x = gs_input(encode_voxels(model, feats, coords)[2])
        (gaussians,) = decoder(x)
        cams = eval_cameras()
        scores = view_metrics(render_mesh_views(mesh, cams), render_gaussian_views(gaussians, cams))
        out[Path(path).name] = {**scores, "voxels": int(len(coords))}
        if log:
            log(f"{Path(path).name}: {scores}")
    return out
