"""Finite scalar quantization (FSQ) as the released So/D uses it (§3.1).

Per scalar with L levels: ``bounded = tanh(z + shift) * half_l - offset`` with
``half_l = (L - 1) * 1.001 / 2``, ``offset = 0.5`` for even L, ``shift = atanh(offset / half_l)``;
code = round-half-even(bounded) / (L // 2). For L = 4 the codes are {-1, -0.5, 0, 0.5}.
Channel ``6g + j`` belongs to group g, digit j; index = sum_j (2 code_j + 2) 4^j.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def fsq_bound(z: Tensor, levels: Tensor, eps: float = 1e-3) -> Tensor:
    """Squash ``z [..., d]`` into the level range (float32), before rounding."""
    lv = levels.float()
    half_l = (lv - 1) * (1 + eps) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    shift = torch.atanh(offset / half_l)
    return torch.tanh(z.float() + shift) * half_l - offset


def fsq_round(z: Tensor, levels: Tensor) -> Tensor:
    """Quantized codes in [-1, 1) for ``z [..., d]`` (round half to even, as torch.round)."""
    half_width = (levels // 2).float()
    return torch.round(fsq_bound(z, levels)) / half_width


def fsq_round_ste(z: Tensor, levels: Tensor) -> Tensor:
    """:func:`fsq_round` with a straight-through gradient (for training)."""
    bounded = fsq_bound(z, levels)
    rounded = bounded + (torch.round(bounded) - bounded).detach()
    return rounded / (levels // 2).float()


def codes_to_indices(codes: Tensor, levels: Tensor) -> Tensor:
    """Codes ``[..., d]`` -> integer index ``[...]`` (first digit least significant)."""
    half_width = (levels // 2).float()
    digits = torch.round(codes.float() * half_width + half_width).long()
    basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0).long()
    return (digits * basis).sum(-1).to(torch.int32)


def indices_to_codes(indices: Tensor, levels: Tensor) -> Tensor:
    """Integer index ``[...]`` -> codes ``[..., d]``."""
    basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0).long()
    digits = (indices.long()[..., None] // basis) % levels.long()
    half_width = (levels // 2).float()
    return (digits.float() - half_width) / half_width


class FSQ(nn.Module):
    """Grouped FSQ: ``num_codebooks`` groups of ``len(levels)`` channels, no projections."""

    def __init__(self, levels: tuple[int, ...], num_codebooks: int):
        super().__init__()
        self.levels_tuple = tuple(levels)
        self.num_codebooks = num_codebooks
        self.codebook_size = math.prod(levels)

    @property
    def dim(self) -> int:
        """Channels quantized."""
        return len(self.levels_tuple) * self.num_codebooks

    def _levels(self, device) -> Tensor:
        return torch.tensor(self.levels_tuple, dtype=torch.int32, device=device)

    def _grouped(self, z: Tensor) -> Tensor:
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ expects {self.dim} channels, got {z.shape[-1]}")
        return z.reshape(*z.shape[:-1], self.num_codebooks, len(self.levels_tuple))

    def bound(self, z: Tensor) -> Tensor:
        """Bounded values ``[N, dim]`` before rounding."""
        return fsq_bound(self._grouped(z), self._levels(z.device)).reshape(z.shape)

    def forward(self, z: Tensor, straight_through: bool = False) -> tuple[Tensor, Tensor]:
        """``z [N, dim]`` -> codes ``[N, dim]`` (float32) and indices ``[N, num_codebooks]`` int32."""
        lv = self._levels(z.device)
        g = self._grouped(z)
        codes = fsq_round_ste(g, lv) if straight_through else fsq_round(g, lv)
        return codes.reshape(z.shape), codes_to_indices(codes.detach(), lv)

    def dequantize(self, indices: Tensor) -> Tensor:
        """Indices ``[N, num_codebooks]`` -> codes ``[N, dim]``."""
        if indices.shape[-1] != self.num_codebooks:
            raise ValueError(
                f"expected {self.num_codebooks} indices per token, got {indices.shape[-1]}"
            )
        if int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size:
            raise ValueError(f"FSQ indices must lie in [0, {self.codebook_size})")
        codes = indices_to_codes(indices, self._levels(indices.device))
        return codes.reshape(*indices.shape[:-1], self.dim)
