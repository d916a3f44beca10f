"""Pre-parse mesh counts: exact per format, agreement with trimesh, and cheap refusals."""

from __future__ import annotations

import base64
import json
import struct
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import trimesh

import atoken.threed.mesh_count as mesh_count
from atoken.threed.mesh import MeshError, load_mesh
from atoken.threed.mesh_count import MeshCounts, count_mesh_elements

ASSETS = Path(__file__).resolve().parents[2] / "assets"
EXAMPLE_MESHES = [
    ASSETS / "examples" / "pencil.glb",
    *sorted(p for p in (ASSETS / "meshes").iterdir() if p.suffix != ".py"),
]
# 5 vertices, vt / vn lines, a triangle, a quad (2), a pentagon after a tab (3), a line with
# extra spaces and CRLF (1) and a last line without newline (1): 8 triangles.
OBJ = (
    b"# a comment with f 1 2 3 inside\n"
    b"v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nv 0.5 1.5 0\n"
    b"vt 0 0\nvt 1 0\nvn 0 0 1\no thing\n"
    b"f 1 2 3\nf 1/1/1 2/2/1 3/1/1 4/2/1\nf\t1 2 3 4 5\ns off\n"
    b"f 1  2   4  \r\nf 2 3 4"
)


def trimesh_counts(path: Path) -> MeshCounts:
    """Faces and vertices trimesh finds over the scene's geometry nodes (instances included)."""
    scene = trimesh.load_scene(str(path), process=False)
    faces = vertices = 0
    for node in scene.graph.nodes_geometry:
        geom = scene.geometry[scene.graph[node][1]]
        if isinstance(geom, trimesh.Trimesh):
            faces += len(geom.faces)
            vertices += len(geom.vertices)
    return MeshCounts(faces, vertices)


def sphere() -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=2)  # 320 faces, 162 vertices


# ---------------------------------------------------------------------------- formats


def test_obj_counts_polygons_and_skips_vt_vn(tmp_path):
    path = tmp_path / "poly.obj"
    path.write_bytes(OBJ)
    assert count_mesh_elements(path) == MeshCounts(8, 5)
    assert trimesh_counts(path) == MeshCounts(8, 5)
    (tmp_path / "bom.OBJ").write_bytes(b"\xef\xbb\xbf" + OBJ)
    assert count_mesh_elements(tmp_path / "bom.OBJ") == MeshCounts(8, 5)
    (tmp_path / "tabs.obj").write_bytes(b"v\t0 0 0\nv 1 0 0\nv 0 1 0\nvp 1\nf\t1 2 3\n")
    assert count_mesh_elements(tmp_path / "tabs.obj") == MeshCounts(1, 3)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_obj_chunk_boundaries(tmp_path, monkeypatch, chunk):
    path = tmp_path / "poly.obj"
    path.write_bytes(b"\n".join([OBJ] * 3))
    monkeypatch.setattr(mesh_count, "CHUNK_BYTES", chunk)
    assert count_mesh_elements(path) == MeshCounts(3 * 8, 3 * 5)


def test_obj_without_newlines_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(mesh_count, "MAX_LINE_BYTES", 100)
    monkeypatch.setattr(mesh_count, "CHUNK_BYTES", 64)
    (tmp_path / "blob.obj").write_bytes(b"x" * 1000)
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        count_mesh_elements(tmp_path / "blob.obj")


@pytest.mark.parametrize("encoding", ["ascii", "binary"])
def test_ply(tmp_path, encoding):
    path = tmp_path / "s.ply"
    path.write_bytes(trimesh.exchange.ply.export_ply(sphere(), encoding=encoding))
    assert count_mesh_elements(path) == MeshCounts(320, 162) == trimesh_counts(path)


def quad_ply(encoding: str) -> bytes:
    """Two quads with a per-face colour and a trailing element."""
    header = (
        f"ply\nformat {encoding} 1.0\ncomment two quads\nelement vertex 6\n"
        "property float x\nproperty float y\nproperty float z\n"
        "element face 2\nproperty list uchar int vertex_indices\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        "element extra 1\nproperty short value\nend_header\n"
    ).encode()
    xyz = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [0, 1, 0], [1, 1, 0], [2, 1, 0]], "<f4")
    quads = [[0, 1, 4, 3], [1, 2, 5, 4]]
    if encoding == "ascii":
        rows = [" ".join(map(str, v)) for v in xyz.tolist()]
        rows += [f"4 {' '.join(map(str, q))} 255 0 0" for q in quads] + ["7"]
        return header + ("\n".join(rows) + "\n").encode()
    body = xyz.tobytes()
    for q in quads:
        body += struct.pack("<B4i3B", 4, *q, 255, 0, 0)
    return header + body + struct.pack("<h", 7)


def test_ply_quads(tmp_path):
    binary, ascii_ = tmp_path / "q.ply", tmp_path / "qa.ply"
    binary.write_bytes(quad_ply("binary_little_endian"))
    ascii_.write_bytes(quad_ply("ascii"))
    # Binary: the file size gives the corners, so the 2 quads are 4 triangles as in trimesh.
    assert count_mesh_elements(binary) == MeshCounts(4, 6) == trimesh_counts(binary)
    # ASCII: the header's polygon count, a lower bound.
    assert count_mesh_elements(ascii_) == MeshCounts(2, 6)
    assert trimesh_counts(ascii_).faces == 4
    # Trailing bytes: the corner count is not trusted, the header's count is kept.
    binary.write_bytes(quad_ply("binary_little_endian") + b"\n")
    assert count_mesh_elements(binary) == MeshCounts(2, 6)


def test_stl_binary_and_ascii(tmp_path, monkeypatch):
    mesh = sphere()
    (tmp_path / "b.stl").write_bytes(trimesh.exchange.stl.export_stl(mesh))
    (tmp_path / "a.stl").write_text(trimesh.exchange.stl.export_stl_ascii(mesh).upper())
    for name in ["b.stl", "a.stl"]:
        assert count_mesh_elements(tmp_path / name) == MeshCounts(320, 960)
        assert trimesh_counts(tmp_path / name) == MeshCounts(320, 960)
    # A binary header may start with "solid": the size decides.
    data = bytearray(trimesh.exchange.stl.export_stl(mesh))
    data[:11] = b"solid fake "
    (tmp_path / "solid.stl").write_bytes(bytes(data))
    assert count_mesh_elements(tmp_path / "solid.stl") == MeshCounts(320, 960)
    monkeypatch.setattr(mesh_count, "CHUNK_BYTES", 5)  # keywords across chunk boundaries
    assert count_mesh_elements(tmp_path / "a.stl") == MeshCounts(320, 960)


def test_off(tmp_path):
    path = tmp_path / "s.off"
    path.write_text(trimesh.exchange.off.export_off(sphere()))
    assert count_mesh_elements(path) == MeshCounts(320, 162) == trimesh_counts(path)
    # Comments, counts on their own line, and a quad (one face: a lower bound).
    text = "# made by hand\nOFF # keyword\n\n# counts next\n4 1 0\n"
    text += "0 0 0\n1 0 0\n1 1 0\n0 1 0\n4 0 1 2 3\n"
    (tmp_path / "q.off").write_text(text)
    assert count_mesh_elements(tmp_path / "q.off") == MeshCounts(1, 4)
    assert trimesh_counts(tmp_path / "q.off").faces == 2
    (tmp_path / "c.off").write_text("COFF 3 1 0\n0 0 0 1 1 1 1\n")
    assert count_mesh_elements(tmp_path / "c.off") == MeshCounts(1, 3)


def test_glb_from_trimesh(tmp_path):
    scene = trimesh.Scene([sphere(), trimesh.creation.box()])
    scene.export(tmp_path / "two.glb")
    assert count_mesh_elements(tmp_path / "two.glb") == MeshCounts(332, 170)
    assert trimesh_counts(tmp_path / "two.glb") == MeshCounts(332, 170)


def triangle_gltf(buffer: dict) -> dict:
    """One triangle mesh used by two scene nodes and one node outside the scene; one strip."""
    return {
        "asset": {"version": "2.0"},
        "buffers": [buffer],
        "bufferViews": [
            {"buffer": 0, "byteOffset": 0, "byteLength": 36},
            {"buffer": 0, "byteOffset": 36, "byteLength": 6},
        ],
        "accessors": [
            {
                "bufferView": 0,
                "componentType": 5126,
                "count": 3,
                "type": "VEC3",
                "min": [0, 0, 0],
                "max": [1, 1, 0],
            },
            {"bufferView": 1, "componentType": 5123, "count": 3, "type": "SCALAR"},
        ],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0}, "indices": 1}]}],
        "nodes": [
            {"children": [1, 2]},
            {"mesh": 0, "translation": [2, 0, 0]},
            {"mesh": 0},
            {"mesh": 0, "translation": [5, 0, 0]},
        ],
        "scenes": [{"nodes": [0]}],
        "scene": 0,
    }


def triangle_buffer() -> bytes:
    xyz = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], "<f4").tobytes()
    return xyz + np.array([0, 1, 2], "<u2").tobytes() + b"\0\0"  # padded to 4 bytes


def test_gltf_instancing(tmp_path):
    data = triangle_buffer()
    uri = "data:application/octet-stream;base64," + base64.b64encode(data).decode()
    tree = triangle_gltf({"byteLength": len(data), "uri": uri})
    (tmp_path / "inst.gltf").write_text(json.dumps(tree))
    # Two nodes of the scene use the mesh; node 3 is outside the scene.
    assert count_mesh_elements(tmp_path / "inst.gltf") == MeshCounts(2, 6)
    assert trimesh_counts(tmp_path / "inst.gltf") == MeshCounts(2, 6)
    # Without scenes every node counts; strips and points count as documented.
    del tree["scenes"], tree["scene"]
    tree["meshes"].append({"primitives": [{"attributes": {"POSITION": 0}, "mode": 5}]})
    tree["meshes"].append({"primitives": [{"attributes": {"POSITION": 0}, "mode": 0}]})
    (tmp_path / "flat.gltf").write_text(json.dumps(tree))
    # 3 nodes x (1 face, 3 vertices) + strip (1 face, 3 vertices) + points (0, 3)
    assert count_mesh_elements(tmp_path / "flat.gltf") == MeshCounts(4, 15)


def test_glb_by_hand(tmp_path):
    data = triangle_buffer()
    text = json.dumps(triangle_gltf({"byteLength": len(data)})).encode()
    text += b" " * (-len(text) % 4)
    glb = struct.pack("<4sII", b"glTF", 2, 12 + 8 + len(text) + 8 + len(data))
    glb += struct.pack("<I4s", len(text), b"JSON") + text
    glb += struct.pack("<I4s", len(data), b"BIN\0") + data
    (tmp_path / "inst.glb").write_bytes(glb)
    assert count_mesh_elements(tmp_path / "inst.glb") == MeshCounts(2, 6)
    assert trimesh_counts(tmp_path / "inst.glb") == MeshCounts(2, 6)


@pytest.mark.parametrize("path", EXAMPLE_MESHES, ids=lambda p: p.name)
def test_example_meshes(path):
    assert count_mesh_elements(path) == trimesh_counts(path)
    assert len(load_mesh(path).faces) == count_mesh_elements(path).faces


# ---------------------------------------------------------------------------- bad files


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("a.zip", b"PK", "cannot count"),
        ("a.glb", b"this is not a mesh\n" * 3, "no GLB header"),
        ("a.glb", struct.pack("<4sIII4s", b"glTF", 2, 99, 2**30, b"JSON"), "the limit is"),
        ("a.glb", struct.pack("<4sIII4s", b"glTF", 2, 99, 100, b"JSON"), "past the end"),
        ("a.gltf", b"[1, 2]", "not an object"),
        ("a.gltf", b"{", "invalid glTF JSON"),
        (
            "a.gltf",
            b'{"accessors": [{"count": -3}], "meshes": [{"primitives": '
            b'[{"attributes": {"POSITION": 0}}]}]}',
            "count -3",
        ),
        (
            "a.gltf",
            b'{"meshes": [{"primitives": [{"attributes": {"POSITION": -1}}]}]}',
            "accessor index -1",
        ),
        ("a.gltf", b'{"nodes": [{"mesh": 4}], "meshes": []}', "mesh index 4"),
        ("a.ply", b"ply\nformat ascii 1.0\nelement vertex 3\n", "no 'end_header'"),
        ("a.ply", b"solid x\n", "no 'ply' magic"),
        (
            "a.ply",
            b"ply\nformat ascii 1.0\nelement vertex 99999999999999\nend_header\n",
            "not an integer in",
        ),
        ("a.ply", b"ply\nformat ascii 1.0\nelement face many\nend_header\n", "not an integer"),
        ("a.off", b"# only a comment\n", "no OFF keyword"),
        ("a.off", b"OFF\n3\n", "no vertex and face counts"),
        ("a.off", b"OFF 3 -1 0\n", "count -1"),
    ],
)
def test_malformed_headers(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=message):
        count_mesh_elements(tmp_path / name)


def test_load_mesh_names_file_and_problem(tmp_path):
    (tmp_path / "bad.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 3\n")
    with pytest.raises(MeshError, match="bad.ply: could not read it as ply .*end_header"):
        load_mesh(tmp_path / "bad.ply")


# ---------------------------------------------------------------------------- limits


def test_limits_checked_before_trimesh_parses(tmp_path, monkeypatch):
    (tmp_path / "s.stl").write_bytes(trimesh.exchange.stl.export_stl(sphere()))
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as zf:
        zf.write(tmp_path / "s.stl", "asset/s.stl")

    def refuse(*args, **kwargs):
        raise AssertionError("trimesh should not parse an over-limit file")

    monkeypatch.setattr(trimesh, "load_scene", refuse)
    with pytest.raises(MeshError, match="s.stl: 320 faces, the limit is 100"):
        load_mesh(tmp_path / "s.stl", max_faces=100)
    with pytest.raises(MeshError, match="s.stl: 960 vertices, the limit is 500"):
        load_mesh(tmp_path / "s.stl", max_vertices=500)
    with pytest.raises(MeshError, match="s.stl: 320 faces, the limit is 100"):
        load_mesh(tmp_path / "s.zip", max_faces=100)


def test_big_obj_refused_fast_in_little_memory(tmp_path):
    path = tmp_path / "big.obj"
    with open(path, "wb") as f:
        f.write(b"v 0 0 0\nv 1 0 0\nv 0 1 0\n")
        f.write(b"f 1/1/1 2/2/2 3/3/3\n" * 3_000_000)  # 60 MB; trimesh would need minutes
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(MeshError, match="big.obj: 3000000 faces, the limit is 1000000"):
            load_mesh(path, max_faces=1_000_000)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 3.0
    assert peak < 64 * 2**20  # streamed in chunks, never the whole file
