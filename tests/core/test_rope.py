"""4D RoPE: frequencies, interleaved rotation, relative-position property."""

from __future__ import annotations

import math

import pytest
import torch

from atoken.core.rope import apply_rope, rope_angles, rope_frequencies


def test_official_frequencies_for_head_dim_72():
    expected = [
        1.0,
        0.879922544,
        0.774263683,
        0.681292069,
        0.599484250,
        0.527499706,
        0.464158883,
        0.408423865,
        0.359381366,
    ]
    assert torch.allclose(rope_frequencies(72), torch.tensor(expected), atol=1e-7)
    with pytest.raises(ValueError):
        rope_frequencies(20)


def test_angles_layout_t_x_y_z():
    pos = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    ang = rope_angles(pos, 16)  # 2 frequencies per axis
    f = rope_frequencies(16)
    assert torch.allclose(ang[0], torch.cat([p * f for p in (1.0, 2.0, 3.0, 4.0)]))


def test_interleaved_pairs_rotation():
    x = torch.zeros(1, 1, 8)
    x[0, 0, 0], x[0, 0, 1] = 1.0, 0.0
    ang = torch.tensor([[math.pi / 2, 0.0, 0.0, 0.0]])
    y = apply_rope(x, ang)
    assert torch.allclose(y[0, 0, :2], torch.tensor([0.0, 1.0]), atol=1e-6)


def test_relative_position_property():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 24, generator=g), torch.randn(1, 2, 24, generator=g)

    def score(pq, pk):
        a = apply_rope(q, rope_angles(torch.tensor([pq], dtype=torch.float32), 24))
        b = apply_rope(k, rope_angles(torch.tensor([pk], dtype=torch.float32), 24))
        return (a * b).sum(-1)

    s1 = score([0, 1, 2, 0], [1, 3, 2, 5])
    s2 = score([2, 4, 7, 1], [3, 6, 7, 6])  # same offsets
    assert torch.allclose(s1, s2, atol=1e-4)


def test_dtype_preserved_and_float32_inside():
    x = torch.randn(3, 2, 16).to(torch.bfloat16)
    y = apply_rope(x, rope_angles(torch.zeros(3, 4), 16))
    assert y.dtype == torch.bfloat16 and torch.equal(y, x)
