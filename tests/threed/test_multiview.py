"""Multiview packing against the official golden cases (exact) and the packing rules."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from atoken.core.cameras import camera_from_fov, look_at
from atoken.threed import multiview as mv

CASES = ["sphere16_256", "box8_512"]


@pytest.fixture(scope="module")
def packed():
    """Pack each golden case once: (expected, feats, coords, images, depths, cameras)."""
    out = {}
    for case in CASES:
        d = Path(__file__).parents[1] / "golden" / "multiview" / case
        exp = load_file(str(d / "expected.safetensors"))
        feats, coords = mv.pack_views(d / "input")
        out[case] = (exp, feats, coords, *mv.load_views(d / "input"))
    return out


@pytest.mark.parametrize("case", CASES)
def test_golden_coords_and_feats_exact(packed, case):
    exp, feats, coords, *_ = packed[case]
    assert coords.dtype == torch.int32 and feats.dtype == torch.float32
    assert np.array_equal(coords.numpy(), exp["coords"])
    assert np.array_equal(feats.numpy(), exp["feats_f32"])
    assert np.array_equal(feats.numpy().astype(np.float16), exp["feats_f16"])


@pytest.mark.parametrize("case", CASES)
def test_golden_diagnostics(packed, case):
    exp, _, coords, images, _, cameras = packed[case]
    view, uv = mv.nearest_views(coords, cameras)
    assert np.array_equal(view.numpy(), exp["diag/nearest_view"])
    np.testing.assert_allclose(uv.numpy(), exp["diag/nearest_uv"], rtol=0, atol=1e-5)
    rowcol, inside = mv.patch_indices(uv)
    rowcol[~inside] = -1
    assert np.array_equal(rowcol.numpy(), exp["diag/patch_rowcol"])
    assert np.array_equal(mv.preprocess_view(images[0]).numpy(), exp["diag/view0_processed_u8"])


def test_golden_capped_with_global_seed(golden_dir):
    d = golden_dir / "multiview" / "sphere16_256"
    exp = load_file(str(d / "expected.safetensors"))
    torch.manual_seed(1234)
    feats, coords = mv.pack_views(d / "input", max_points=40_000)
    assert np.array_equal(coords.numpy(), exp["capped/coords"])
    assert np.array_equal(feats.numpy(), exp["feats_f32"][exp["capped/rows"]])
    # The same draw through an explicit generator.
    gen = torch.Generator().manual_seed(1234)
    feats2, coords2 = mv.pack_views(d / "input", max_points=40_000, generator=gen)
    assert torch.equal(coords2, coords) and torch.equal(feats2, feats)


def test_exr_depth_matches_official_npy(golden_dir):
    pytest.importorskip("OpenEXR", reason="the EXR path needs the openexr package")
    d = golden_dir / "multiview" / "sphere16_256" / "input"
    depth = mv.read_exr_depth(d / "000_depth.exr")
    assert depth.dtype == np.float16
    assert np.array_equal(depth, np.load(d / "000_depth.npy"))


def test_pack_views_reads_exr_when_npy_missing(golden_dir, tmp_path):
    pytest.importorskip("OpenEXR", reason="the EXR path needs the openexr package")
    src = golden_dir / "multiview" / "sphere16_256" / "input"
    meta = json.loads((src / "transforms.json").read_text())
    meta["frames"] = meta["frames"][:2]
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    for name in ["000.png", "000_depth.exr", "001.png", "001_depth.npy"]:
        shutil.copy(src / name, tmp_path / name)
    feats, coords = mv.pack_views(tmp_path)
    images, depths, cameras = mv.load_views(src)
    ref_feats, ref_coords = mv.pack_arrays(images[:2], depths[:2], cameras[:2])
    assert torch.equal(coords, ref_coords) and torch.equal(feats, ref_feats)


def test_layout_errors(tmp_path, golden_dir):
    with pytest.raises(ValueError, match="transforms.json"):
        mv.pack_views(tmp_path)
    src = golden_dir / "multiview" / "sphere16_256" / "input"
    meta = json.loads((src / "transforms.json").read_text())
    meta["frames"] = meta["frames"][:1]
    meta["frames"][0]["file_path"] = "view0.png"
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="file_path"):
        mv.pack_views(tmp_path)
    meta["frames"][0]["file_path"] = "000.png"
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    shutil.copy(src / "000.png", tmp_path / "000.png")
    with pytest.raises(ValueError, match="000_depth"):
        mv.pack_views(tmp_path)


def test_pack_arrays_argument_errors():
    cam = camera_from_fov(
        look_at(torch.tensor([0.0, 0, 2]), torch.zeros(3), torch.tensor([0.0, 1, 0])), 0.7, 8
    )
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="disagree"):
        mv.pack_arrays([img, img], [np.zeros((8, 8))], [cam])
    with pytest.raises(ValueError, match="uint8"):
        mv.pack_arrays([img.astype(np.float32)], [np.zeros((8, 8))], [cam])
    with pytest.raises(ValueError, match="between 1 and"):
        mv.pack_arrays([], [], [])


def test_closed_box_boundary_marks_both_neighbours():
    # x exactly on the face between voxels 40 and 41; y and z strictly inside voxel 10 / 20.
    face = -0.5 + 41 / 64
    y, z = -0.5 + 10.5 / 64, -0.5 + 20.25 / 64
    coords = mv.occupied_voxels(torch.tensor([[face, y, z]]))
    assert coords.tolist() == [[40, 10, 20], [41, 10, 20]]
    # A corner point marks all 8 voxels around it; points outside the cube mark nothing.
    corner = -0.5 + 32 / 64
    coords = mv.occupied_voxels(torch.tensor([[corner, corner, corner], [0.6, 0.0, 0.0]]))
    assert coords.tolist() == [[i, j, k] for i in (31, 32) for j in (31, 32) for k in (31, 32)]
    # The outer faces of the cube are closed too: -0.5 occupies voxel 0 only.
    assert mv.occupied_voxels(torch.tensor([[-0.5, y, z]])).tolist() == [[0, 10, 20]]
    assert mv.occupied_voxels(torch.tensor([[0.5, y, z]])).tolist() == [[63, 10, 20]]
    assert len(mv.occupied_voxels(torch.tensor([[math.nan, y, z], [0.51, y, z]]))) == 0


def test_occupancy_matches_brute_force_closed_box():
    # Points in [-0.1, 0.1]^3 (a third of them on exact voxel faces) against every voxel near it.
    gen = torch.Generator().manual_seed(0)
    pts = (torch.rand(3000, 3, generator=gen) - 0.5) * 0.2
    pts[:1000, 0] = torch.randint(26, 39, (1000,), generator=gen) / 64 - 0.5
    coords = mv.occupied_voxels(pts)
    near = torch.cartesian_prod(*[torch.arange(24, 41)] * 3)
    centres = mv.voxel_centres(near)
    hit = ((centres[:, None] - pts[None]).abs() <= 1 / 128).all(-1).any(1)
    assert torch.equal(coords, near[hit].int())
    assert int(hit.sum()) > len(pts) // 2


def test_patch_index_is_round_15u_not_floor_16u():
    uv = torch.tensor([[0.0, 0.0], [0.05, 0.5], [1 / 30 - 1e-4, 0.5], [1.04, 0.5], [-0.04, 0.5]])
    rowcol, inside = mv.patch_indices(uv)
    assert rowcol[:3, 1].tolist() == [0, 1, 0]  # floor(16 * 0.05) would be 0
    assert rowcol[1, 0].item() == 8  # round(7.5) = 8 (half to even)
    assert inside.tolist() == [True, True, True, False, False]


def test_pack_arrays_plane_feats_from_nearest_view():
    # A flat square in the middle of voxel layer k = 40, seen from above by two cameras at
    # different heights: every voxel takes the lower camera's (red) patch, and voxels that only
    # the higher camera saw, outside the red view, get all-zero rows (no frustum test).
    up = torch.tensor([0.0, 1.0, 0.0])
    z0, size = -0.5 + 40.5 / 64, 64
    cams = [
        camera_from_fov(
            look_at(torch.tensor([0.0, 0, z0 + h]), torch.tensor([0.0, 0, z0]), up), 0.6, size
        )
        for h in (0.6, 0.9)
    ]
    images, depths = [], []
    for colour, h in zip([(200, 10, 10), (10, 200, 10)], (0.6, 0.9)):
        img = np.zeros((size, size, 4), np.uint8)
        img[..., :3] = colour
        img[..., 3] = 255
        images.append(img)
        depths.append(np.full((size, size), h, np.float32))
    feats, coords = mv.pack_arrays(images, depths, cams)
    assert len(coords) > 100 and (coords[:, 2] == 40).all()
    centres = mv.voxel_centres(coords)
    f = cams[0].fx
    col = torch.round(15 * (f * centres[:, 0] / 0.6 + 0.5))
    row = torch.round(15 * (-f * centres[:, 1] / 0.6 + 0.5))
    inside = (col >= 0) & (col <= 15) & (row >= 0) & (row <= 15)
    assert 0 < int(inside.sum()) < len(coords)
    red = (torch.tensor([200, 10, 10]).repeat(256) / 255.0).float()
    assert torch.equal(feats[inside], red.expand(int(inside.sum()), 768))
    assert (feats[~inside] == 0).all()


def test_pil_and_array_views_agree():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (96, 96, 4), dtype=np.uint8)
    a = mv.preprocess_view(arr)
    b = mv.preprocess_view(Image.fromarray(arr, "RGBA"))
    assert a.shape == (256, 256, 3) and torch.equal(a, b)
    # 256 px RGBA: alpha dropped, RGB used as stored.
    arr256 = rng.integers(0, 256, (256, 256, 4), dtype=np.uint8)
    assert np.array_equal(mv.preprocess_view(arr256).numpy(), arr256[..., :3])
