"""3D end to end: mesh -> multiview voxels -> AToken tokens -> Gaussians -> .ply, renders, metrics.

Metrics follow the spirit of the paper's Toys4k protocol: the reconstructed Gaussians and the
input mesh are rendered from the same held-out orbit cameras (black background) and compared
with PSNR / SSIM per view, averaged. The mesh renders use the same shading as the views the
voxel features were packed from, so a perfect tokenizer + Gaussian decoder would score high.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import trimesh
from torch import Tensor

from atoken.core.cameras import Camera, orbit_cameras, turntable_cameras
from atoken.core.gaussians import Gaussians
from atoken.core.gs_decoder import GaussianDecoder
from atoken.core.model import ATokenModel
from atoken.core.patchify import gs_input, tokenize_3d
from atoken.core.sparse import SparseTensor
from atoken.io.media import VideoWriter, side_by_side
from atoken.pipelines.metrics import psnr, ssim
from atoken.pipelines.reconstruct import choose_latent
from atoken.threed.mesh import load_mesh, mesh_to_glb
from atoken.threed.mesh_render import (
    DEFAULT_RESOLUTION,
    DEFAULT_VIEWS,
    mesh_to_voxels,
    render_views,
)
from atoken.threed.rasterize import render_gaussians

EVAL_VIEWS = 4
EVAL_RESOLUTION = 256
TURNTABLE_FRAMES = 24
TURNTABLE_RESOLUTION = 256
Progress = Callable[[int, int, str], None]


@dataclass
class AssetResult:
    """Everything a 3D reconstruction produced."""

    ply: Path
    input_glb: Path
    turntable: Path | None
    metrics: dict[str, float]
    pooled: Tensor  # [1, C]
    gaussians: Gaussians
    latent: SparseTensor
    feats768: Tensor
    coords_xyz: Tensor
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_voxels(self) -> int:
        """Occupied voxels of the 64^3 grid."""
        return int(self.coords_xyz.shape[0])

    @property
    def num_gaussians(self) -> int:
        """Gaussians written to the .ply."""
        return len(self.gaussians)

    def summary(self) -> dict:
        """Numbers for printing / JSON."""
        return {
            "voxels": self.num_voxels,
            "gaussians": self.num_gaussians,
            **self.metrics,
            "seconds": {k: round(v, 2) for k, v in self.timings.items()},
            "ply": str(self.ply),
            "turntable": str(self.turntable) if self.turntable else None,
        }


def eval_cameras(num_views: int = EVAL_VIEWS, resolution: int = EVAL_RESOLUTION) -> list[Camera]:
    """Held-out orbit cameras for metrics (offset from the packing cameras)."""
    return orbit_cameras(
        num_views, radius=2.0, fov=math.radians(40.0), resolution=resolution, offset=(0.37, 0.29)
    )


def render_gaussian_views(gaussians: Gaussians, cameras: list[Camera]) -> np.ndarray:
    """uint8 ``[V, H, W, 3]`` renders of Gaussians on black."""
    out = []
    for cam in cameras:
        img = render_gaussians(gaussians, cam).image
        out.append((img.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
    return np.stack(out)


def render_mesh_views(mesh, cameras: list[Camera]) -> np.ndarray:
    """uint8 ``[V, H, W, 3]`` renders of the mesh on black."""
    rgba, _ = render_views(mesh, cameras)
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return (rgba[..., :3].astype(np.float32) * a).round().astype(np.uint8)


def view_metrics(reference: np.ndarray, rendered: np.ndarray) -> dict[str, float]:
    """Mean PSNR / SSIM over views (uint8 arrays ``[V, H, W, 3]``)."""
    p = [psnr(a, b, data_range=255) for a, b in zip(reference, rendered)]
    s = [ssim(a, b, data_range=255) for a, b in zip(reference, rendered)]
    finite = [v for v in p if math.isfinite(v)] or [float("inf")]
    return {"psnr": float(np.mean(finite)), "ssim": float(np.mean(s))}


@torch.no_grad()
def encode_voxels(
    model: ATokenModel, feats768, coords_xyz, *, mode: str = "auto", seed: int | None = None
):
    """Voxel features -> (encoded, latent, decoded tokens)."""
    x = tokenize_3d(feats768, coords_xyz)
    enc = model.encode(x)
    latent, _, _ = choose_latent(model, enc, mode, seed=seed)
    return enc, latent, model.decode(latent)


@torch.no_grad()
def reconstruct_asset(
    model: ATokenModel,
    gs_decoder: GaussianDecoder,
    mesh_path: str | Path | trimesh.Trimesh,
    out_ply: str | Path,
    *,
    num_views: int | None = None,
    resolution: int | None = None,
    turntable: str | Path | None = None,
    turntable_frames: int = TURNTABLE_FRAMES,
    mode: str = "auto",
    seed: int | None = None,
    metrics: bool = True,
    eval_views: int = EVAL_VIEWS,
    eval_resolution: int = EVAL_RESOLUTION,
    progress: Progress | None = None,
) -> AssetResult:
    """Mesh file -> Gaussians (.ply), an input .glb preview, optional turntable mp4, metrics.

    The .ply (3DGS y-down convention) and the .glb (glTF's y up) hold the object in the same
    normalised box and pose; ``AssetResult.gaussians`` stays in the pipeline's Z-up frame.

    ``mesh_path`` may also be a mesh already loaded with ``load_mesh`` (with its own limits)."""
    times: dict[str, float] = {}
    steps = 5 + bool(metrics) + bool(turntable)
    step = 0

    def tick(name: str, t0: float) -> float:
        nonlocal step
        times[name] = time.perf_counter() - t0
        step += 1
        if progress:
            progress(step, steps, name)
        return time.perf_counter()

    t = time.perf_counter()
    out_ply = Path(out_ply)
    out_ply.parent.mkdir(parents=True, exist_ok=True)
    mesh = mesh_path if isinstance(mesh_path, trimesh.Trimesh) else load_mesh(mesh_path)
    input_glb = mesh_to_glb(mesh, out_ply.with_name(out_ply.stem + "_input.glb"))
    t = tick("load", t)
    feats, coords = mesh_to_voxels(
        mesh,
        num_views=num_views or DEFAULT_VIEWS,
        resolution=resolution or DEFAULT_RESOLUTION,
        normalize=False,
    )
    t = tick("render_and_pack", t)
    enc, latent, rec = encode_voxels(model, feats, coords, mode=mode, seed=seed)
    t = tick("tokenize", t)
    (gaussians,) = gs_decoder(gs_input(rec))
    gaussians = gaussians.to("cpu")
    t = tick("gaussians", t)
    # 3DGS's y-down convention: a splat viewer shows it in the pose a glTF viewer shows input_glb
    gaussians.save_ply(out_ply, frame="y-down")
    t = tick("save", t)
    scores: dict[str, float] = {}
    if metrics:
        cams = eval_cameras(eval_views, eval_resolution)
        scores = view_metrics(render_mesh_views(mesh, cams), render_gaussian_views(gaussians, cams))
        t = tick("metrics", t)
    video = None
    if turntable:
        cams = turntable_cameras(turntable_frames, resolution=TURNTABLE_RESOLUTION)
        ref, rec_views = render_mesh_views(mesh, cams), render_gaussian_views(gaussians, cams)
        video = Path(turntable)
        with VideoWriter(video, fps=12) as w:
            for a, b in zip(ref, rec_views):
                w.write(side_by_side(a, b))
        t = tick("turntable", t)
    return AssetResult(
        ply=out_ply,
        input_glb=input_glb,
        turntable=video,
        metrics=scores,
        pooled=enc.pooled.cpu(),
        gaussians=gaussians,
        latent=latent,
        feats768=feats,
        coords_xyz=coords,
        timings=times,
    )
