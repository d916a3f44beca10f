"""The 3D chain on every example asset: mesh -> voxels -> tokens -> Gaussians -> .ply -> re-read."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

import atoken
from atoken.core.gaussians import Gaussians
from atoken.pipelines.reconstruct3d import reconstruct_asset, view_metrics

from ..conftest import GOLDEN

ROOT = Path(__file__).resolve().parents[2]
ASSETS = sorted(
    p
    for p in (ROOT / "assets/meshes").iterdir()
    if p.suffix in {".glb", ".ply", ".stl", ".obj", ".off"}
)
PLY_FIELDS = [
    "x",
    "y",
    "z",
    "nx",
    "ny",
    "nz",
    "f_dc_0",
    "f_dc_1",
    "f_dc_2",
    "opacity",
    "scale_0",
    "scale_1",
    "scale_2",
    "rot_0",
    "rot_1",
    "rot_2",
    "rot_3",
]


@pytest.fixture(scope="module")
def models():
    model = atoken.load(GOLDEN / "weights/tiny_c.safetensors", "tiny-c")
    gs = atoken.load_gaussian_decoder(GOLDEN / "weights/tiny_gs.safetensors", "tiny-gs")
    return model, gs


def ply_header(path: Path) -> list[str]:
    with open(path, "rb") as f:
        head = f.read(2048).split(b"end_header")[0].decode()
    return [line.split()[-1] for line in head.splitlines() if line.startswith("property")]


@pytest.mark.parametrize("asset", ASSETS, ids=[p.name for p in ASSETS])
def test_chain_on_example_asset(asset, models, tmp_path):
    model, gs = models
    t = time.perf_counter()
    res = reconstruct_asset(model, gs, asset, tmp_path / "out.ply", metrics=False)
    elapsed = time.perf_counter() - t
    assert elapsed < 60, f"{asset.name}: {elapsed:.1f} s"
    assert ply_header(res.ply) == PLY_FIELDS
    back = Gaussians.load_ply(res.ply)
    assert len(back) == res.num_gaussians == 32 * res.num_voxels > 0
    assert torch.allclose(back.xyz, res.gaussians.xyz, atol=1e-6)
    assert torch.allclose(back.opacity, res.gaussians.opacity, atol=1e-5)
    assert torch.allclose(back.scaling, res.gaussians.scaling, rtol=1e-5)
    assert back.xyz.abs().max() <= 0.5 + 0.75 / 64 + 1e-6  # inside the voxel grid (+ offset)
    assert res.input_glb.stat().st_size > 0
    assert res.pooled.shape == (1, 96)


def test_metrics_and_turntable(models, tmp_path):
    model, _ = models
    # a decoder whose head is zero: every Gaussian is small (0.004), grey and 10% opaque, so the
    # renders are cheap and their content known
    gs = atoken.load_gaussian_decoder(None, "tiny-gs")
    torch.nn.init.zeros_(gs.out_layer.weight)
    torch.nn.init.zeros_(gs.out_layer.bias)
    import trimesh

    rod = trimesh.creation.box((1.0, 0.08, 0.08))  # a thin rod: few voxels, quick renders
    rod.visual.face_colors = [200, 60, 40, 255]
    rod.export(tmp_path / "rod.ply")
    res = reconstruct_asset(
        model,
        gs,
        tmp_path / "rod.ply",
        tmp_path / "t.ply",
        turntable=tmp_path / "spin.mp4",
        turntable_frames=2,
        num_views=8,
        resolution=256,
    )
    assert res.num_voxels < 2000
    assert 0 < res.metrics["psnr"] < 60 and -1 <= res.metrics["ssim"] <= 1
    from atoken.io.media import probe_video

    info = probe_video(res.turntable)
    assert info.num_frames == 2 and info.width > info.height  # mesh | Gaussians side by side
    assert torch.allclose(res.gaussians.colors, torch.full((1, 3), 0.5))
    assert torch.allclose(res.gaussians.opacity, torch.full((1, 1), 0.1))


def test_view_metrics_formula():
    a = np.zeros((2, 16, 16, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 255
    m = view_metrics(a, b)
    mse = 255**2 / (16 * 16 * 3)
    # the identical second view (PSNR inf) is left out of the mean
    assert m["psnr"] == pytest.approx(10 * np.log10(255**2 / mse))
    assert m["ssim"] < 1
