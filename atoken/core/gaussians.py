"""3D Gaussians: the Gaussian decoder's representation, its activations and .ply I/O (§5.4-5.5)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SH_C0 = 0.28209479177387814

# Representation constants of the released decoder (configs/3d_decode_gs.yaml).
SCALING_BIAS = 4e-3
OPACITY_BIAS = 0.1
FILTER_3D = 9e-4
FILTER_2D = 0.1  # the renderer's hard-coded mip 2D filter (the YAML value is unused)

# Frames a .ply can be written in. "z-up" is the pipeline's own frame (Blender / TRELLIS, the voxel
# grid's axes). "y-down" is the convention of 3DGS .ply files: scenes trained from COLMAP cameras
# have y pointing down, and splat viewers build it into their camera (gsplat.js, which Gradio's
# Model3D uses for splats, projects world +y downwards). TRELLIS's export makes the same turn.
# It is the glTF preview (+y up) turned 180 degrees about x: one object, two conventions.
PLY_FRAMES = ("y-down", "z-up")
Z_UP_TO_Y_DOWN = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # (x, -z, y)


def inverse_softplus(x: float) -> float:
    """Inverse of softplus, ``x + log(-expm1(-x))``."""
    return x + math.log(-math.expm1(-x))


def activate_scaling(raw: Tensor, scaling_bias: float = SCALING_BIAS, filter_3d: float = FILTER_3D):
    """Official ``get_scaling``: ``sqrt(softplus(raw + b)^2 + filter^2)``, b = inv-softplus(bias)."""
    b = torch.tensor(inverse_softplus(scaling_bias), dtype=torch.float32).to(raw.dtype)
    s = torch.nn.functional.softplus(raw + b)
    return torch.sqrt(s * s + filter_3d**2)


def activate_opacity(raw: Tensor, opacity_bias: float = OPACITY_BIAS) -> Tensor:
    """Official ``get_opacity``: ``sigmoid(raw + logit(bias))``."""
    return torch.sigmoid(raw + math.log(opacity_bias / (1.0 - opacity_bias)))


def activate_rotation(raw: Tensor) -> Tensor:
    """Official ``get_rotation``: L2-normalise ``raw + (1, 0, 0, 0)`` (w, x, y, z)."""
    q = raw + raw.new_tensor([1.0, 0.0, 0.0, 0.0])
    return torch.nn.functional.normalize(q, dim=-1)


@dataclass
class Gaussians:
    """One set of 3D Gaussians (SH degree 0) with activated parameters, world coordinates.

    Fields match the official ``get_*``: ``xyz [M, 3]`` (in [-0.5, 0.5]^3), ``features_dc
    [M, 1, 3]`` (raw SH DC), ``scaling [M, 3]`` (activated, incl. the 3D filter), ``rotation
    [M, 4]`` (unit quaternion w, x, y, z), ``opacity [M, 1]`` (in (0, 1)). ``raw_rotation`` keeps
    the un-normalised ``_rotation + (1, 0, 0, 0)`` that the official .ply stores.
    """

    xyz: Tensor
    features_dc: Tensor
    scaling: Tensor
    rotation: Tensor
    opacity: Tensor
    raw_rotation: Tensor | None = None

    def __post_init__(self) -> None:
        m = self.xyz.shape[0]
        shapes = {
            "xyz": (self.xyz, (m, 3)),
            "features_dc": (self.features_dc, (m, 1, 3)),
            "scaling": (self.scaling, (m, 3)),
            "rotation": (self.rotation, (m, 4)),
            "opacity": (self.opacity, (m, 1)),
        }
        for name, (t, shape) in shapes.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"Gaussians.{name} must be {shape}, got {tuple(t.shape)}")

    def __len__(self) -> int:
        return self.xyz.shape[0]

    @property
    def colors(self) -> Tensor:
        """RGB in [0, inf) from SH degree 0, as the rasteriser computes it: ``[M, 3]``."""
        return (SH_C0 * self.features_dc[:, 0] + 0.5).clamp_min(0.0)

    @classmethod
    def from_rgb(
        cls, xyz: Tensor, rgb: Tensor, scaling: Tensor, rotation: Tensor, opacity: Tensor
    ) -> Gaussians:
        """Build from RGB colours in [0, 1] (inverts the SH degree-0 colour)."""
        features_dc = ((rgb - 0.5) / SH_C0).reshape(-1, 1, 3)
        return cls(
            xyz,
            features_dc,
            scaling,
            torch.nn.functional.normalize(rotation, dim=-1),
            opacity.reshape(-1, 1),
        )

    def to(self, device: torch.device | str) -> Gaussians:
        """Move every field to ``device``."""
        return Gaussians(
            *(
                t.to(device)
                for t in (self.xyz, self.features_dc, self.scaling, self.rotation, self.opacity)
            ),
            raw_rotation=None if self.raw_rotation is None else self.raw_rotation.to(device),
        )

    def subset(self, index: Tensor) -> Gaussians:
        """Rows selected by a boolean mask or an index tensor."""
        return Gaussians(
            self.xyz[index],
            self.features_dc[index],
            self.scaling[index],
            self.rotation[index],
            self.opacity[index],
            raw_rotation=None if self.raw_rotation is None else self.raw_rotation[index],
        )

    def rotate(self, matrix: Tensor) -> Gaussians:
        """The same Gaussians turned by a proper rotation ``[3, 3]`` (positions and orientations)."""
        m = torch.as_tensor(matrix, dtype=torch.float64).cpu()
        if m.shape != (3, 3):
            raise ValueError(f"rotation must be 3x3, got {tuple(m.shape)}")
        ortho = float((m @ m.T - torch.eye(3, dtype=m.dtype)).abs().max())
        if ortho > 1e-5 or float(torch.linalg.det(m)) < 0:
            raise ValueError(f"not a proper rotation (|R R^T - I| = {ortho:.2g}): {m.tolist()}")
        q = matrix_quaternion(m)
        return Gaussians(
            self.xyz @ m.to(self.xyz).T,
            self.features_dc,
            self.scaling,
            quaternion_multiply(q.to(self.rotation), self.rotation),
            self.opacity,
            raw_rotation=None
            if self.raw_rotation is None
            else quaternion_multiply(q.to(self.raw_rotation), self.raw_rotation),
        )

    def save_ply(self, path: str | Path, *, frame: str = "y-down", f_rest: bool = False) -> Path:
        """Write the standard 3DGS binary .ply (the official patched ``save_ply`` layout).

        Args:
            frame: "y-down" (the 3DGS convention: splat viewers show the object upright, in the
                pose of :func:`atoken.threed.mesh.mesh_to_glb`'s preview) or "z-up" (as held).
            f_rest: add 45 zero ``f_rest_*`` fields for viewers that insist on SH degree 3.
        """
        path = Path(path)
        out = self.rotate(_frame_rotation(frame))
        xyz = out.xyz.detach().float().cpu()
        rot = out.raw_rotation if out.raw_rotation is not None else out.rotation
        rot = rot.detach().float().cpu()
        opacity = self.opacity.detach().float().cpu().clamp(1e-7, 1 - 1e-7)
        cols = [
            ("x", xyz[:, 0]),
            ("y", xyz[:, 1]),
            ("z", xyz[:, 2]),
            ("nx", torch.zeros(len(self))),
            ("ny", torch.zeros(len(self))),
            ("nz", torch.zeros(len(self))),
        ]
        dc = self.features_dc.detach().float().cpu()[:, 0]
        cols += [(f"f_dc_{i}", dc[:, i]) for i in range(3)]
        if f_rest:
            cols += [(f"f_rest_{i}", torch.zeros(len(self))) for i in range(45)]
        cols.append(("opacity", torch.log(opacity / (1 - opacity))[:, 0]))
        log_scale = torch.log(self.scaling.detach().float().cpu())
        cols += [(f"scale_{i}", log_scale[:, i]) for i in range(3)]
        cols += [(f"rot_{i}", rot[:, i]) for i in range(4)]
        data = np.stack([c.numpy().astype(np.float32) for _, c in cols], axis=1)
        header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(self)}"]
        header += [f"property float {name}" for name, _ in cols]
        header.append("end_header")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(("\n".join(header) + "\n").encode("ascii"))
            f.write(data.astype("<f4").tobytes())
        return path

    @classmethod
    def load_ply(cls, path: str | Path, *, frame: str = "y-down") -> Gaussians:
        """Read a binary little-endian 3DGS .ply (float properties) written by us or others.

        ``frame`` is the file's frame (see :meth:`save_ply`); the result is always Z up."""
        path = Path(path)
        turn = _frame_rotation(frame)
        with open(path, "rb") as f:
            names, count = [], None
            first = f.readline().strip()
            if first != b"ply":
                raise ValueError(f"{path} is not a .ply file")
            while True:
                line = f.readline()
                if not line:
                    raise ValueError(f"{path}: header has no end_header")
                parts = line.decode("ascii", "replace").split()
                if not parts:
                    continue
                if parts[0] == "format" and parts[1] != "binary_little_endian":
                    raise ValueError(
                        f"{path}: only binary_little_endian .ply is read, got {parts[1]}"
                    )
                if parts[0] == "element" and parts[1] == "vertex":
                    count = int(parts[2])
                elif parts[0] == "property":
                    if parts[1] not in ("float", "float32"):
                        raise ValueError(f"{path}: property {parts[-1]} is {parts[1]}, need float")
                    names.append(parts[2])
                elif parts[0] == "end_header":
                    break
            raw = np.frombuffer(f.read(4 * len(names) * count), dtype="<f4")
        if count is None or raw.size != len(names) * count:
            raise ValueError(f"{path}: truncated vertex data")
        table = torch.from_numpy(raw.reshape(count, len(names)).copy())
        col = {n: table[:, i] for i, n in enumerate(names)}
        missing = [
            n for n in ("x", "y", "z", "f_dc_0", "opacity", "scale_0", "rot_0") if n not in col
        ]
        if missing:
            raise ValueError(f"{path}: not a 3DGS .ply, missing properties {missing}")
        raw_rot = torch.stack([col[f"rot_{i}"] for i in range(4)], 1)
        out = cls(
            xyz=torch.stack([col["x"], col["y"], col["z"]], 1),
            features_dc=torch.stack([col[f"f_dc_{i}"] for i in range(3)], 1)[:, None],
            scaling=torch.exp(torch.stack([col[f"scale_{i}"] for i in range(3)], 1)),
            rotation=torch.nn.functional.normalize(raw_rot, dim=-1),
            opacity=torch.sigmoid(col["opacity"])[:, None],
            raw_rotation=raw_rot,
        )
        return out.rotate(turn.T)


def _frame_rotation(frame: str) -> Tensor:
    """Rotation from the pipeline's Z-up frame to ``frame`` (one of :data:`PLY_FRAMES`)."""
    if frame not in PLY_FRAMES:
        raise ValueError(f"frame must be one of {PLY_FRAMES}, got {frame!r}")
    return Z_UP_TO_Y_DOWN.clone() if frame == "y-down" else torch.eye(3)


def matrix_quaternion(m: Tensor) -> Tensor:
    """Unit quaternion (w, x, y, z) of a proper rotation matrix, with w >= 0.

    Shepperd's method: the largest of 4w^2, 4x^2, 4y^2, 4z^2 is the pivot, so 180-degree turns
    (w = 0) are exact too."""
    m = torch.as_tensor(m, dtype=torch.float64)
    t = [
        1 + m[0, 0] + m[1, 1] + m[2, 2],
        1 + m[0, 0] - m[1, 1] - m[2, 2],
        1 - m[0, 0] + m[1, 1] - m[2, 2],
        1 - m[0, 0] - m[1, 1] + m[2, 2],
    ]
    k = int(torch.argmax(torch.stack(t)))
    s = 2.0 * torch.sqrt(t[k])  # 4 times the pivot component
    if k == 0:
        q = [s / 4, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif k == 1:
        q = [(m[2, 1] - m[1, 2]) / s, s / 4, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif k == 2:
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, s / 4, (m[1, 2] + m[2, 1]) / s]
    else:
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4]
    q = torch.stack(q)
    return -q if q[0] < 0 else q


def quaternion_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product ``a * b`` of quaternions (w, x, y, z); ``R(a * b) = R(a) @ R(b)``."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        -1,
    )
