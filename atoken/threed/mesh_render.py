"""Headless multiview rendering of a mesh on CPU, and mesh -> AToken voxel input.

``render_views`` draws RGBA uint8 images and camera-z depth (float32, -1 where empty) for a list
of ``atoken.core.cameras.Camera`` in the packer's convention: OpenCV axes, normalised intrinsics
(``u = fx x / z + cx`` with ``[0, 1]`` across the image) and pixel ``(r, q)`` sampled at its
centre ``((q + 0.5) / W, (r + 0.5) / H)``, as Blender renders the official training views.
(The packer then back-projects from top-left corners: that half-pixel shift is official.)

Two backends give the same pictures up to edge pixels:

* ``"gl"``: OpenGL through moderngl on a headless EGL context (Mesa's llvmpipe on CPU); used when
  moderngl imports and a context can be created.
* ``"torch"``: our own vectorised z-buffer rasteriser, no dependency beyond torch; the fallback.

Shading: the texture, vertex or face colour (alpha ignored) times ``AMBIENT + (1 - AMBIENT) *
max(0, n . LIGHT)``, with flat face normals turned toward the camera and a fixed world light
from above (``shading="lambert"``), or the plain colour (``shading="flat"``). Textures are
sampled bilinearly with repeat wrapping, without mipmaps. Faces that reach behind the near
plane are dropped (orbit cameras never get that close). One sample per pixel, no antialiasing.

``mesh_to_voxels`` renders the normalised asset from Hammersley orbit cameras (TRELLIS's radius
2 and 40 degree fov, so the unit-box asset fills about 70% of the frame) and packs the views
with ``atoken.threed.multiview.pack_arrays`` (500k surface-point cap, as official). Depth is rounded to
float16 first, as the official EXR step does.

Default ``DEFAULT_VIEWS = 16`` views at ``DEFAULT_RESOLUTION = 512`` px (also the official
script's view count and TRELLIS's render size), chosen with ``python
benchmarks/bench_mesh_render.py --part curve``. Mean over the five example meshes, against the
uncapped occupancy of a 150-view 512 px render ("seen": share of voxels whose feature view shows
them; the official nearest-camera rule has no visibility test, so 100% is out of reach):

    views x px   8x256  16x256  32x256  8x512  16x512  32x512  64x512  150x512
    voxel IoU    0.891   0.925   0.927  0.928   0.941   0.940   0.940    0.943
    seen         0.759   0.814   0.812  0.759   0.816   0.813   0.815    0.818

16 views at 512 px is the knee: within 0.002 of 150 views on both, for about a tenth of the
render time. 8 views lose surface and visibility; 256 px renders shift the corner
back-projection by a larger half pixel and skip the antialiasing that the 512 -> 256 Lanczos
step gives the features.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import trimesh
from torch import Tensor

from atoken.core.cameras import Camera, orbit_cameras
from atoken.threed.mesh import load_mesh, normalize_mesh
from atoken.threed.multiview import MAX_SURFACE_POINTS, pack_arrays

DEFAULT_VIEWS = 16
DEFAULT_RESOLUTION = 512
DEFAULT_RADIUS = 2.0  # TRELLIS render distance
DEFAULT_FOV = math.radians(40.0)  # TRELLIS render fov
AMBIENT = 0.7
LIGHT = (0.3, -0.2, 1.0)  # world direction toward the light (world +Z is up)
NEAR = 1e-3
FAR = 1e3
MAX_RESOLUTION = 4096
MAX_VIEWS = 1024
BACKENDS = ("gl", "torch")
_FRAGMENT_CHUNK = 1 << 22  # fragments per vectorised step of the torch rasteriser


@dataclass
class RenderMesh:
    """A mesh flattened for drawing: per-face-corner positions and colour sources (float32)."""

    corners: Tensor  # [F, 3, 3] world positions
    normals: Tensor  # [F, 3] unit face normals
    colours: Tensor | None  # [F, 3, 3] RGB in [0, 1] per corner, or None if textured
    uv: Tensor | None  # [F, 3, 2] texture coordinates (origin bottom-left), or None
    texture: Tensor | None  # [h, w, 3] RGB in [0, 1], rows top first


def prepare_mesh(mesh: trimesh.Trimesh) -> RenderMesh:
    """Flatten a trimesh (texture, vertex or face colours, or none = grey) for the renderers."""
    faces = np.asarray(mesh.faces, np.int64)
    verts = np.asarray(mesh.vertices, np.float64)
    corners = verts[faces]
    n = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    n = np.where(norm > 0, n / np.maximum(norm, 1e-300), 0.0)
    vis = mesh.visual
    colours = uv = texture = None
    image = getattr(getattr(vis, "material", None), "image", None)
    if isinstance(vis, trimesh.visual.TextureVisuals) and vis.uv is not None and image is not None:
        uv = torch.from_numpy(np.asarray(vis.uv, np.float32)[faces])
        rgb = np.asarray(image.convert("RGB"), np.float32) / 255.0
        texture = torch.from_numpy(rgb)
    else:
        kind = getattr(vis, "kind", None)
        if kind == "face":
            c = np.repeat(np.asarray(vis.face_colors, np.float32)[:, None, :3], 3, 1)
        elif kind == "vertex":
            c = np.asarray(vis.vertex_colors, np.float32)[faces][..., :3]
        else:
            c = np.full((len(faces), 3, 3), 204.0, np.float32)  # Blender's default grey
        colours = torch.from_numpy(c / 255.0)
    return RenderMesh(
        corners=torch.from_numpy(corners.astype(np.float32)),
        normals=torch.from_numpy(n.astype(np.float32)),
        colours=colours,
        uv=uv,
        texture=texture,
    )


def _check_cameras(cameras: list[Camera]) -> None:
    if not 0 < len(cameras) <= MAX_VIEWS:
        raise ValueError(f"need between 1 and {MAX_VIEWS} cameras, got {len(cameras)}")
    for cam in cameras:
        if not (0 < cam.width <= MAX_RESOLUTION and 0 < cam.height <= MAX_RESOLUTION):
            raise ValueError(
                f"camera size {cam.width}x{cam.height} is outside 1..{MAX_RESOLUTION} px"
            )


def _light() -> Tensor:
    light = torch.tensor(LIGHT, dtype=torch.float32)
    return light / light.norm()


# --------------------------------------------------------------------------------------------
# torch backend


def rasterize(rm: RenderMesh, cam: Camera) -> tuple[Tensor, Tensor]:
    """Z-buffer one view: ``face [H, W]`` int64 (-1 empty) and camera-z ``depth [H, W]``."""
    w2c = cam.w2c.float()
    pc = rm.corners @ w2c[:3, :3].T + w2c[:3, 3]  # [F, 3, 3] camera coordinates
    z = pc[..., 2]
    keep = (z > NEAR).all(1)
    zs = torch.where(keep[:, None], z, torch.ones_like(z))
    px = (cam.fx * pc[..., 0] / zs + cam.cx) * cam.width  # pixel q's centre sits at q + 0.5
    py = (cam.fy * pc[..., 1] / zs + cam.cy) * cam.height
    q0 = torch.ceil(px.amin(1) - 0.5).clamp(min=0)
    q1 = torch.floor(px.amax(1) - 0.5).clamp(max=cam.width - 1)
    r0 = torch.ceil(py.amin(1) - 0.5).clamp(min=0)
    r1 = torch.floor(py.amax(1) - 0.5).clamp(max=cam.height - 1)
    # Edge functions: w_i(x, y) = a_i x + b_i y + c_i, the barycentric of corner i.
    x0, x1, x2 = px.unbind(1)
    y0, y1, y2 = py.unbind(1)
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    keep &= (q1 >= q0) & (r1 >= r0) & (area.abs() > 1e-12)
    idx = keep.nonzero().squeeze(1)
    inv = 1.0 / area[idx]
    coef = torch.stack(
        [
            torch.stack([y1 - y2, x2 - x1, x1 * y2 - x2 * y1], 1)[idx] * inv[:, None],
            torch.stack([y2 - y0, x0 - x2, x2 * y0 - x0 * y2], 1)[idx] * inv[:, None],
        ],
        1,
    )  # [K, 2, 3]; w_2 = 1 - w_0 - w_1
    invz = 1.0 / z[idx]  # [K, 3]
    q0, r0 = q0[idx].long(), r0[idx].long()
    bw = q1[idx].long() - q0 + 1
    counts = bw * (r1[idx].long() - r0 + 1)
    h, w = cam.height, cam.width
    zbuf = torch.full((h * w,), torch.iinfo(torch.int64).max, dtype=torch.int64)
    ends = torch.cumsum(counts, 0)
    start = 0
    while start < len(idx):
        # Faces [start, stop) hold at most _FRAGMENT_CHUNK fragments (at least one face).
        base = int(ends[start - 1]) if start else 0
        stop = int(torch.searchsorted(ends, base + _FRAGMENT_CHUNK, right=True))
        stop = max(stop, start + 1)
        sel = torch.arange(start, stop)
        rep = torch.repeat_interleave(sel, counts[sel])
        k = torch.arange(base, base + len(rep)) - (ends[rep] - counts[rep])
        q = q0[rep] + k % bw[rep]
        r = r0[rep] + k // bw[rep]
        xc, yc = q.float() + 0.5, r.float() + 0.5
        c = coef[rep]  # [N, 2, 3]
        w0 = c[:, 0, 0] * xc + c[:, 0, 1] * yc + c[:, 0, 2]
        w1 = c[:, 1, 0] * xc + c[:, 1, 1] * yc + c[:, 1, 2]
        w2 = 1.0 - w0 - w1
        eps = -1e-5  # close the seams between neighbours; the z-buffer picks one
        inside = (w0 >= eps) & (w1 >= eps) & (w2 >= eps)
        iz = invz[rep]
        depth = 1.0 / (w0 * iz[:, 0] + w1 * iz[:, 1] + w2 * iz[:, 2])
        inside &= depth > NEAR
        depth, rep, pix = depth[inside], rep[inside], (r * w + q)[inside]
        # Pack (depth, face) into one int64: positive float32 bits sort like the floats.
        key = (depth.view(torch.int32).long() << 32) | rep
        zbuf.scatter_reduce_(0, pix, key, reduce="amin")
        start = stop
    hit = zbuf != torch.iinfo(torch.int64).max
    face = torch.full((h * w,), -1, dtype=torch.int64)
    face[hit] = idx[zbuf[hit] & 0xFFFFFFFF]
    depth = torch.full((h * w,), -1.0)
    depth[hit] = (zbuf[hit] >> 32).int().view(torch.float32)
    return face.view(h, w), depth.view(h, w)


def _sample_texture(texture: Tensor, uv: Tensor) -> Tensor:
    """Bilinear lookup with repeat wrapping; ``uv`` origin bottom-left -> RGB ``[N, 3]``."""
    th, tw = texture.shape[:2]
    x = uv[:, 0] * tw - 0.5
    y = (1.0 - uv[:, 1]) * th - 0.5
    xf, yf = torch.floor(x), torch.floor(y)
    ax, ay = (x - xf)[:, None], (y - yf)[:, None]
    xi, yi = xf.long(), yf.long()
    x0, x1 = xi % tw, (xi + 1) % tw
    y0, y1 = yi % th, (yi + 1) % th
    top = texture[y0, x0] * (1 - ax) + texture[y0, x1] * ax
    bottom = texture[y1, x0] * (1 - ax) + texture[y1, x1] * ax
    return top * (1 - ay) + bottom * ay


def _render_torch(rm: RenderMesh, cam: Camera, shading: str) -> tuple[np.ndarray, np.ndarray]:
    face, depth = rasterize(rm, cam)
    h, w = face.shape
    rgba = torch.zeros(h * w, 4)
    hit = (face >= 0).view(-1)
    f = face.view(-1)[hit]
    if len(f):
        # Perspective-correct barycentrics of each pixel centre in its face.
        rows, cols = torch.nonzero(face >= 0, as_tuple=True)
        w2c = cam.w2c.float()
        pc = rm.corners[f] @ w2c[:3, :3].T + w2c[:3, 3]  # [P, 3, 3]
        x = (cols.float() + 0.5) / w
        y = (rows.float() + 0.5) / h
        # Ray through the pixel centre in camera space, intersected with the face plane.
        ray = torch.stack(
            [(x - cam.cx) / cam.fx, (y - cam.cy) / cam.fy, torch.ones_like(x)], 1
        )  # [P, 3]
        p = ray * depth.view(-1)[hit][:, None]
        a, b, c = pc.unbind(1)
        v0, v1, v2 = b - a, c - a, p - a
        d00, d01, d11 = (v0 * v0).sum(1), (v0 * v1).sum(1), (v1 * v1).sum(1)
        d20, d21 = (v2 * v0).sum(1), (v2 * v1).sum(1)
        den = d00 * d11 - d01 * d01
        den = torch.where(den.abs() > 0, den, torch.ones_like(den))
        bb = ((d11 * d20 - d01 * d21) / den).clamp(0, 1)
        bc = ((d00 * d21 - d01 * d20) / den).clamp(0, 1)
        ba = (1 - bb - bc).clamp(0, 1)
        bary = torch.stack([ba, bb, bc], 1)
        bary = bary / bary.sum(1, keepdim=True).clamp(min=1e-12)
        if rm.texture is not None:
            uv = (rm.uv[f] * bary[:, :, None]).sum(1)
            colour = _sample_texture(rm.texture, uv)
        else:
            colour = (rm.colours[f] * bary[:, :, None]).sum(1)
        if shading == "lambert":
            n = rm.normals[f]
            cam_pos = torch.linalg.inv(w2c)[:3, 3]
            n = torch.where(((cam_pos - rm.corners[f, 0]) * n).sum(1, keepdim=True) < 0, -n, n)
            lit = AMBIENT + (1 - AMBIENT) * (n @ _light()).clamp(min=0)
            colour = colour * lit[:, None]
        rgba[hit, :3] = colour
        rgba[hit, 3] = 1.0
    img = (rgba.view(h, w, 4).clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
    return img, depth.numpy()


# --------------------------------------------------------------------------------------------
# OpenGL backend (moderngl, headless EGL)

_VERTEX_SHADER = """
#version 330
uniform mat4 w2c;
uniform vec4 intr;  // fx, fy, cx, cy (normalised)
uniform vec2 clip;  // near, far
in vec3 in_pos;
in vec3 in_normal;
in vec3 in_colour;
in vec2 in_uv;
out vec3 v_pos;
out vec3 v_normal;
out vec3 v_colour;
out vec2 v_uv;
out float v_z;
void main() {
    vec4 pc = w2c * vec4(in_pos, 1.0);
    float z = pc.z;
    float n = clip.x, f = clip.y;
    // u = fx x / z + cx in [0, 1] -> x_ndc = 2u - 1; v likewise, so the first row read back
    // (window bottom) is the image top.
    gl_Position = vec4(2.0 * intr.x * pc.x + (2.0 * intr.z - 1.0) * z,
                       2.0 * intr.y * pc.y + (2.0 * intr.w - 1.0) * z,
                       (z * (f + n) - 2.0 * f * n) / (f - n), z);
    v_pos = in_pos;
    v_normal = in_normal;
    v_colour = in_colour;
    v_uv = in_uv;
    v_z = z;
}
"""

_FRAGMENT_SHADER = """
#version 330
uniform sampler2D tex;
uniform bool use_texture;
uniform bool use_lambert;
uniform vec3 cam_pos;
uniform vec3 light;
uniform float ambient;
in vec3 v_pos;
in vec3 v_normal;
in vec3 v_colour;
in vec2 v_uv;
in float v_z;
layout(location = 0) out vec4 out_colour;
layout(location = 1) out float out_depth;
void main() {
    vec3 c = use_texture ? texture(tex, vec2(v_uv.x, 1.0 - v_uv.y)).rgb : v_colour;
    if (use_lambert) {
        vec3 n = v_normal;
        if (dot(cam_pos - v_pos, n) < 0.0) n = -n;
        c *= ambient + (1.0 - ambient) * max(dot(n, light), 0.0);
    }
    out_colour = vec4(c, 1.0);
    out_depth = v_z;
}
"""

_gl_local = threading.local()


def _gl_context():
    """This thread's moderngl context and program, or None when OpenGL is unavailable."""
    if not hasattr(_gl_local, "state"):
        state = None
        try:
            import moderngl

            ctx = moderngl.create_context(standalone=True, backend="egl")
            prog = ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
            state = (ctx, prog)
        except Exception:  # no moderngl, no libEGL, no driver: use the torch backend
            state = None
        _gl_local.state = state
    return _gl_local.state


def gl_available() -> bool:
    """Whether the OpenGL backend can run here (moderngl + a headless EGL context)."""
    return _gl_context() is not None


def _render_gl_all(
    rm: RenderMesh, cameras: list[Camera], shading: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    import moderngl

    ctx, prog = _gl_context()
    nf = len(rm.corners)
    pos = rm.corners.reshape(-1, 3)
    normal = rm.normals[:, None].expand(nf, 3, 3).reshape(-1, 3)
    colour = rm.colours.reshape(-1, 3) if rm.colours is not None else torch.zeros(nf * 3, 3)
    uv = rm.uv.reshape(-1, 2) if rm.uv is not None else torch.zeros(nf * 3, 2)
    data = torch.cat([pos, normal, colour, uv], 1).contiguous().numpy()
    out = []
    resources = []
    try:
        vbo = ctx.buffer(data.tobytes())
        resources.append(vbo)
        vao = ctx.vertex_array(
            prog, [(vbo, "3f 3f 3f 2f", "in_pos", "in_normal", "in_colour", "in_uv")]
        )
        resources.append(vao)
        if rm.texture is not None:
            tex_np = (rm.texture * 255 + 0.5).to(torch.uint8).contiguous().numpy()
            tex = ctx.texture((tex_np.shape[1], tex_np.shape[0]), 3, tex_np.tobytes())
            tex.filter = (moderngl.LINEAR, moderngl.LINEAR)
            tex.repeat_x = tex.repeat_y = True
            resources.append(tex)
            tex.use(0)
            prog["tex"].value = 0
        prog["use_texture"].value = rm.texture is not None
        prog["use_lambert"].value = shading == "lambert"
        prog["light"].value = tuple(_light().tolist())
        prog["ambient"].value = AMBIENT
        prog["clip"].value = (NEAR, FAR)
        ctx.enable(moderngl.DEPTH_TEST)
        ctx.disable(moderngl.CULL_FACE)
        fbos = {}
        for cam in cameras:
            size = (cam.width, cam.height)
            if size not in fbos:
                col = ctx.renderbuffer(size, 4, dtype="f1")
                dep = ctx.renderbuffer(size, 1, dtype="f4")
                zb = ctx.depth_renderbuffer(size)
                fbos[size] = ctx.framebuffer(color_attachments=[col, dep], depth_attachment=zb)
                resources += [fbos[size], col, dep, zb]
            fbo = fbos[size]
            fbo.use()
            fbo.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
            w2c = cam.w2c.double()
            # moderngl takes matrices column-major.
            prog["w2c"].write(w2c.float().T.contiguous().numpy().tobytes())
            prog["intr"].value = (cam.fx, cam.fy, cam.cx, cam.cy)
            prog["cam_pos"].value = tuple(torch.linalg.inv(w2c)[:3, 3].tolist())
            vao.render(moderngl.TRIANGLES)
            w, h = size
            rgba = np.frombuffer(fbo.read(components=4, attachment=0), np.uint8).reshape(h, w, 4)
            depth = np.frombuffer(
                fbo.read(components=1, attachment=1, dtype="f4"), np.float32
            ).reshape(h, w)
            rgba = rgba.copy()
            depth = np.where(rgba[..., 3] > 0, depth, np.float32(-1.0)).astype(np.float32)
            out.append((rgba, depth))
    finally:
        for r in reversed(resources):
            r.release()
    return out


# --------------------------------------------------------------------------------------------
# public API


def render_views(
    mesh: trimesh.Trimesh | RenderMesh,
    cameras: list[Camera],
    *,
    backend: str | None = None,
    shading: str = "lambert",
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``rgba [V, H, W, 4]`` uint8 and camera-z ``depth [V, H, W]`` float32 (-1 empty).

    ``backend``: "gl", "torch" or None (GL when available, else torch). All cameras must share
    one image size.
    """
    _check_cameras(cameras)
    if len({(c.width, c.height) for c in cameras}) != 1:
        raise ValueError("all cameras of one render_views call must share one image size")
    if shading not in ("lambert", "flat"):
        raise ValueError(f"shading must be 'lambert' or 'flat', got {shading!r}")
    if backend is None:
        backend = "gl" if gl_available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend == "gl" and not gl_available():
        raise ValueError("the 'gl' backend needs moderngl and a headless EGL (libEGL + Mesa)")
    rm = mesh if isinstance(mesh, RenderMesh) else prepare_mesh(mesh)
    if backend == "gl":
        views = _render_gl_all(rm, cameras, shading)
    else:
        views = [_render_torch(rm, cam, shading) for cam in cameras]
    rgba = np.stack([v[0] for v in views])
    depth = np.stack([v[1] for v in views])
    return rgba, depth


def default_cameras(
    num_views: int = DEFAULT_VIEWS,
    resolution: int = DEFAULT_RESOLUTION,
    *,
    radius: float = DEFAULT_RADIUS,
    fov: float = DEFAULT_FOV,
) -> list[Camera]:
    """Hammersley orbit cameras around the origin, offset to avoid the poles."""
    return orbit_cameras(
        num_views, radius=radius, fov=fov, resolution=resolution, offset=(0.0, 0.5 / num_views)
    )


def mesh_to_voxels(
    mesh_or_path: trimesh.Trimesh | str | Path,
    *,
    num_views: int = DEFAULT_VIEWS,
    resolution: int = DEFAULT_RESOLUTION,
    radius: float = DEFAULT_RADIUS,
    fov: float = DEFAULT_FOV,
    backend: str | None = None,
    shading: str = "lambert",
    normalize: bool = True,
    max_points: int = MAX_SURFACE_POINTS,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Mesh (or mesh file) -> ``(feats [M, 768] float32, coords [M, 3] int32)`` AToken input.

    A path goes through ``load_mesh``; a Trimesh is normalised into [-0.5, 0.5]^3 unless
    ``normalize=False``. ``seed`` fixes the surface-point subsample above ``max_points``.
    """
    if not 0 < num_views <= MAX_VIEWS:
        raise ValueError(f"num_views must be in 1..{MAX_VIEWS}, got {num_views}")
    if not 16 <= resolution <= MAX_RESOLUTION:
        raise ValueError(f"resolution must be in 16..{MAX_RESOLUTION}, got {resolution}")
    if isinstance(mesh_or_path, trimesh.Trimesh):
        mesh = normalize_mesh(mesh_or_path) if normalize else mesh_or_path
    else:
        mesh = load_mesh(mesh_or_path)
    cameras = default_cameras(num_views, resolution, radius=radius, fov=fov)
    rgba, depth = render_views(mesh, cameras, backend=backend, shading=shading)
    # The official depth passes through a half-float EXR and a float16 .npy.
    depth = np.where(depth >= 0, depth.astype(np.float16).astype(np.float32), -1.0)
    generator = torch.Generator().manual_seed(seed)
    return pack_arrays(list(rgba), list(depth), cameras, max_points=max_points, generator=generator)
