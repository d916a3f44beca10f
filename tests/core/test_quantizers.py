"""FSQ: the official bound/round, codes <-> indices, straight-through gradient."""

from __future__ import annotations

import math

import pytest
import torch

from atoken.core.quantizers import FSQ, codes_to_indices, fsq_bound, fsq_round, indices_to_codes


def test_constants_and_code_set():
    levels = torch.tensor([4] * 6, dtype=torch.int32)
    z = torch.linspace(-6, 6, 601)[:, None].expand(601, 6)
    b = fsq_bound(z, levels)
    half_l = 3 * 1.001 / 2
    shift = math.atanh(0.5 / half_l)
    assert abs(shift - 0.346199012) < 1e-7
    assert torch.allclose(b[:, 0], torch.tanh(z[:, 0] + shift) * half_l - 0.5, atol=1e-6)
    codes = fsq_round(z, levels)
    assert set(codes.unique().tolist()) == {-1.0, -0.5, 0.0, 0.5}
    assert fsq_bound(torch.zeros(1, 6), levels).abs().max() < 1e-6  # zero maps to zero


def test_round_half_to_even():
    levels = torch.tensor([4], dtype=torch.int32)
    half_l = torch.tensor(1.5015)
    # pick z so that bounded = 0.5 exactly -> round-half-even gives 0
    z = torch.atanh((torch.tensor(0.5) + 0.5) / half_l) - math.atanh(0.5 / 1.5015)
    assert abs(fsq_bound(z[None, None], levels).item() - 0.5) < 1e-6


def test_indices_round_trip_and_formula():
    levels = torch.tensor([4] * 6, dtype=torch.int32)
    idx = torch.arange(4096)
    codes = indices_to_codes(idx, levels)
    assert torch.equal(codes_to_indices(codes, levels), idx.int())
    c = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 0.0, -1.0]])
    digits = [0, 1, 2, 3, 2, 0]
    assert codes_to_indices(c, levels).item() == sum(d * 4**j for j, d in enumerate(digits))


def test_grouped_fsq_module():
    fsq = FSQ((4,) * 6, 8)
    assert fsq.dim == 48 and fsq.codebook_size == 4096
    z = torch.randn(10, 48)
    codes, idx = fsq(z)
    assert idx.shape == (10, 8) and idx.dtype == torch.int32
    assert torch.equal(fsq.dequantize(idx), codes)
    # group g owns channels 6g..6g+5
    z2 = z.clone()
    z2[:, 6:12] += 3
    _, idx2 = fsq(z2)
    assert torch.equal(idx2[:, 0], idx[:, 0]) and torch.equal(idx2[:, 2:], idx[:, 2:])
    with pytest.raises(ValueError, match="48"):
        fsq(torch.randn(3, 40))
    with pytest.raises(ValueError, match="4096"):
        fsq.dequantize(torch.full((1, 8), 5000))


def test_straight_through_gradient():
    fsq = FSQ((4,) * 6, 8)
    z = torch.randn(4, 48, requires_grad=True)
    codes, _ = fsq(z, straight_through=True)
    assert torch.equal(codes.detach(), fsq(z.detach())[0])
    codes.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
