"""Mesh input: load, validate, merge and normalise a 3D asset for multiview rendering.

Formats: .glb/.gltf, .obj (+ .mtl and textures), .ply, .stl, .off, and a .zip holding one of
them with its side files. Textured, vertex- or face-coloured and plain meshes are supported; a
plain mesh gets a neutral grey (Blender's default base colour, 0.8).

Scenes are merged with their scene-graph transforms applied, then the asset is put the way the
official data pipeline (TRELLIS-style Blender script) sees it:

* axes: Blender's importers turn glTF and OBJ (Y up) into Z up, i.e. ``(x, y, z) -> (x, -z, y)``,
  and leave PLY/STL/OFF as they are (Z up); ``up_axis`` overrides this;
* ``normalize_mesh``: scale so the largest side of the bounding box is 1, then centre the box at
  the origin, so the asset fills ``[-0.5, 0.5]^3``, the packer's voxel grid.

The merged mesh carries its colours either as one texture (``TextureVisuals`` with ``uv`` and an
RGBA image) or as per-vertex / per-face colours (``ColorVisuals``). Parts that mix textures with
non-uniform vertex colours are all turned into vertex colours (textures sampled at vertices).
"""

from __future__ import annotations

import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import trimesh
from PIL import Image

from atoken.io.media import MESH_EXTENSIONS, MESH_FORMATS
from atoken.threed.mesh_count import count_mesh_elements

MAX_FACES = 2_000_000
MAX_VERTICES = 3 * MAX_FACES  # an STL or unindexed glTF has 3 vertices per face
MAX_FILE_BYTES = 256 * 2**20  # size of the uploaded file
MAX_ZIP_BYTES = 512 * 2**20  # total uncompressed size of a zip's members
MAX_ZIP_MEMBERS = 256
MAX_TEXTURE_SIDE = 4096  # bigger textures are downscaled (renders are 512 px)
GREY = np.array([204, 204, 204, 255], np.uint8)  # Blender's default base colour 0.8
Y_UP_SUFFIXES = (".glb", ".gltf", ".obj")


class MeshError(ValueError):
    """A file that cannot be used as a mesh, with the reason and the limit involved."""


def load_mesh(
    path: str | Path,
    *,
    max_faces: int = MAX_FACES,
    max_vertices: int = MAX_VERTICES,
    max_bytes: int = MAX_FILE_BYTES,
    max_zip_bytes: int = MAX_ZIP_BYTES,
    max_zip_members: int = MAX_ZIP_MEMBERS,
    up_axis: str | None = None,
) -> trimesh.Trimesh:
    """Load a mesh file (or a zip with one) -> one merged, Z-up mesh normalised into [-0.5, 0.5]^3.

    ``up_axis`` is "y" or "z"; None picks it from the format as Blender's importers do.
    Faces and vertices are counted from the file's header (or a byte scan for OBJ / ASCII STL)
    before it is parsed, so an oversized file is refused cheaply.
    """
    path = Path(path)
    if not path.is_file():
        raise MeshError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in MESH_EXTENSIONS:
        raise MeshError(
            f"{path.name}: unsupported format {suffix!r}; use one of {sorted(MESH_EXTENSIONS)}"
        )
    size = path.stat().st_size
    if size > max_bytes:
        raise MeshError(f"{path.name}: file is {size} bytes, the limit is {max_bytes}")
    if up_axis not in (None, "y", "z"):
        raise MeshError(f"up_axis must be 'y', 'z' or None, got {up_axis!r}")
    if suffix != ".zip":
        return _load_file(path, max_faces=max_faces, max_vertices=max_vertices, up_axis=up_axis)
    with tempfile.TemporaryDirectory(prefix="atoken_mesh_") as tmp:
        member = extract_zip(path, Path(tmp), max_bytes=max_zip_bytes, max_members=max_zip_members)
        return _load_file(member, max_faces=max_faces, max_vertices=max_vertices, up_axis=up_axis)


def extract_zip(
    path: Path,
    dest: Path,
    *,
    max_bytes: int = MAX_ZIP_BYTES,
    max_members: int = MAX_ZIP_MEMBERS,
) -> Path:
    """Safely unpack a zip into ``dest`` and return the mesh file inside it.

    Refuses more than ``max_members`` entries, more than ``max_bytes`` uncompressed, absolute
    or ``..`` member paths and symlinks. With several mesh files, the first by format priority
    (glb, gltf, obj, ply, stl, off), then by name, is used.
    """
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise MeshError(f"{path.name}: not a readable zip file ({e})") from e
    with zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise MeshError(f"{path.name}: {len(infos)} zip entries, the limit is {max_members}")
        declared = sum(i.file_size for i in infos)
        if declared > max_bytes:
            raise MeshError(
                f"{path.name}: zip unpacks to {declared} bytes, the limit is {max_bytes}"
            )
        written = 0
        meshes = []
        for info in infos:
            rel = _safe_member_path(path.name, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise MeshError(f"{path.name}: zip member {info.filename!r} is a symlink")
            if info.is_dir():
                continue
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > max_bytes:  # do not trust the declared sizes alone
                        raise MeshError(f"{path.name}: zip unpacks to more than {max_bytes} bytes")
                    out.write(chunk)
            hidden = any(p.startswith(".") or p == "__MACOSX" for p in rel.parts)
            if rel.suffix.lower() in MESH_FORMATS and not hidden:
                meshes.append(target)
    if not meshes:
        raise MeshError(f"{path.name}: the zip holds no mesh file {MESH_FORMATS}")
    return min(meshes, key=lambda p: (MESH_FORMATS.index(p.suffix.lower()), str(p)))


def _safe_member_path(zip_name: str, name: str) -> PurePosixPath:
    """Member name -> relative path; absolute, drive or ``..`` paths raise."""
    norm = name.replace("\\", "/")
    rel = PurePosixPath(norm)
    if norm.startswith("/") or rel.is_absolute() or ".." in rel.parts or ":" in norm:
        raise MeshError(f"{zip_name}: zip member path {name!r} escapes the archive")
    return rel


def _load_file(
    path: Path, *, max_faces: int, max_vertices: int, up_axis: str | None
) -> trimesh.Trimesh:
    suffix = path.suffix.lower()
    _check_counts(path, max_faces=max_faces, max_vertices=max_vertices)
    try:
        scene = trimesh.load_scene(str(path), file_type=suffix[1:], process=False)
    except MeshError:
        raise
    except Exception as e:  # trimesh raises many kinds of errors on malformed files
        raise MeshError(f"{path.name}: could not read it as {suffix[1:]} ({e})") from e
    nodes = []
    total = 0
    for node in scene.graph.nodes_geometry:
        transform, name = scene.graph[node]
        geom = scene.geometry.get(name)
        if isinstance(geom, trimesh.Trimesh) and len(geom.faces) > 0:
            total += len(geom.faces)
            if total > max_faces:
                raise MeshError(
                    f"{path.name}: more than {total} faces (with instances), the limit is "
                    f"{max_faces}"
                )
            nodes.append((transform, geom))
    if not nodes:
        raise MeshError(f"{path.name}: no triangle faces in this file (not a mesh, or empty)")
    parts = []
    for transform, geom in nodes:
        part = geom.copy()
        if not np.isfinite(part.vertices).all():
            raise MeshError(f"{path.name}: vertices contain NaN or infinite values")
        part.apply_transform(transform)
        parts.append(part)
    mesh = _merge(parts)
    if not np.isfinite(mesh.vertices).all():
        raise MeshError(f"{path.name}: transformed vertices contain NaN or infinite values")
    up = up_axis or ("y" if suffix in Y_UP_SUFFIXES else "z")
    if up == "y":  # Blender's glTF / OBJ import: Y up -> Z up
        mesh.apply_transform(_Y_UP_TO_Z_UP)
    return normalize_mesh(mesh)


def _check_counts(path: Path, *, max_faces: int, max_vertices: int) -> None:
    """Refuse a file whose header (or byte scan) shows too many faces or vertices."""
    try:
        counts = count_mesh_elements(path)
    except (ValueError, OSError) as e:
        raise MeshError(f"{path.name}: could not read it as {path.suffix.lower()[1:]} ({e})") from e
    if counts.faces > max_faces:
        raise MeshError(f"{path.name}: {counts.faces} faces, the limit is {max_faces}")
    if counts.vertices > max_vertices:
        raise MeshError(f"{path.name}: {counts.vertices} vertices, the limit is {max_vertices}")


# (x, y, z) -> (x, -z, y): a +90 degree turn about X.
_Y_UP_TO_Z_UP = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], np.float64)


def _texture_image(visual: trimesh.visual.TextureVisuals) -> Image.Image | None:
    """The base-colour image of a textured visual as RGBA (factor applied), or None."""
    mat = visual.material
    img = getattr(mat, "baseColorTexture", None)
    if img is None:
        img = getattr(mat, "image", None)
    if img is None or visual.uv is None:
        return None
    img = img.convert("RGBA")
    if max(img.size) > MAX_TEXTURE_SIDE:
        scale = MAX_TEXTURE_SIDE / max(img.size)
        img = img.resize(
            (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))),
            Image.LANCZOS,
        )
    factor = getattr(mat, "baseColorFactor", None)
    if factor is not None and not np.all(np.asarray(factor) == 255):
        arr = np.asarray(img).astype(np.float32) * (np.asarray(factor, np.float32) / 255.0)
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGBA")
    return img


def _solid_colour(visual) -> np.ndarray:
    """Main colour of a material without a usable texture (RGBA uint8)."""
    mat = getattr(visual, "material", None)
    colour = getattr(mat, "baseColorFactor", None)
    if colour is None:
        colour = getattr(mat, "diffuse", None)
    if colour is None:
        return GREY
    return np.asarray(trimesh.visual.color.to_rgba(colour), np.uint8).reshape(4)


def _canonical(part: trimesh.Trimesh) -> tuple[str, trimesh.Trimesh]:
    """Give a part one of: a texture, vertex colours, face colours; returns (kind, part)."""
    vis = part.visual
    n = len(part.vertices)
    if isinstance(vis, trimesh.visual.TextureVisuals):
        img = _texture_image(vis)
        if img is not None and len(vis.uv) == n:
            img.load()
            part.visual = trimesh.visual.TextureVisuals(
                uv=np.asarray(vis.uv, np.float64), image=img
            )
            return "texture", part
        part.visual = trimesh.visual.ColorVisuals(
            part, vertex_colors=np.tile(_solid_colour(vis), (n, 1))
        )
        return "uniform", part
    kind = getattr(vis, "kind", None)
    if kind == "face":
        # Corners of a face share its colour: unmerge so vertex colours can carry it.
        colours = np.asarray(vis.face_colors, np.uint8)
        part = trimesh.Trimesh(
            vertices=part.vertices[part.faces].reshape(-1, 3),
            faces=np.arange(3 * len(part.faces)).reshape(-1, 3),
            process=False,
        )
        part.visual = trimesh.visual.ColorVisuals(part, vertex_colors=np.repeat(colours, 3, 0))
        kind = "vertex"
    elif kind == "vertex":
        colours = np.asarray(vis.vertex_colors, np.uint8)
        part.visual = trimesh.visual.ColorVisuals(part, vertex_colors=colours)
    else:
        part.visual = trimesh.visual.ColorVisuals(part, vertex_colors=np.tile(GREY, (n, 1)))
        return "uniform", part
    if (colours == colours[:1]).all():
        return "uniform", part
    return "vertex", part


def _merge(parts: list[trimesh.Trimesh]) -> trimesh.Trimesh:
    """Concatenate parts into one mesh with one texture or one set of vertex colours."""
    kinds, parts = zip(*(_canonical(p) for p in parts))
    if "texture" in kinds and "vertex" in kinds:
        for p in parts:
            if isinstance(p.visual, trimesh.visual.TextureVisuals):
                colours = p.visual.to_color().vertex_colors
                p.visual = trimesh.visual.ColorVisuals(p, vertex_colors=colours)
    if len(parts) == 1:
        return parts[0]
    # trimesh packs several textures (and single colours) into one atlas.
    merged = trimesh.util.concatenate(list(parts))
    if isinstance(merged.visual, trimesh.visual.TextureVisuals):
        merged.visual.material.image = merged.visual.material.image.convert("RGBA")
    return merged


def normalize_mesh(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Copy scaled so the bounding box's largest side is 1 and centred at the origin (TRELLIS)."""
    if len(mesh.faces) == 0:
        raise MeshError("cannot normalise a mesh without faces")
    used = mesh.vertices[mesh.faces].reshape(-1, 3)
    lo, hi = used.min(0), used.max(0)
    extent = float((hi - lo).max())
    if not np.isfinite(extent) or extent <= 0:
        raise MeshError(f"cannot normalise a mesh whose bounding box has size {extent}")
    out = mesh.copy()
    out.apply_scale(1.0 / extent)
    lo, hi = lo / extent, hi / extent
    out.apply_translation(-(lo + hi) / 2)
    return out


def mesh_to_glb(mesh: trimesh.Trimesh, path: str | Path) -> Path:
    """Write a .glb preview (turned back to glTF's Y up so viewers show it upright).

    ``Gaussians.save_ply`` writes the .ply splat of the same object in the pose of this preview."""
    path = Path(path)
    out = mesh.copy()
    out.apply_transform(np.linalg.inv(_Y_UP_TO_Z_UP))
    out.export(str(path), file_type="glb")
    return path
