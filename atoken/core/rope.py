"""4D rotary position embedding over (t, x, y, z), as the official joint mode (§2.6)."""

from __future__ import annotations

import torch
from torch import Tensor


def rope_frequencies(head_dim: int, theta: float = 10_000.0, device=None) -> Tensor:
    """``head_dim / 8`` frequencies ``theta^(-i / head_dim)`` (exponent over the full head dim)."""
    if head_dim % 8:
        raise ValueError(f"4D RoPE needs head_dim % 8 == 0, got {head_dim}")
    i = torch.arange(head_dim // 8, dtype=torch.float32, device=device)
    return 1.0 / theta ** (i / head_dim)


def rope_angles(positions: Tensor, head_dim: int, theta: float = 10_000.0) -> Tensor:
    """Rotation angles ``[N, head_dim / 2]`` for positions ``[N, 4]`` = (t, x, y, z).

    Axis blocks are concatenated t | x | y | z, every axis using the same frequencies.
    """
    freqs = rope_frequencies(head_dim, theta, positions.device)
    ang = positions.float()[:, :, None] * freqs[None, None, :]  # [N, 4, D/8]
    return ang.reshape(positions.shape[0], head_dim // 2)


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate interleaved channel pairs (2j, 2j+1) of ``x [N, H, D]`` by ``angles [N, D/2]``.

    Computed in float32 and cast back to the input dtype.
    """
    dtype = x.dtype
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    cos = torch.cos(angles)[:, None, :]
    sin = torch.sin(angles)[:, None, :]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], -1)
    return out.reshape(x.shape).to(dtype)
