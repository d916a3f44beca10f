"""The .ply splat and the .glb preview hold one object in one pose, and both viewers frame it alike.

Issue 16: the Gaussian viewer showed the pencil upside down, a glTF fox on its side and the duck
from underneath. The checks here read the files back as a viewer would: the preview's vertices in
glTF's frame (scene graph applied, +y up) and the splat's centres as stored (3DGS's y-down
convention, which gsplat.js assumes). The two conventions differ by a 180-degree turn about x.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree
from trimesh.transformations import rotation_matrix, scale_matrix, translation_matrix

import atoken
from app import viewer3d
from atoken.core.gaussians import Gaussians, matrix_quaternion, quaternion_multiply
from atoken.pipelines.reconstruct3d import reconstruct_asset
from atoken.threed.mesh import load_mesh, mesh_to_glb
from atoken.threed.mesh_render import mesh_to_voxels

from .conftest import GOLDEN

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_MESHES = sorted((ROOT / "assets/examples").glob("*.glb")) + sorted(
    p for p in (ROOT / "assets/meshes").iterdir() if p.suffix != ".py"
)
GLTF_TO_PLY = np.diag([1.0, -1.0, -1.0])  # glTF (+y up) -> 3DGS (+y down): 180 degrees about x
VOXEL = 1 / 64
HALF_TURN_SYMMETRIC = {"rainbow_torus.ply"}  # the same shape after 180 degrees about x


# -- meshes from other sources, made here ---------------------------------------------------


def _rod(a, b, radius: float = 0.012) -> trimesh.Trimesh:
    return trimesh.creation.cylinder(radius=radius, segment=[a, b], sections=8)


def flag_obj(folder: Path) -> Path:
    """A flag modelled Z up (pole, arm at the top along +x, foot along +y), turned 23 degrees
    about z, scaled to centimetres and moved far off the origin, written as OBJ (read as Y up)."""
    flag = trimesh.util.concatenate(
        [_rod((0, 0, 0), (0, 0, 1)), _rod((0, 0, 1), (0.5, 0, 1)), _rod((0, 0, 0), (0, 0.3, 0))]
    )
    flag.apply_transform(rotation_matrix(0.4, [0, 0, 1]))
    flag.apply_scale(40.0)
    flag.apply_translation([120.0, -35.0, 60.0])
    path = folder / "flag_zup.obj"
    flag.export(path)
    return path


def arrow_glb(folder: Path) -> Path:
    """An arrow whose parts are placed by glTF node transforms (rotations, translation, scale):
    shaft and head point along +y, a fin sticks out along +x near the tail."""
    scene = trimesh.Scene()
    turn = rotation_matrix(-math.pi / 2, [1, 0, 0])  # the parts are modelled along +z
    scene.add_geometry(_rod((0, 0, 0), (0, 0, 1), radius=0.015), node_name="shaft", transform=turn)
    head = trimesh.creation.cone(radius=0.06, height=0.2, sections=8)
    scene.add_geometry(head, node_name="head", transform=translation_matrix([0, 1, 0]) @ turn)
    fin = _rod((0, 0, 0), (0.2, 0, 0))
    scene.add_geometry(
        fin, node_name="fin", transform=translation_matrix([0, 0.1, 0]) @ scale_matrix(2.0)
    )
    path = folder / "arrow_nodes.glb"
    scene.export(path)
    return path


OTHER_MESHES = {"flag_zup.obj": flag_obj, "arrow_nodes.glb": arrow_glb}


@pytest.fixture(scope="module")
def other_meshes(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("other_meshes")
    return {name: make(folder) for name, make in OTHER_MESHES.items()}


# -- helpers --------------------------------------------------------------------------------


def quaternion_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of a unit quaternion (w, x, y, z)."""
    w, x, y, z = q.double().unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def random_gaussians(n: int, seed: int = 0) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    return Gaussians.from_rgb(
        torch.rand(n, 3, generator=g) - 0.5,
        torch.rand(n, 3, generator=g),
        torch.rand(n, 3, generator=g) * 0.02 + 0.001,
        torch.randn(n, 4, generator=g),
        torch.rand(n, generator=g) * 0.9 + 0.05,
    )


def preview_points(glb: Path, count: int = 20_000) -> np.ndarray:
    """Surface points of the preview as a glTF viewer places them (node transforms applied)."""
    mesh = trimesh.load(glb, force="mesh")
    points, _ = trimesh.sample.sample_surface(mesh, count, seed=0)
    return np.asarray(points)


def voxel_splat(mesh: trimesh.Trimesh) -> Gaussians:
    """One Gaussian at the centre of every voxel the packer fills (where the decoder puts them)."""
    _, coords = mesh_to_voxels(mesh, num_views=4, resolution=128, normalize=False)
    centres = (coords.float() + 0.5) * VOXEL - 0.5
    n = len(centres)
    return Gaussians.from_rgb(
        centres, torch.full((n, 3), 0.5), torch.full((n, 3), 0.005), torch.eye(4)[:1].repeat(n, 1),
        torch.full((n,), 0.9),
    )  # fmt: skip


def stored_positions(ply: Path) -> np.ndarray:
    """Gaussian centres exactly as the .ply stores them."""
    return Gaussians.load_ply(ply, frame="z-up").xyz.double().numpy()


def off_surface(points: np.ndarray, surface: np.ndarray) -> float:
    """99th percentile of the distance from points to the nearest surface sample, in voxels."""
    return float(np.quantile(cKDTree(surface).query(points)[0], 0.99)) / VOXEL


# -- quaternions and frames -----------------------------------------------------------------


def test_matrix_quaternion_inverts_quaternion_matrix_including_half_turns():
    q = torch.nn.functional.normalize(torch.randn(200, 4, dtype=torch.float64), dim=-1)
    q = torch.cat([q, torch.eye(4, dtype=torch.float64)])  # identity and the three half turns
    for qi in q:
        m = quaternion_matrix(qi)
        back = matrix_quaternion(m)
        assert back[0] >= 0
        torch.testing.assert_close(quaternion_matrix(back), m, atol=1e-12, rtol=0)
    a, b = q[:100], q[100:200]
    torch.testing.assert_close(
        quaternion_matrix(quaternion_multiply(a, b)),
        quaternion_matrix(a) @ quaternion_matrix(b),
        atol=1e-12,
        rtol=0,
    )


def test_rotate_turns_positions_and_covariances():
    g = random_gaussians(64)
    q = torch.nn.functional.normalize(torch.tensor([0.3, -0.5, 0.7, 0.2]), dim=0)
    m = quaternion_matrix(q).float()
    turned = g.rotate(m)
    torch.testing.assert_close(turned.xyz, g.xyz @ m.T)

    def covariance(x: Gaussians) -> torch.Tensor:
        r = quaternion_matrix(x.rotation)
        return r @ torch.diag_embed(x.scaling.double() ** 2) @ r.transpose(1, 2)

    expected = m.double() @ covariance(g) @ m.double().T
    torch.testing.assert_close(covariance(turned), expected, atol=1e-9, rtol=1e-5)
    with pytest.raises(ValueError, match="proper rotation"):
        g.rotate(torch.diag(torch.tensor([1.0, 1.0, -1.0])))  # a mirror
    with pytest.raises(ValueError, match="proper rotation"):
        g.rotate(2 * torch.eye(3))


def test_ply_frames(tmp_path):
    g = random_gaussians(50)
    down = g.save_ply(tmp_path / "down.ply")  # the default: 3DGS's y down
    up = g.save_ply(tmp_path / "up.ply", frame="z-up")
    x, y, z = g.xyz.unbind(-1)
    torch.testing.assert_close(
        Gaussians.load_ply(down, frame="z-up").xyz, torch.stack([x, -z, y], -1)
    )  # (x, y, z) -> (x, -z, y): the pipeline's +z (up) is stored as -y
    torch.testing.assert_close(Gaussians.load_ply(up, frame="z-up").xyz, g.xyz)
    for path, frame in ((down, "y-down"), (up, "z-up")):
        back = Gaussians.load_ply(path, frame=frame)
        torch.testing.assert_close(back.xyz, g.xyz)
        torch.testing.assert_close(
            quaternion_matrix(back.rotation), quaternion_matrix(g.rotation), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(back.scaling, g.scaling, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="frame must be one of"):
        g.save_ply(tmp_path / "x.ply", frame="y-up")
    with pytest.raises(ValueError, match="frame must be one of"):
        Gaussians.load_ply(down, frame="Y-DOWN")


# -- the splat against the preview, mesh by mesh --------------------------------------------


def _mesh_cases():
    return [pytest.param(p, id=p.name) for p in EXAMPLE_MESHES] + [
        pytest.param(name, id=name) for name in OTHER_MESHES
    ]


@pytest.mark.parametrize("source", _mesh_cases())
def test_splat_sits_on_the_preview_surface(source, other_meshes, tmp_path):
    path = other_meshes[source] if isinstance(source, str) else source
    mesh = load_mesh(path)
    glb = mesh_to_glb(mesh, tmp_path / "preview.glb")
    ply = voxel_splat(mesh).save_ply(tmp_path / "splat.ply")
    preview = trimesh.load(glb, force="mesh")
    corners = np.asarray(preview.vertices)[np.asarray(preview.faces)].reshape(-1, 3)
    corners = corners @ GLTF_TO_PLY.T  # where a y-down splat viewer has the preview
    surface = preview_points(glb) @ GLTF_TO_PLY.T
    splat = stored_positions(ply)
    # same normalised box: largest side 1, centred; the voxel centres fill it to a voxel or two
    # (the pencil's point is too thin for the 128 px packing renders to hit its last voxel)
    lo, hi = corners.min(0), corners.max(0)
    assert abs((hi - lo).max() - 1.0) < 1e-4 and np.abs(lo + hi).max() < 1e-4
    np.testing.assert_allclose(splat.min(0), lo, atol=2 * VOXEL)
    np.testing.assert_allclose(splat.max(0), hi, atol=2 * VOXEL)
    # same pose: the splat lies on the preview's surface (a voxel centre is at most half a
    # voxel diagonal, 0.87, from the surface it holds); the bug's frames are far off
    assert off_surface(splat, surface) < 1.5
    as_held = stored_positions(voxel_splat(mesh).save_ply(tmp_path / "z.ply", frame="z-up"))
    assert off_surface(as_held, surface) > 5
    if path.name not in HALF_TURN_SYMMETRIC:  # the splat in glTF's own coordinates
        assert off_surface(splat @ GLTF_TO_PLY.T, surface) > 3


def test_reconstruction_writes_the_splat_in_the_preview_pose(other_meshes, tmp_path):
    model = atoken.load(GOLDEN / "weights/tiny_c.safetensors", "tiny-c")
    gs = atoken.load_gaussian_decoder(GOLDEN / "weights/tiny_gs.safetensors", "tiny-gs")
    res = reconstruct_asset(
        model, gs, other_meshes["arrow_nodes.glb"], tmp_path / "out.ply", num_views=4,
        resolution=128, metrics=False,
    )  # fmt: skip
    splat = stored_positions(res.ply)
    surface = preview_points(res.input_glb) @ GLTF_TO_PLY.T
    assert off_surface(splat, surface) < 1.5 + 0.75  # decoder offsets: up to 0.75 voxel
    assert off_surface(splat @ GLTF_TO_PLY.T, surface) > 3
    torch.testing.assert_close(Gaussians.load_ply(res.ply).xyz, res.gaussians.xyz)


# -- the two viewers' cameras ---------------------------------------------------------------

CANVAS = (598, 318)  # px, a 320 px Model3D in a 1400 px wide page


def _look_at(points, eye, up, focal) -> np.ndarray:
    """Pixel (column, row) of points seen from ``eye`` looking at the origin, no roll."""
    forward = -eye / np.linalg.norm(eye)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    above = np.cross(right, forward)
    d = points - eye
    depth = d @ forward
    w, h = CANVAS
    return np.stack([w / 2 + focal * (d @ right) / depth, h / 2 - focal * (d @ above) / depth], -1)


def babylon_pixels(points: np.ndarray, camera_position) -> np.ndarray:
    """Babylon.js ArcRotateCamera (right-handed scene, +y up, vertical fov 0.8 rad)."""
    alpha, beta, radius = camera_position
    alpha, beta = math.radians(alpha), math.radians(beta)
    eye = radius * np.array(
        [math.cos(alpha) * math.sin(beta), math.cos(beta), math.sin(alpha) * math.sin(beta)]
    )
    focal = CANVAS[1] / 2 / math.tan(viewer3d.MESH_FOV / 2)
    return _look_at(points, eye, np.array([0.0, 1.0, 0.0]), focal)


def gsplat_pixels(points: np.ndarray) -> np.ndarray:
    """gsplat.js's default orbit camera (world +y drawn downwards, fx = fy = 1132 px)."""
    a, b, r = viewer3d.SPLAT_ORBIT
    eye = r * np.array([math.sin(a) * math.cos(b), -math.sin(b), -math.cos(a) * math.cos(b)])
    return _look_at(points, eye, np.array([0.0, -1.0, 0.0]), viewer3d.SPLAT_FOCAL)


def test_mesh_camera_numbers():
    alpha, beta, radius = viewer3d.mesh_camera(320)
    assert alpha == pytest.approx(61.3521, abs=1e-4) and beta == pytest.approx(61.3521, abs=1e-4)
    # equal magnification at the orbit centre: 159 px / tan(0.4) / radius = 1132 px / 5
    assert radius == pytest.approx(5 * 159 / math.tan(0.4) / 1132, rel=1e-9)
    assert radius == pytest.approx(1.6611, abs=1e-4)
    # one wheel notch moves gsplat.js's camera by 10% of its radius, as Babylon's
    r = viewer3d.SPLAT_ORBIT[2]
    step = 100 * viewer3d.SPLAT_ZOOM_SPEED * 0.025 * (0.1 + 0.9 * (r - 0.1) / 29.9)
    assert step / r == pytest.approx(0.1)


def test_both_cameras_agree_at_the_orbit_centre():
    camera = viewer3d.mesh_camera(CANVAS[1] + viewer3d.BORDER)
    small = 1e-3 * np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float64)
    mesh_px = babylon_pixels(small, camera)
    splat_px = gsplat_pixels(small @ GLTF_TO_PLY.T)
    np.testing.assert_allclose(mesh_px, splat_px, atol=1e-3)  # pixels for 1e-3 units: ~0.2 px
    up = babylon_pixels(np.array([[0, 0.1, 0]]), camera)[0] - np.array(CANVAS) / 2
    assert up[1] < -10 and abs(up[0]) < 1  # glTF +y is straight up the screen


@pytest.mark.parametrize("source", _mesh_cases())
def test_both_viewers_draw_each_vertex_at_the_same_pixel(source, other_meshes, tmp_path):
    """Every preview vertex in both viewers, with the layout's settings and with the bug's.

    Only perspective separates them: gsplat.js's focal length is about three times Babylon's, so
    parts nearer the camera than the orbit centre grow more in the mesh viewer."""
    path = other_meshes[source] if isinstance(source, str) else source
    preview = trimesh.load(mesh_to_glb(load_mesh(path), tmp_path / "p.glb"), force="mesh")
    points = np.asarray(preview.vertices)
    mesh_px = babylon_pixels(points, viewer3d.mesh_camera(CANVAS[1] + viewer3d.BORDER))
    size = float(np.ptp(mesh_px, 0).max())  # px, the object's extent on screen
    assert size > 100 and np.all(mesh_px >= 0) and np.all(mesh_px < CANVAS)  # framed, not cut
    shift = np.linalg.norm(mesh_px - gsplat_pixels(points @ GLTF_TO_PLY.T), axis=1)
    assert np.median(shift) < 0.09 * size
    # before: Babylon framed the preview itself (alpha 90, beta 75 degrees, radius 1.1 times the
    # box diagonal) and the splat was written Z up
    diagonal = float(np.linalg.norm(np.ptp(points, 0)))
    before_mesh = babylon_pixels(points, (90.0, 75.0, 1.1 * diagonal))
    before_splat = gsplat_pixels(points @ np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]]).T)
    assert np.median(np.linalg.norm(before_mesh - before_splat, axis=1)) > 0.12 * size
