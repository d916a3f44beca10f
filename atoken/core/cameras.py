"""Pinhole cameras in the official convention: OpenCV world-to-camera + normalised intrinsics.

OpenCV camera axes: x right, y down, z forward. Normalised intrinsics (utils3d convention):
``u = fx * x / z + cx`` with ``u`` in [0, 1] across the image width (likewise ``v`` down the
height), so ``fx = 0.5 / tan(fov_x / 2)`` and ``cx = cy = 0.5``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Camera:
    """One view: ``w2c [4, 4]`` (OpenCV), normalised focal lengths, image size in pixels."""

    w2c: Tensor
    fx: float
    fy: float
    width: int
    height: int
    cx: float = 0.5
    cy: float = 0.5

    @property
    def fov_x(self) -> float:
        """Horizontal field of view in radians."""
        return 2.0 * math.atan(0.5 / self.fx)

    @property
    def fov_y(self) -> float:
        """Vertical field of view in radians."""
        return 2.0 * math.atan(0.5 / self.fy)

    @property
    def c2w(self) -> Tensor:
        """Camera-to-world matrix (OpenCV axes)."""
        return torch.linalg.inv(self.w2c)

    @property
    def position(self) -> Tensor:
        """Camera centre in world coordinates ``[3]``."""
        return self.c2w[:3, 3]

    def intrinsics(self) -> Tensor:
        """Normalised 3x3 intrinsics matrix."""
        return torch.tensor(
            [[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]],
            dtype=self.w2c.dtype,
        )


def look_at(eye: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """OpenCV world-to-camera matrix ``[4, 4]`` of a camera at ``eye`` looking at ``target``."""
    eye, target, up = (torch.as_tensor(v, dtype=torch.float64) for v in (eye, target, up))
    z = target - eye
    z = z / z.norm()
    x = torch.linalg.cross(z, up)
    if float(x.norm()) < 1e-9:  # looking along `up`: pick any perpendicular
        x = torch.linalg.cross(z, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    x = x / x.norm()
    y = torch.linalg.cross(z, x)  # down in the image
    rot = torch.stack([x, y, z])  # rows: camera axes in world coordinates
    w2c = torch.eye(4, dtype=torch.float64)
    w2c[:3, :3] = rot
    w2c[:3, 3] = -rot @ eye
    return w2c.float()


def camera_from_fov(w2c: Tensor, fov: float, width: int, height: int | None = None) -> Camera:
    """Square-pixel camera with horizontal fov (radians), as the official packer assumes."""
    height = width if height is None else height
    f = 0.5 / math.tan(fov / 2.0)
    return Camera(w2c=w2c, fx=f, fy=f * width / height, width=width, height=height)


def radical_inverse(base: int, n: int) -> float:
    """Van der Corput radical inverse of ``n`` in ``base``."""
    inv, denom = 0.0, 1.0
    while n > 0:
        denom *= base
        n, digit = divmod(n, base)
        inv += digit / denom
    return inv


def sphere_directions(num_views: int, offset: tuple[float, float] = (0.0, 0.0)) -> list[Tensor]:
    """Roughly uniform unit directions (Hammersley on the sphere, as TRELLIS renders views)."""
    dirs = []
    for i in range(num_views):
        u = (i / num_views + offset[0]) % 1.0
        v = (radical_inverse(2, i) + offset[1]) % 1.0
        yaw = 2.0 * math.pi * u
        pitch = math.asin(2.0 * v - 1.0)  # uniform in z
        dirs.append(
            torch.tensor(
                [math.cos(pitch) * math.cos(yaw), math.cos(pitch) * math.sin(yaw), math.sin(pitch)]
            )
        )
    return dirs


def orbit_cameras(
    num_views: int,
    *,
    radius: float = 2.0,
    fov: float = math.radians(40.0),
    resolution: int = 512,
    offset: tuple[float, float] = (0.0, 0.0),
) -> list[Camera]:
    """``num_views`` cameras on a sphere around the origin looking at it, world +Z up."""
    up = torch.tensor([0.0, 0.0, 1.0])
    cams = []
    for d in sphere_directions(num_views, offset):
        eye = d * radius
        cams.append(camera_from_fov(look_at(eye, torch.zeros(3), up), fov, resolution))
    return cams


def turntable_cameras(
    num_frames: int,
    *,
    radius: float = 2.0,
    fov: float = math.radians(40.0),
    resolution: int = 512,
    pitch: float = 0.35,
) -> list[Camera]:
    """Cameras circling the Z axis at a fixed pitch (radians above the XY plane)."""
    up = torch.tensor([0.0, 0.0, 1.0])
    cams = []
    for i in range(num_frames):
        yaw = 2.0 * math.pi * i / num_frames
        eye = radius * torch.tensor(
            [math.cos(pitch) * math.cos(yaw), math.cos(pitch) * math.sin(yaw), math.sin(pitch)]
        )
        cams.append(camera_from_fov(look_at(eye, torch.zeros(3), up), fov, resolution))
    return cams


def w2c_from_blender(c2w_blender: Tensor) -> Tensor:
    """OpenCV world-to-camera from a Blender camera-to-world matrix, in float32 as the packer does."""
    c2w = torch.as_tensor(c2w_blender, dtype=torch.float32).clone()
    c2w[:3, 1] *= -1
    c2w[:3, 2] *= -1
    return torch.linalg.inv(c2w)
