"""Renderer geometry and colour, backend agreement, and render -> pack surface consistency."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from atoken.core.cameras import camera_from_fov, look_at
from atoken.threed.mesh_render import (
    AMBIENT,
    default_cameras,
    gl_available,
    mesh_to_voxels,
    prepare_mesh,
    render_views,
)
from atoken.threed.multiview import voxel_centres

BACKENDS = [
    "torch",
    pytest.param(
        "gl",
        marks=pytest.mark.skipif(not gl_available(), reason="no moderngl / headless EGL here"),
    ),
]


def top_camera(height: float, fov: float, size: int):
    """Camera above the origin looking down -Z, image up = world +Y."""
    eye = torch.tensor([0.0, 0.0, height])
    return camera_from_fov(look_at(eye, torch.zeros(3), torch.tensor([0.0, 1.0, 0.0])), fov, size)


def quad(half: float, z: float = 0.0) -> trimesh.Trimesh:
    v = [[-half, -half, z], [half, -half, z], [half, half, z], [-half, half, z]]
    return trimesh.Trimesh(vertices=v, faces=[[0, 1, 2], [0, 2, 3]], process=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plane_depth_is_camera_z(backend):
    # A plane filling the view, 1.3 below the camera: camera-z depth 1.3 at every pixel.
    cam = top_camera(1.3, math.radians(40), 64)
    rgba, depth = render_views(quad(5.0), [cam], backend=backend)
    assert rgba.shape == (1, 64, 64, 4) and depth.shape == (1, 64, 64)
    assert depth.dtype == np.float32 and rgba.dtype == np.uint8
    np.testing.assert_allclose(depth[0], 1.3, rtol=1e-5)
    assert (rgba[0, ..., 3] == 255).all()
    # A tilted plane z = 0.5 x: depth follows the ray-plane intersection exactly.
    tilted = quad(1.0)  # still fills the view, and stays in front of the camera
    tilted.vertices[:, 2] = 0.5 * tilted.vertices[:, 0]
    _, depth = render_views(tilted, [cam], backend=backend)
    q = (np.arange(64) + 0.5) / 64
    x_over_z = (q - 0.5) / cam.fx  # camera x / camera z along each pixel column
    # Camera x = world x, camera z = 1.3 - world z = 1.3 - 0.5 x  ->  z = 1.3 / (1 + 0.5 x/z)
    expected = 1.3 / (1 + 0.5 * x_over_z)
    np.testing.assert_allclose(depth[0], np.broadcast_to(expected, (64, 64)), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sphere_depth_matches_analytic(backend):
    r, size = 0.4, 96
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=r)
    cam = top_camera(2.0, math.radians(30), size)
    _, depth = render_views(sphere, [cam], backend=backend)
    # Ray through each pixel centre, camera at height 2 looking down: hit of |p| = r.
    q = (np.arange(size) + 0.5) / size
    dx = (q[None, :] - 0.5) / cam.fx
    dy = (q[:, None] - 0.5) / cam.fy
    a = dx**2 + dy**2 + 1  # ray direction (dx, dy, 1) in camera space, centre at z = 2
    disc = 4.0 - a * (4.0 - r * r)
    hit = disc > 0
    expected = np.where(hit, (2.0 - np.sqrt(np.maximum(disc, 0))) / a, -1)
    got = depth[0] >= 0
    assert (got == hit).mean() > 0.99
    inner = hit & got & (disc > 0.3 * disc.max())  # away from the silhouette
    assert np.abs(depth[0][inner] - expected[inner]).max() < 2e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_vertex_colours_flat_and_interpolated(backend):
    cam = top_camera(1.0, math.radians(40), 65)
    tri = trimesh.Trimesh(
        vertices=[[-0.3, -0.3, 0.0], [0.3, -0.3, 0.0], [0.0, 0.3, 0.0]], faces=[[0, 1, 2]]
    )
    tri.visual = trimesh.visual.ColorVisuals(tri, vertex_colors=[[200, 30, 10, 255]] * 3)
    rgba, _ = render_views(tri, [cam], backend=backend, shading="flat")
    covered = rgba[0, ..., 3] == 255
    assert covered.sum() > 200
    assert (rgba[0][covered][:, :3] == [200, 30, 10]).all()
    assert (rgba[0][~covered] == 0).all()
    # Three different colours: the pixel at the centroid shows their mean.
    tri.visual = trimesh.visual.ColorVisuals(
        tri, vertex_colors=[[255, 0, 0, 255], [0, 255, 0, 255], [0, 0, 255, 255]]
    )
    rgba, _ = render_views(tri, [cam], backend=backend, shading="flat")
    # Centroid (0, -0.1) -> column 32 (centre), row below the middle (image down = world -Y).
    row = int((0.5 + cam.fy * 0.1 / 1.0) * 65)
    np.testing.assert_allclose(rgba[0, row, 32, :3], [85, 85, 85], atol=6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_face_colours_and_lambert(backend):
    cam = top_camera(1.5, math.radians(40), 48)
    mesh = quad(0.3)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, face_colors=[[0, 0, 255, 255]] * 2)
    rgba, _ = render_views(mesh, [cam], backend=backend, shading="lambert")
    lit = rgba[0, 24, 24, :3].astype(float)
    light = np.array([0.3, -0.2, 1.0]) / np.linalg.norm([0.3, -0.2, 1.0])
    expected = 255 * (AMBIENT + (1 - AMBIENT) * light[2])
    np.testing.assert_allclose(lit, [0, 0, expected], atol=1.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_texture_colours(backend):
    colours = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 0]]], np.uint8)
    image = Image.fromarray(colours.repeat(2, 0).repeat(2, 1))  # 4x4: 2x2 texels per colour
    mesh = quad(0.3)
    # uv origin bottom-left: world -Y is the bottom of the texture image.
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float64)
    mesh.visual = trimesh.visual.TextureVisuals(uv=uv, image=image)
    cam = top_camera(1.0, 2 * math.atan(0.3), 64)  # the quad fills the image exactly
    rgba, _ = render_views(mesh, [cam], backend=backend, shading="flat")
    # Near the quadrant centres bilinear filtering only mixes texels of one colour.
    for (r, c), want in {(16, 16): colours[0, 0], (16, 47): colours[0, 1]}.items():
        np.testing.assert_array_equal(rgba[0, r, c, :3], want)
    for (r, c), want in {(47, 16): colours[1, 0], (47, 47): colours[1, 1]}.items():
        np.testing.assert_array_equal(rgba[0, r, c, :3], want)


def test_occlusion_nearest_surface_wins():
    near, far = quad(0.2, z=0.3), quad(0.4, z=0.0)
    near.visual = trimesh.visual.ColorVisuals(near, face_colors=[[255, 0, 0, 255]] * 2)
    far.visual = trimesh.visual.ColorVisuals(far, face_colors=[[0, 255, 0, 255]] * 2)
    cam = top_camera(1.0, math.radians(60), 40)
    for order in ([near, far], [far, near]):
        mesh = trimesh.util.concatenate(order)
        rgba, depth = render_views(mesh, [cam], backend="torch", shading="flat")
        assert tuple(rgba[0, 20, 20, :3]) == (255, 0, 0)
        assert depth[0, 20, 20] == pytest.approx(0.7, rel=1e-5)
        assert tuple(rgba[0, 20, 8, :3]) == (0, 255, 0)


@pytest.mark.skipif(not gl_available(), reason="no moderngl / headless EGL here")
def test_backends_agree_on_textured_mesh():
    mesh = trimesh.creation.torus(major_radius=0.3, minor_radius=0.12)
    rng = np.random.default_rng(0)
    tex = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    angle = np.arctan2(mesh.vertices[:, 1], mesh.vertices[:, 0])
    uv = np.c_[(angle / (2 * np.pi)) % 1.0, mesh.vertices[:, 2] + 0.5]
    mesh.visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(tex))
    cams = default_cameras(3, 128)
    rm = prepare_mesh(mesh)
    rgba_t, depth_t = render_views(rm, cams, backend="torch")
    rgba_g, depth_g = render_views(rm, cams, backend="gl")
    cover_t, cover_g = depth_t >= 0, depth_g >= 0
    assert (cover_t == cover_g).mean() > 0.998
    both = cover_t & cover_g
    assert np.median(np.abs(depth_t - depth_g)[both]) < 1e-5
    diff = np.abs(rgba_t.astype(int) - rgba_g.astype(int))[both][:, :3]
    assert (diff <= 2).mean() > 0.97


def test_fragment_chunking_does_not_change_the_picture(monkeypatch):
    from atoken.threed import mesh_render

    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.4)
    mesh.visual = trimesh.visual.ColorVisuals(
        mesh, vertex_colors=(np.abs(mesh.vertices) / 0.4 * 255).astype(np.uint8)
    )
    cams = default_cameras(2, 64)
    rgba, depth = render_views(mesh, cams, backend="torch")
    monkeypatch.setattr(mesh_render, "_FRAGMENT_CHUNK", 50)  # many chunks, some of one face
    rgba_c, depth_c = render_views(mesh, cams, backend="torch")
    assert np.array_equal(rgba, rgba_c) and np.array_equal(depth, depth_c)
    assert (depth >= 0).mean() > 0.2


def test_torch_fallback_without_gl(monkeypatch):
    from atoken.threed import mesh_render

    monkeypatch.setattr(mesh_render._gl_local, "state", None, raising=False)
    assert not gl_available()
    cam = top_camera(1.3, math.radians(40), 32)
    rgba, depth = render_views(quad(5.0), [cam])  # auto picks the torch backend
    np.testing.assert_allclose(depth[0], 1.3, rtol=1e-5)
    with pytest.raises(ValueError, match="'gl' backend needs"):
        render_views(quad(5.0), [cam], backend="gl")


def test_render_argument_errors():
    cams = default_cameras(2, 32)
    with pytest.raises(ValueError, match="unknown backend"):
        render_views(quad(0.2), cams, backend="vulkan")
    with pytest.raises(ValueError, match="shading"):
        render_views(quad(0.2), cams, shading="phong")
    with pytest.raises(ValueError, match="between 1 and"):
        render_views(quad(0.2), [])
    with pytest.raises(ValueError, match="share one image size"):
        render_views(quad(0.2), [cams[0], default_cameras(1, 16)[0]])


# ----------------------------------------------------------------- render -> pack surface


def shell_voxels(distance_ok) -> set[tuple[int, int, int]]:
    grid = torch.cartesian_prod(*[torch.arange(64)] * 3)
    keep = distance_ok(voxel_centres(grid).double())
    return {tuple(c) for c in grid[keep].tolist()}


def test_sphere_render_pack_gives_its_shell():
    r = 0.35
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=r)
    feats, coords = mesh_to_voxels(sphere, num_views=16, resolution=256, normalize=False)
    assert feats.shape == (len(coords), 768) and coords.dtype == torch.int32
    dist = voxel_centres(coords).double().norm(dim=1)
    # Every voxel centre lies within one voxel of the surface: sqrt(3)/128 from its point,
    # plus the half-pixel corner shift (0.18 voxel at 256 px), float16 depth and facetting.
    assert (dist - r).abs().max() < 1.0 / 64 + 2e-3
    # Voxels whose closed box straddles the sphere are occupied (the ideal shell).
    half = 1 / 128

    def straddles(c):
        near = (c.abs() - half).clamp(min=0).norm(dim=1)
        far = (c.abs() + half).norm(dim=1)
        return (near <= r - 2e-3) & (far >= r + 2e-3)

    shell = shell_voxels(straddles)
    got = {tuple(c) for c in coords.tolist()}
    assert len(shell & got) / len(shell) > 0.97
    # Grey Lambert features: every channel of a row equal (R = G = B), none black.
    rgb = feats.view(-1, 256, 3)
    assert torch.equal(rgb[..., 0], rgb[..., 1]) and torch.equal(rgb[..., 1], rgb[..., 2])


def test_textured_example_gives_coloured_features():
    path = Path(__file__).resolve().parents[2] / "assets" / "meshes" / "duck.glb"
    feats, coords = mesh_to_voxels(path, num_views=8, resolution=256)
    assert len(coords) > 5000 and coords.min() >= 0 and coords.max() <= 63
    assert feats.min() >= 0 and feats.max() <= 1
    rgb = feats.view(-1, 256, 3).mean(1)
    # The duck is yellow (R, G > B) with an orange bill: colour, not grey.
    assert (rgb[:, 0] > rgb[:, 2] + 0.1).float().mean() > 0.8


def test_box_render_pack_lands_on_faces(tmp_path):
    box = trimesh.creation.box(extents=(0.8, 0.5, 0.3))
    box.export(tmp_path / "box.ply")
    feats, coords = mesh_to_voxels(tmp_path / "box.ply", num_views=16, resolution=256)
    # load_mesh scales the longest side (0.8) to 1: faces at |x| = 0.5, |y| = 0.3125, |z| = 0.1875.
    half = torch.tensor([0.5, 0.3125, 0.1875], dtype=torch.float64)
    c = voxel_centres(coords).double()
    inside_box = ((c.abs() - half) <= 1 / 64).all(1)
    near_face = ((c.abs() - half).abs() <= 1 / 64).any(1)
    assert inside_box.all() and near_face.all()
    # No voxel deep inside: the interior stays empty.
    assert not ((c.abs() < half - 1.5 / 64).all(1)).any()
    assert len(coords) > 1500
