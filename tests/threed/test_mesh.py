"""Mesh loading: formats, colours, scene merging, normalisation, and bad inputs."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from atoken.threed.mesh import GREY, MeshError, load_mesh, mesh_to_glb, normalize_mesh

ASSETS = Path(__file__).resolve().parents[2] / "assets"
QUAD_COLOURS = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 0]]], np.uint8)


def textured_box() -> trimesh.Trimesh:
    box = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    uv = (box.vertices[:, :2] - box.vertices[:, :2].min(0)) / np.ptp(box.vertices[:, :2], 0)
    box.visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(QUAD_COLOURS))
    return box


def coloured_sphere() -> trimesh.Trimesh:
    s = trimesh.creation.icosphere(subdivisions=2, radius=3.0)
    s.apply_translation([10.0, 0.0, 0.0])
    rgb = ((s.vertices - s.vertices.min(0)) / np.ptp(s.vertices, 0) * 255).astype(np.uint8)
    s.visual = trimesh.visual.ColorVisuals(s, vertex_colors=np.c_[rgb, np.full(len(rgb), 255)])
    return s


def assert_normalised(mesh: trimesh.Trimesh) -> None:
    lo, hi = mesh.bounds
    np.testing.assert_allclose((hi - lo).max(), 1.0, atol=1e-9)
    np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-9)


def test_obj_with_mtl_and_texture(tmp_path):
    textured_box().export(tmp_path / "box.obj")
    assert (tmp_path / "material.mtl").is_file()
    mesh = load_mesh(tmp_path / "box.obj")
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    img = np.asarray(mesh.visual.material.image.convert("RGB"))
    assert img.shape == (2, 2, 3) and np.array_equal(img, QUAD_COLOURS)
    assert_normalised(mesh)
    # OBJ is Y up like in Blender's importer: box extents (2, 1, 0.5) -> (2, 0.5, 1) / 2.
    np.testing.assert_allclose(np.ptp(mesh.bounds, 0), [1.0, 0.25, 0.5], atol=1e-9)


def test_zip_of_obj_mtl_texture(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    textured_box().export(src / "box.obj")
    with zipfile.ZipFile(tmp_path / "box.zip", "w") as zf:
        for name in ["box.obj", "material.mtl", "material_0.png"]:
            zf.write(src / name, f"asset/{name}")
        zf.writestr("__MACOSX/asset/._box.obj", b"junk")
    mesh = load_mesh(tmp_path / "box.zip")
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    img = np.asarray(mesh.visual.material.image.convert("RGB"))
    assert np.array_equal(img, QUAD_COLOURS)  # texture was read before the temp dir went
    assert len(mesh.faces) == 12


def test_ply_vertex_colours_kept(tmp_path):
    sphere = coloured_sphere()
    sphere.export(tmp_path / "s.ply")
    mesh = load_mesh(tmp_path / "s.ply")
    assert mesh.visual.kind == "vertex"
    assert np.array_equal(mesh.visual.vertex_colors, sphere.visual.vertex_colors)
    assert_normalised(mesh)
    # PLY stays Z up: the sphere is only scaled and moved.
    expected = (sphere.vertices - sphere.bounds.mean(0)) / np.ptp(sphere.bounds, 0).max()
    np.testing.assert_allclose(mesh.vertices, expected, atol=1e-6)


def test_ply_face_colours_become_corner_colours(tmp_path):
    box = trimesh.creation.box()
    colours = np.c_[np.arange(12) * 20, np.full(12, 50), np.full(12, 90), np.full(12, 255)]
    box.visual = trimesh.visual.ColorVisuals(box, face_colors=colours.astype(np.uint8))
    box.export(tmp_path / "box.ply")
    mesh = load_mesh(tmp_path / "box.ply")
    corner = mesh.visual.vertex_colors[mesh.faces]  # [F, 3, 4]
    assert (corner == corner[:, :1]).all()  # each face keeps one colour
    assert sorted(map(tuple, corner[:, 0].tolist())) == sorted(map(tuple, colours.tolist()))


@pytest.mark.parametrize("suffix", [".stl", ".off"])
def test_plain_formats_get_grey(tmp_path, suffix):
    box = trimesh.creation.box(extents=(1.0, 2.0, 4.0))
    box.export(tmp_path / f"b{suffix}")
    mesh = load_mesh(tmp_path / f"b{suffix}")
    assert len(mesh.faces) == 12
    np.testing.assert_allclose(np.ptp(mesh.bounds, 0), [0.25, 0.5, 1.0], atol=1e-6)
    assert (mesh.visual.vertex_colors == GREY).all()


def test_glb_scene_merged_with_transforms(tmp_path):
    scene = trimesh.Scene()
    scene.add_geometry(textured_box(), node_name="box")
    moved = np.eye(4)
    moved[:3, 3] = [0.0, 5.0, 0.0]  # glTF +Y (up): becomes +Z after import
    ball = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    scene.add_geometry(ball, node_name="ball", transform=moved)
    scene.export(tmp_path / "scene.glb")
    mesh = load_mesh(tmp_path / "scene.glb")
    assert len(mesh.faces) == 12 + 320
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)  # one packed atlas
    assert_normalised(mesh)
    # Z extent: box [-0.5, 0.5], ball [4.5, 5.5] -> 6 units; the ball is the top sixth.
    top = mesh.vertices[:, 2] > 0.5 - 1 / 6 - 1e-9
    assert top.sum() == len(ball.vertices)


def test_gltf_with_external_buffers(tmp_path):
    files = trimesh.Scene([trimesh.creation.box(extents=(1.0, 3.0, 1.0))]).export(file_type="gltf")
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    mesh = load_mesh(tmp_path / "model.gltf")
    assert len(mesh.faces) == 12
    np.testing.assert_allclose(np.ptp(mesh.bounds, 0), [1 / 3, 1 / 3, 1.0], atol=1e-6)
    # A buffer URI that leaves the folder is refused, not read.
    gltf = json.loads(files["model.gltf"])
    gltf["buffers"][0]["uri"] = "../outside.bin"
    (tmp_path.parent / "outside.bin").write_bytes(files[gltf_buffer_name(files)])
    (tmp_path / "evil.gltf").write_text(json.dumps(gltf))
    with pytest.raises(MeshError, match="evil.gltf"):
        load_mesh(tmp_path / "evil.gltf")


def gltf_buffer_name(files: dict) -> str:
    return sorted(k for k in files if k.endswith(".bin"))[0]


def test_glb_mixed_texture_and_vertex_colours(tmp_path):
    scene = trimesh.Scene([textured_box(), coloured_sphere()])
    scene.export(tmp_path / "mixed.glb")
    mesh = load_mesh(tmp_path / "mixed.glb")
    assert mesh.visual.kind == "vertex"
    assert len(np.unique(mesh.visual.vertex_colors, axis=0)) > 20


def test_up_axis_override(tmp_path):
    box = trimesh.creation.box(extents=(1.0, 2.0, 4.0))
    box.export(tmp_path / "b.obj")
    assert np.ptp(load_mesh(tmp_path / "b.obj").bounds, 0)[1] == pytest.approx(1.0)
    np.testing.assert_allclose(
        np.ptp(load_mesh(tmp_path / "b.obj", up_axis="z").bounds, 0), [0.25, 0.5, 1.0]
    )


def test_normalize_mesh_idempotent_and_errors():
    box = trimesh.creation.box(extents=(3.0, 1.0, 1.0))
    box.apply_translation([4.0, -2.0, 7.0])
    once = normalize_mesh(box)
    assert_normalised(once)
    np.testing.assert_allclose(normalize_mesh(once).vertices, once.vertices, atol=1e-12)
    flat = trimesh.Trimesh(vertices=np.zeros((3, 3)), faces=[[0, 1, 2]], process=False)
    with pytest.raises(MeshError, match="bounding box"):
        normalize_mesh(flat)


def test_mesh_to_glb_round_trip(tmp_path):
    mesh = load_mesh_from(textured_box(), tmp_path / "in.glb")
    out = mesh_to_glb(mesh, tmp_path / "preview.glb")
    again = load_mesh(out)
    np.testing.assert_allclose(again.bounds, mesh.bounds, atol=1e-6)
    assert isinstance(again.visual, trimesh.visual.TextureVisuals)


def load_mesh_from(mesh: trimesh.Trimesh, path):
    mesh.export(path)
    return load_mesh(path)


# ---------------------------------------------------------------------------- bad inputs


def test_text_file_named_glb(tmp_path):
    (tmp_path / "fake.glb").write_text("this is not a mesh\n" * 10)
    with pytest.raises(MeshError, match="fake.glb: could not read"):
        load_mesh(tmp_path / "fake.glb")


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(MeshError, match="no such file"):
        load_mesh(tmp_path / "nope.obj")
    (tmp_path / "a.fbx").write_bytes(b"x")
    with pytest.raises(MeshError, match="unsupported format"):
        load_mesh(tmp_path / "a.fbx")


def test_empty_and_point_only_meshes(tmp_path):
    (tmp_path / "empty.obj").write_text("# nothing\n")
    with pytest.raises(MeshError, match="no triangle faces"):
        load_mesh(tmp_path / "empty.obj")
    (tmp_path / "pts.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    with pytest.raises(MeshError, match="no triangle faces"):
        load_mesh(tmp_path / "pts.obj")


def test_nan_vertices(tmp_path):
    (tmp_path / "nan.obj").write_text("v 0 0 0\nv nan 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(MeshError, match="NaN or infinite"):
        load_mesh(tmp_path / "nan.obj")


def test_face_and_size_limits(tmp_path):
    trimesh.creation.icosphere(subdivisions=2).export(tmp_path / "s.stl")
    assert len(load_mesh(tmp_path / "s.stl", max_faces=320).faces) == 320
    with pytest.raises(MeshError, match="the limit is 100"):
        load_mesh(tmp_path / "s.stl", max_faces=100)
    with pytest.raises(MeshError, match="the limit is 1000"):
        load_mesh(tmp_path / "s.stl", max_bytes=1000)


def test_zip_bomb_like_sizes(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.obj", b"\0" * (4 * 2**20))  # 4 MiB of zeros, a few KiB zipped
    assert path.stat().st_size < 64 * 1024
    with pytest.raises(MeshError, match="the limit is 1048576"):
        load_mesh(path, max_zip_bytes=2**20)


def test_zip_too_many_members(tmp_path):
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(20):
            zf.writestr(f"f{i}.txt", b"x")
    with pytest.raises(MeshError, match="20 zip entries, the limit is 10"):
        load_mesh(path, max_zip_members=10)


@pytest.mark.parametrize("name", ["../x.obj", "/abs/x.obj", "a/../../x.obj", "C:/x.obj"])
def test_zip_member_path_escape(tmp_path, name):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(name, "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(MeshError, match="escapes the archive"):
        load_mesh(path)
    assert not (tmp_path.parent / "x.obj").exists()


def test_zip_without_mesh_and_broken_zip(tmp_path):
    path = tmp_path / "nomesh.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(MeshError, match="no mesh file"):
        load_mesh(path)
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(MeshError, match="not a readable zip"):
        load_mesh(tmp_path / "broken.zip")


def test_mesh_error_is_value_error():
    assert issubclass(MeshError, ValueError)


@pytest.mark.parametrize(
    "name, textured",
    [
        ("panda.glb", True),
        ("duck.glb", True),
        ("teapot.stl", False),
        ("rainbow_torus.ply", False),
        ("blocks.glb", False),
    ],
)
def test_example_meshes_load_and_are_licensed(name, textured):
    path = ASSETS / "meshes" / name
    assert path.stat().st_size < 400_000
    mesh = load_mesh(path)
    assert_normalised(mesh)
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals) == textured
    assert f"`meshes/{name}`" in (ASSETS / "LICENSES.md").read_text()
