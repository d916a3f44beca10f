"""Cheap element counts of a mesh file, from its header or a streaming byte scan.

``load_mesh`` uses them to refuse an oversized file before trimesh parses it: parsing a
10M-face OBJ takes gigabytes and minutes, counting it a fraction of a second in bounded memory.
Counts are triangles as trimesh makes them (polygons fan into k - 2 triangles) and vertices as
stored in the file. Malformed headers raise ``ValueError`` describing the problem (without the
file name, which the caller adds).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

CHUNK_BYTES = 2**20  # streaming reads; 1 MiB keeps the numpy work per chunk in cache
MAX_HEADER_BYTES = 64 * 2**10  # PLY / OFF headers
MAX_JSON_BYTES = 64 * 2**20  # glTF JSON (.gltf file or the first .glb chunk)
MAX_LINE_BYTES = 16 * 2**20  # a longer OBJ line is not an OBJ
MAX_COUNT = 2**40  # any bigger count in a header is corrupt
_PLY_TYPE_BYTES = {
    **dict.fromkeys(("char", "uchar", "int8", "uint8"), 1),
    **dict.fromkeys(("short", "ushort", "int16", "uint16"), 2),
    **dict.fromkeys(("int", "uint", "int32", "uint32", "float", "float32"), 4),
    **dict.fromkeys(("double", "float64"), 8),
}
_GL_TRIANGLES, _GL_TRIANGLE_STRIP, _GL_TRIANGLE_FAN = 4, 5, 6


@dataclass(frozen=True)
class MeshCounts:
    """Triangles and vertices of a mesh file, counted without parsing its geometry."""

    faces: int
    vertices: int


def count_mesh_elements(path: str | Path) -> MeshCounts:
    """Count the triangles and vertices of a .obj/.ply/.stl/.off/.glb/.gltf file cheaply.

    Exact for OBJ, STL and glTF/GLB and for triangle-only PLY/OFF files. PLY and OFF polygons
    are read from the header as one face each (a lower bound), except in binary PLY files whose
    layout lets the file size give the number of polygon corners. glTF meshes count once per
    scene node using them (at least once: trimesh parses unused meshes too). Other suffixes
    raise ``ValueError``, and so do malformed headers.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    counter = _COUNTERS.get(suffix)
    if counter is None:
        raise ValueError(
            f"cannot count the elements of a {suffix!r} file; countable: {tuple(_COUNTERS)}"
        )
    return counter(path)


# ---------------------------------------------------------------------------- OBJ


def _count_obj(path: Path) -> MeshCounts:
    """Stream whole lines: "f" lines give k - 2 triangles for k corners, "v" lines a vertex.

    Like trimesh, a directive must start its line; ``\\``-continued face lines count only
    their first line's corners (a lower bound for such rare files).
    """
    faces = vertices = 0
    rest = b""  # an unfinished last line, carried to the next chunk
    with open(path, "rb") as f:
        chunk = f.read(CHUNK_BYTES).removeprefix(b"\xef\xbb\xbf")  # UTF-8 BOM
        while chunk:
            end = chunk.rfind(b"\n") + 1
            if end == 0:
                rest += chunk
                if len(rest) > MAX_LINE_BYTES:
                    raise ValueError(f"a line longer than {MAX_LINE_BYTES} bytes: not an OBJ file")
            else:
                lines = b"".join((rest, memoryview(chunk)[:end]))
                rest = chunk[end:]
                f_count, v_count = _count_obj_lines(lines)
                faces += f_count
                vertices += v_count
            chunk = f.read(CHUNK_BYTES)
    if rest:
        f_count, v_count = _count_obj_lines(rest + b"\n")
        faces += f_count
        vertices += v_count
    return MeshCounts(faces, vertices)


def _count_obj_lines(buf: bytes) -> tuple[int, int]:
    """(triangles, vertices) in whole OBJ lines; ``buf`` starts a line and ends with a newline."""
    data = np.frombuffer(buf, np.uint8)
    ends = np.flatnonzero(data == ord("\n"))  # the newline of each line
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    key = data[starts]
    after = data[np.minimum(starts + 1, len(data) - 1)]
    directive = (after == ord(" ")) | (after == ord("\t"))  # "v 1 2 3", not "vt 0 1"
    vertices = int(np.count_nonzero(directive & (key == ord("v"))))
    is_face = directive & (key == ord("f"))
    if not is_face.any():
        return 0, vertices
    face_starts, face_ends = starts[is_face], ends[is_face]
    # Corners of a face line = tokens after its "f": count whitespace -> non-whitespace steps
    # over the span holding the face lines, then sum them per line.
    lo, hi = int(face_starts[0]), int(face_ends[-1]) + 1
    blank = data[lo:hi] <= ord(" ")  # space, tab, \r, \n
    token_start = blank[:-1] > blank[1:]  # [i]: a token begins at lo + i + 1
    # Tokens beginning in (start, end) are token_start[start - lo : end - lo - 1]; face lines
    # are at least "f \n", so the bounds strictly increase and stay inside token_start.
    bounds = np.empty(2 * len(face_starts), np.int64)
    bounds[0::2] = face_starts - lo
    bounds[1::2] = face_ends - lo - 1
    corners = np.add.reduceat(token_start, bounds, dtype=np.int64)[0::2]
    return int(np.maximum(corners - 2, 0).sum()), vertices


# ---------------------------------------------------------------------------- PLY


def _count_ply(path: Path) -> MeshCounts:
    """Counts of the "vertex" and "face" elements in the header (faces are polygons)."""
    with open(path, "rb") as f:
        head = f.read(MAX_HEADER_BYTES)
    if not head.startswith(b"ply"):
        raise ValueError(f"no 'ply' magic at the start (found {head[:8]!r})")
    marker = re.search(rb"end_header[ \t]*\r?\n", head)
    if marker is None:
        raise ValueError(f"no 'end_header' line in the first {MAX_HEADER_BYTES} bytes")
    fmt = ""
    elements: list[tuple[str, int, list[list[str]]]] = []  # (name, count, property lines)
    for line in head[: marker.start()].decode("latin-1").splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and len(words) >= 2:
            fmt = words[1]
        elif words[0] == "element":
            if len(words) != 3:
                raise ValueError(f"malformed element line {line.strip()!r}")
            elements.append((words[1], _parse_count(words[2], f"element {words[1]}"), []))
        elif words[0] == "property":
            if not elements:
                raise ValueError(f"property before any element: {line.strip()!r}")
            elements[-1][2].append(words[1:])
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ValueError(f"unknown PLY format {fmt!r}")
    counts = {name: n for name, n, _ in elements}
    faces, vertices = counts.get("face", 0), counts.get("vertex", 0)
    if fmt != "ascii":
        data_bytes = path.stat().st_size - marker.end()
        faces = _ply_binary_triangles(elements, data_bytes) or faces
    return MeshCounts(faces, vertices)


def _ply_binary_triangles(elements: list[tuple[str, int, list[list[str]]]], data_bytes: int) -> int:
    """Triangles of a binary PLY's polygons from the file size, or 0 when it cannot tell.

    Works when every element has fixed-size rows except "face", whose only list is its
    corner indices: the bytes left after the fixed parts are then corners * index size.
    """
    fixed = 0
    list_types = None
    n_faces = 0
    for name, n, props in elements:
        row = 0
        for prop in props:
            if prop[0] == "list" and len(prop) == 4 and name == "face" and list_types is None:
                list_types = (prop[1], prop[2])
            elif len(prop) == 2 and prop[0] in _PLY_TYPE_BYTES:
                row += _PLY_TYPE_BYTES[prop[0]]
            else:
                return 0  # another list, or a type we do not know
        fixed += n * row
        if name == "face":
            n_faces = n
    if list_types is None or n_faces == 0 or not set(list_types) <= _PLY_TYPE_BYTES.keys():
        return 0
    count_bytes, index_bytes = (_PLY_TYPE_BYTES[t] for t in list_types)
    left = data_bytes - fixed - n_faces * count_bytes
    if left < 3 * n_faces * index_bytes or left % index_bytes:
        return 0  # truncated file or trailing bytes: keep the header's polygon count
    return left // index_bytes - 2 * n_faces


# ---------------------------------------------------------------------------- STL


def _count_stl(path: Path) -> MeshCounts:
    """Binary: the header's triangle count; ASCII: "endfacet" keywords. 3 vertices a face."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(84)
        if len(head) == 84:
            n = struct.unpack("<I", head[80:84])[0]
            if 84 + 50 * n == size:  # binary: 50 bytes a triangle after the 84-byte header
                return MeshCounts(n, 3 * n)
        f.seek(0)  # like trimesh, anything that is not a consistent binary STL is read as ASCII
        n = _count_keyword(f, b"endfacet")
    return MeshCounts(n, 3 * n)


def _count_keyword(f: BinaryIO, word: bytes) -> int:
    """Case-insensitive occurrences of lower-case ``word`` in the rest of ``f``, streamed."""
    total = 0
    tail = b""  # shorter than ``word``: a match is never counted twice
    while chunk := f.read(CHUNK_BYTES):
        buf = tail + chunk.lower()
        total += buf.count(word)
        tail = buf[len(buf) - len(word) + 1 :]
    return total


# ---------------------------------------------------------------------------- OFF


def _count_off(path: Path) -> MeshCounts:
    """Vertex and face counts after the "OFF" keyword (faces are polygons)."""
    with open(path, "rb") as f:
        head = f.read(MAX_HEADER_BYTES)
    if len(head) == MAX_HEADER_BYTES:
        head = head[: head.rfind(b"\n") + 1]  # do not read a number cut by the cap
    tokens: list[str] = []
    for line in head.decode("latin-1").splitlines():
        tokens += line.split("#", 1)[0].split()
        if len(tokens) >= 3:
            break
    if not tokens or not re.fullmatch(r"[A-Za-z0-9]*OFF", tokens[0]):
        raise ValueError(f"no OFF keyword at the start (found {tokens[:1]})")
    if len(tokens) < 3:
        raise ValueError(f"no vertex and face counts after {tokens[0]!r}")
    vertices = _parse_count(tokens[1], "vertex")
    faces = _parse_count(tokens[2], "face")
    return MeshCounts(faces, vertices)


# ---------------------------------------------------------------------------- glTF


def _count_glb(path: Path) -> MeshCounts:
    """Counts from the JSON chunk of a GLB; the binary chunk is not read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(20)
        if len(head) < 20:
            raise ValueError(f"{size} bytes, shorter than a GLB header")
        magic, version, _, json_bytes, kind = struct.unpack("<4sIII4s", head)
        if magic != b"glTF":
            raise ValueError(f"no GLB header (starts with {magic!r}, not b'glTF')")
        if version != 2:
            raise ValueError(f"GLB version {version}; only version 2 is supported")
        if kind != b"JSON":
            raise ValueError(f"the first GLB chunk is {kind!r}, not b'JSON'")
        if json_bytes > MAX_JSON_BYTES:
            raise ValueError(f"JSON chunk of {json_bytes} bytes, the limit is {MAX_JSON_BYTES}")
        if 20 + json_bytes > size:
            raise ValueError(f"JSON chunk of {json_bytes} bytes runs past the end of the file")
        return _count_gltf_json(f.read(json_bytes))


def _count_gltf(path: Path) -> MeshCounts:
    """Counts from a .gltf JSON file; buffers are not read."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"glTF JSON of {size} bytes, the limit is {MAX_JSON_BYTES}")
    return _count_gltf_json(path.read_bytes())


def _count_gltf_json(data: bytes) -> MeshCounts:
    """Sum each mesh's primitives times the number of scene nodes that instance the mesh.

    Triangle lists give index count / 3 triangles, strips and fans count - 2; points and lines
    give vertices only. A mesh no node of the scene uses counts once (trimesh still parses it).
    """
    try:
        tree = json.loads(data)
    except (ValueError, RecursionError) as e:  # also bad UTF-8 and absurd nesting
        raise ValueError(f"invalid glTF JSON ({e})") from e
    if not isinstance(tree, dict):
        raise ValueError("the glTF JSON is not an object")
    accessors = _gltf_list(tree, "accessors")
    meshes = _gltf_list(tree, "meshes")
    instances = _gltf_instances(tree, len(meshes))
    faces = vertices = 0
    for i, mesh in enumerate(meshes):
        mesh_faces = mesh_vertices = 0
        for prim in _gltf_list(mesh, "primitives", f"meshes[{i}]"):
            if not isinstance(prim, dict) or not isinstance(prim.get("attributes", {}), dict):
                raise ValueError(f"meshes[{i}] has a malformed primitive")
            position = prim.get("attributes", {}).get("POSITION")
            n_vertices = 0 if position is None else _accessor_count(accessors, position)
            n_indices = n_vertices
            if "indices" in prim:
                n_indices = _accessor_count(accessors, prim["indices"])
            mode = prim.get("mode", _GL_TRIANGLES)
            if mode == _GL_TRIANGLES:
                mesh_faces += n_indices // 3
            elif mode in (_GL_TRIANGLE_STRIP, _GL_TRIANGLE_FAN):
                mesh_faces += max(n_indices - 2, 0)
            mesh_vertices += n_vertices
        copies = max(instances[i], 1)
        faces += copies * mesh_faces
        vertices += copies * mesh_vertices
    return MeshCounts(faces, vertices)


def _gltf_instances(tree: dict, n_meshes: int) -> list[int]:
    """How many nodes of the default scene use each mesh (all nodes when there is no scene)."""
    nodes = _gltf_list(tree, "nodes")
    scenes = _gltf_list(tree, "scenes")
    if scenes:
        scene = scenes[_gltf_index(tree.get("scene", 0), len(scenes), "scene")]
        if not isinstance(scene, dict):
            raise ValueError("a glTF scene is not an object")
        stack = list(_gltf_list(scene, "nodes", "the scene"))
        used: set[int] = set()  # each node once, as in trimesh's graph (and no cycles)
        while stack:
            i = _gltf_index(stack.pop(), len(nodes), "node")
            if i not in used:
                used.add(i)
                stack.extend(_gltf_list(nodes[i], "children", f"nodes[{i}]"))
    else:
        used = set(range(len(nodes)))
    counts = [0] * n_meshes
    for i in used:
        if not isinstance(nodes[i], dict):
            raise ValueError(f"nodes[{i}] is not an object")
        if "mesh" in nodes[i]:
            counts[_gltf_index(nodes[i]["mesh"], n_meshes, "mesh")] += 1
    return counts


def _gltf_list(obj: object, key: str, where: str = "the glTF JSON") -> list:
    """``obj[key]`` as a list (empty when missing); ``obj`` must be an object."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is not an object")
    value = obj.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"{where}: {key!r} is not a list")
    return value


def _gltf_index(i: object, n: int, what: str) -> int:
    """A glTF index checked against the length of the list it points into."""
    if type(i) is not int or not 0 <= i < n:
        raise ValueError(f"{what} index {i!r} is not in [0, {n})")
    return i


def _accessor_count(accessors: list, i: object) -> int:
    """The element count of accessor ``i``."""
    accessor = accessors[_gltf_index(i, len(accessors), "accessor")]
    if not isinstance(accessor, dict):
        raise ValueError(f"accessors[{i}] is not an object")
    return _check_count(accessor.get("count"), f"accessors[{i}]")


# ---------------------------------------------------------------------------- shared


def _parse_count(text: str, what: str) -> int:
    """A header count as a plausible non-negative int."""
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"{what} count {text!r} is not an integer") from None
    return _check_count(n, what)


def _check_count(n: object, what: str) -> int:
    """``n`` itself when it is an int in [0, MAX_COUNT]."""
    if type(n) is not int or not 0 <= n <= MAX_COUNT:
        raise ValueError(f"{what} count {n!r} is not an integer in [0, 2**40]")
    return n


_COUNTERS: dict[str, Callable[[Path], MeshCounts]] = {
    ".obj": _count_obj,
    ".ply": _count_ply,
    ".stl": _count_stl,
    ".off": _count_off,
    ".glb": _count_glb,
    ".gltf": _count_gltf,
}
