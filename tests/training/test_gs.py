"""Tests for atoken/training/gs.py: the differentiable deferred renderer, data, training, checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

import atoken
from atoken.core.attention import attention
from atoken.core.cameras import camera_from_fov, look_at, orbit_cameras
from atoken.core.config import GSDecoderConfig
from atoken.core.gaussians import Gaussians
from atoken.core.gs_decoder import GaussianDecoder
from atoken.core.sparse import SparseTensor
from atoken.pretrained.hub import bundled_path, load_pretrained_gs
from atoken.threed.rasterize import render_gaussians
from atoken.training import gs as gs_training
from atoken.training.gs import (
    GSSample,
    composite_selected,
    crop_mask,
    crop_voxels,
    init_gs_decoder,
    mesh_views,
    random_asset,
    render_differentiable,
    render_loss,
    save_gs_decoder,
    screen_gaussians,
    select_contributors,
    tiny_gs_config,
    training_attention,
    voxel_colours,
)


def random_scene(n: int, seed: int, dtype=torch.float32, spread: float = 0.6) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    xyz = (torch.rand(n, 3, generator=g) - 0.5) * spread
    rgb = torch.rand(n, 3, generator=g)
    scaling = torch.rand(n, 3, generator=g) * 0.04 + 0.01
    rotation = torch.randn(n, 4, generator=g)
    opacity = torch.rand(n, 1, generator=g) * 0.8 + 0.1
    gs = Gaussians.from_rgb(xyz, rgb, scaling, rotation, opacity)
    return Gaussians(
        *(t.to(dtype) for t in (gs.xyz, gs.features_dc, gs.scaling, gs.rotation, gs.opacity))
    )


def front_camera(width: int, height: int | None = None):
    w2c = look_at(torch.tensor([0.3, -2.0, 0.5]), torch.zeros(3), torch.tensor([0.0, 0, 1]))
    return camera_from_fov(w2c, math.radians(40.0), width, height)


# ------------------------------------------------------------------------------------------
# forward agreement with the official-rule rasteriser


@pytest.mark.parametrize("size", [(40, 36), (64, 64)])
def test_matches_render_gaussians_when_k_covers_all(size):
    gs = random_scene(300, 0)
    cam = front_camera(*size)
    counts = select_contributors(gs, cam, 512).counts()
    assert counts.shape == (size[1], size[0])
    assert int(counts.max()) < 512  # k covers every pixel's contributors
    assert int(counts.max()) > 10  # and the scene has real overlap
    for bg in ((0.0, 0.0, 0.0), (0.2, 0.5, 1.0)):
        ref = render_gaussians(gs, cam, background=bg, backend="torch")
        out = render_differentiable(gs, cam, k=512, background=bg)
        assert out.image.shape == (size[1], size[0], 3)
        torch.testing.assert_close(out.image.clamp(0, 1), ref.image, atol=2e-5, rtol=0)
        torch.testing.assert_close(out.alpha, ref.alpha, atol=2e-5, rtol=0)


def test_selection_in_chunks_matches(monkeypatch):
    gs = random_scene(300, 8)
    cam = front_camera(48)
    whole = select_contributors(gs, cam, 256)
    monkeypatch.setattr(gs_training, "_SELECT_ELEMENTS", 1000)  # many chunks
    chunked = select_contributors(gs, cam, 256)
    torch.testing.assert_close(chunked.pixel, whole.pixel)
    torch.testing.assert_close(chunked.row, whole.row)
    ref = render_gaussians(gs, cam, backend="torch")
    out = render_differentiable(gs, cam, k=256)
    torch.testing.assert_close(out.image.clamp(0, 1), ref.image, atol=2e-5, rtol=0)


def test_opaque_stop_matches_rasteriser():
    # Many opaque Gaussians on one spot: the kernel stops once T would fall below 1e-4.
    g = torch.Generator().manual_seed(3)
    n = 60
    xyz = torch.randn(n, 3, generator=g) * 0.01
    gs = Gaussians.from_rgb(
        xyz,
        torch.rand(n, 3, generator=g),
        torch.full((n, 3), 0.05),
        torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
        torch.full((n, 1), 0.98),
    )
    cam = front_camera(32)
    ref = render_gaussians(gs, cam, backend="torch")
    out = render_differentiable(gs, cam, k=64)
    torch.testing.assert_close(out.image.clamp(0, 1), ref.image, atol=2e-5, rtol=0)
    torch.testing.assert_close(out.alpha, ref.alpha, atol=2e-5, rtol=0)


def test_selection_is_front_to_back_prefix():
    gs = random_scene(300, 1)
    cam = front_camera(48)
    full = select_contributors(gs, cam, 256).dense(256)
    few = select_contributors(gs, cam, 4).dense(4)
    torch.testing.assert_close(few, full[..., :4])
    # entries are in camera-depth order
    w2c = cam.w2c
    z = gs.xyz @ w2c[:3, :3].T[:, 2] + w2c[2, 3]
    zz = torch.where(full >= 0, z[full.clamp_min(0)], torch.inf)
    assert bool((zz[..., 1:] >= zz[..., :-1]).all())


def test_empty_and_offscreen():
    gs = random_scene(20, 2)
    gs = Gaussians(gs.xyz + 10.0, gs.features_dc, gs.scaling, gs.rotation, gs.opacity)
    cam = front_camera(32)
    out = render_differentiable(gs, cam, k=8, background=(0.1, 0.2, 0.3))
    torch.testing.assert_close(out.image, torch.tensor([0.1, 0.2, 0.3]).expand(32, 32, 3))
    assert float(out.alpha.abs().max()) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        select_contributors(gs, cam, 0)


# ------------------------------------------------------------------------------------------
# gradients


def test_gradcheck_composite_float64():
    gs = random_scene(6, 4, torch.float64, spread=0.15)
    cam = front_camera(12)
    sel = select_contributors(gs, cam, 8)
    assert len(sel.row) > 20
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(12, 12, 3, generator=g, dtype=torch.float64)
    leaves = [
        t.clone().requires_grad_(True)
        for t in (gs.xyz, gs.features_dc, gs.scaling, gs.rotation, gs.opacity)
    ]

    def fn(xyz, dc, scaling, rotation, opacity):
        out = composite_selected(
            screen_gaussians(Gaussians(xyz, dc, scaling, rotation, opacity), cam),
            sel,
            background=(0.3, 0.2, 0.1),
        )
        return (out.image * weights).sum(), out.alpha.sum()

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradients_reach_every_field():
    gs = random_scene(50, 5)
    leaves = [
        t.clone().requires_grad_(True)
        for t in (gs.xyz, gs.features_dc, gs.scaling, gs.rotation, gs.opacity)
    ]
    out = render_differentiable(Gaussians(*leaves), front_camera(32), k=8)
    (out.image.sum() + out.alpha.sum()).backward()
    for t in leaves:
        assert t.grad is not None and bool(torch.isfinite(t.grad).all())
        assert float(t.grad.abs().sum()) > 0


def test_optimisation_decreases_image_loss():
    target = random_scene(40, 6)
    cam = front_camera(32)
    ref = render_gaussians(target, cam, backend="torch").image
    start = random_scene(40, 7)
    params = [
        t.clone().requires_grad_(True)
        for t in (start.xyz, start.features_dc, start.scaling, start.rotation, start.opacity)
    ]
    opt = torch.optim.Adam(params, lr=0.01)
    losses = []
    for _ in range(40):
        xyz, dc, scale, rot, op = params
        gs = Gaussians(xyz, dc, scale.abs() + 1e-3, rot, op.clamp(0.01, 0.99))
        loss = (render_differentiable(gs, cam, k=16).image - ref).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0]


# ------------------------------------------------------------------------------------------
# decoder training pieces


def test_bucketed_attention_matches_default():
    g = torch.Generator().manual_seed(0)
    lens = [5, 17, 3, 40, 41, 1, 12, 90]
    q, k, v = (torch.randn(sum(lens), 2, 8, generator=g, requires_grad=True) for _ in range(3))
    for cap in (None, 30.0):
        ref = attention(q, k, v, lens, softcap=cap)
        (gref,) = torch.autograd.grad(ref.square().sum(), q)
        with training_attention():
            out = attention(q, k, v, lens, softcap=cap)
        (gout,) = torch.autograd.grad(out.square().sum(), q)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gout, gref, atol=1e-4, rtol=1e-4)


def small_voxels(seed: int = 0) -> SparseTensor:
    """A 6x6 plate of voxels near the grid centre with random patch features."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = torch.meshgrid(torch.arange(29, 35), torch.arange(29, 35), indexing="ij")
    coords = torch.stack(
        [torch.zeros(36, dtype=torch.long), xs.reshape(-1), ys.reshape(-1), torch.full((36,), 32)],
        1,
    ).int()
    feats = torch.rand(36, 768, generator=g) * 2 - 1
    return SparseTensor(feats, coords)


def test_decoder_training_steps_decrease_loss():
    torch.manual_seed(0)
    cfg = GSDecoderConfig(
        channels=32, num_blocks=1, num_heads=1, mlp_channels=64, num_gaussians=4, softcap=0.0
    )
    dec = GaussianDecoder(cfg)
    init_gs_decoder(dec)
    x = small_voxels()
    cams = orbit_cameras(2, resolution=32, offset=(0.1, 0.3))
    # target: an opaque red plate, one round Gaussian per voxel
    centre = (x.coords[:, 1:].float() + 0.5) / 64 - 0.5
    n = len(centre)
    plate = Gaussians.from_rgb(
        centre,
        torch.tensor([[0.9, 0.1, 0.1]]).repeat(n, 1),
        torch.full((n, 3), 1 / 64),
        torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
        torch.full((n, 1), 0.95),
    )
    targets = torch.stack([render_gaussians(plate, c).image.permute(2, 0, 1) for c in cams])
    assert float(targets.amax()) > 0.5
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        with training_attention():
            loss, stats = render_loss(
                dec,
                x,
                targets,
                cams,
                k=16,
                colour_targets=(
                    torch.tensor([[0.9, 0.1, 0.1]]).repeat(n, 1),
                    torch.ones(n, dtype=torch.bool),
                ),
                colour_weight=0.5,
            )
            opt.zero_grad()
            loss.backward()
        opt.step()
        losses.append(stats["loss"])
    assert losses[-1] < 0.6 * losses[0]


def test_random_asset_depth_and_crop_mask():
    rng = np.random.default_rng([99, 0])
    mesh = random_asset(rng)
    lo, hi = mesh.bounds
    assert float(np.abs(np.maximum(-lo, hi)).max()) <= 0.5 + 1e-6
    assert float((hi - lo).max()) == pytest.approx(1.0, abs=1e-6)
    cams = orbit_cameras(2, resolution=64, offset=(0.2, 0.1))
    views, depth = mesh_views(mesh, cams)
    assert views.shape == (2, 64, 64, 3) and views.dtype == np.uint8
    sample = GSSample(
        np.zeros((1, 768), np.uint8),
        np.zeros((1, 3), np.int16),
        views,
        np.stack([c.w2c.numpy() for c in cams]),
        depth,
    )
    pts = sample.surface_points(0)
    seen = ~np.isnan(pts[..., 0])
    assert seen.any() and (~seen).any()
    assert not (views[0].max(-1) > 0)[~seen].any()  # every coloured pixel has a depth
    # the back-projected pixels lie on the mesh surface
    surface, _ = trimesh.sample.sample_surface(mesh, 200_000, seed=0)
    dist, _ = cKDTree(surface).query(pts[seen][::5])
    assert float(dist.max()) < 0.01
    # a crop holding every voxel explains every pixel; a tiny crop only the background
    coords = torch.from_numpy(((pts[seen] + 0.5) * 64).astype(np.int64)).unique(dim=0)
    keep, centre, radius = crop_voxels(coords, len(coords), torch.Generator().manual_seed(0))
    assert bool(keep.all())
    m = crop_mask(sample, [0], centre, 200, 32)
    assert m.shape == (1, 1, 32, 32) and float(m.min()) == 1.0
    m = crop_mask(sample, [0], centre, 0, 64)
    torch.testing.assert_close(m[0, 0].bool(), torch.from_numpy(~seen))
    # voxels holding the seen surface points get the colours of the views
    rgb, valid = voxel_colours(sample, coords, [0, 1], tolerance=1.5)
    assert float(valid.float().mean()) > 0.5
    assert float(rgb.min()) >= 0 and float(rgb.max()) <= 1
    assert float(rgb[~valid].abs().sum()) == 0
    pix = views[depth >= 0].astype(np.float32) / 255
    lo, hi = torch.from_numpy(pix.min(0)), torch.from_numpy(pix.max(0))
    assert bool(((rgb[valid] >= lo - 1e-6) & (rgb[valid] <= hi + 1e-6)).all())


# ------------------------------------------------------------------------------------------
# checkpoint


def test_save_and_load_roundtrip(tmp_path):
    cfg = tiny_gs_config(channels=64, num_blocks=1, num_gaussians=4)
    dec = GaussianDecoder(cfg)
    init_gs_decoder(dec)
    path = save_gs_decoder(dec, tmp_path / "gs.safetensors", {"note": "test"})
    back = atoken.load_gaussian_decoder(path, None)
    assert back.config == cfg
    x = small_voxels()
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(x), dec.forward_features(x))


def test_bundled_tiny_gs_decodes_to_standard_ply(tmp_path):
    path = bundled_path("atoken-tiny-gs")
    assert path is not None, "assets/atoken-tiny-gs.safetensors is missing"
    dec = atoken.load_gaussian_decoder(path, None)
    assert dec.config.name == "atoken-tiny-gs"
    assert isinstance(load_pretrained_gs("atoken-tiny-gs"), GaussianDecoder)
    x = small_voxels()
    with torch.no_grad():
        (gs,) = dec(x)
    assert len(gs) == 36 * dec.config.num_gaussians
    for t in (gs.xyz, gs.scaling, gs.opacity, gs.features_dc, gs.rotation):
        assert bool(torch.isfinite(t).all())
    # positions stay within 1.5 voxels of their voxel
    centre = (x.coords[:, 1:].float() + 0.5) / 64 - 0.5
    off = gs.xyz.reshape(36, -1, 3) - centre[:, None]
    assert float(off.abs().max()) <= 0.5 * 1.5 / 64 + 1e-6
    ply = gs.save_ply(tmp_path / "out.ply")
    header = ply.read_bytes().split(b"end_header")[0].decode()
    for name in ("x", "y", "z", "nx", "f_dc_0", "f_dc_2", "opacity", "scale_2", "rot_3"):
        assert f"property float {name}\n" in header
    back = Gaussians.load_ply(ply)
    torch.testing.assert_close(back.xyz, gs.xyz)
    torch.testing.assert_close(back.opacity, gs.opacity, atol=1e-6, rtol=1e-5)
