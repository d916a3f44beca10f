"""Tokenization in the official layout and back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import atoken
from atoken.core.patchify import crop_box, gs_input, prepare_clip, unpatchify


def test_token_layout_matches_formula():
    g = torch.Generator().manual_seed(0)
    video = torch.rand(8, 32, 48, 3, generator=g) * 2 - 1
    x = atoken.tokenize([video])
    assert x.coords.dtype == torch.int32 and x.feats.shape == (2 * 2 * 3, 3072)
    # token (i, j, k) feature f[((pt*16+ph)*16+pw)*3+c] = frame[4i+pt][16j+ph][16k+pw][c]
    row = 0
    for i in range(2):
        for j in range(2):
            for k in range(3):
                assert x.coords[row].tolist() == [0, i, j, k, 0]
                for pt, ph, pw, c in [(0, 0, 0, 0), (3, 15, 15, 2), (1, 7, 4, 1)]:
                    f = x.feats[row, ((pt * 16 + ph) * 16 + pw) * 3 + c]
                    assert f == video[4 * i + pt, 16 * j + ph, 16 * k + pw, c]
                row += 1


def test_crop_pad_and_truncate():
    assert crop_box(70, 100) == (3, 2, 64, 96)
    img = torch.zeros(70, 100, 3)
    clip = prepare_clip(img)
    assert clip.shape == (4, 64, 96, 3)
    assert prepare_clip(torch.zeros(27, 32, 32, 3)).shape[0] == 24
    assert prepare_clip(torch.zeros(2, 32, 32, 3)).shape[0] == 4
    with pytest.raises(ValueError, match="smaller than one"):
        atoken.tokenize([torch.zeros(10, 40, 3)])


def test_round_trip_images_and_videos():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(48, 64, 3, generator=g) * 2 - 1
    vid = torch.rand(8, 32, 16, 3, generator=g) * 2 - 1
    x = atoken.tokenize([img, vid])
    back_img, back_vid = atoken.detokenize(x, ["image", "video"])
    assert torch.equal(back_img[0].permute(1, 2, 0), img)
    assert torch.equal(back_vid.permute(0, 2, 3, 1), vid)


def test_channel_first_and_numpy_inputs():
    arr = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32)).astype(np.float32)
    a = atoken.tokenize([arr])
    b = atoken.tokenize([np.transpose(arr, (1, 2, 0))])
    assert torch.equal(a.feats, b.feats)
    with pytest.raises(ValueError, match="float"):
        atoken.tokenize([np.zeros((32, 32, 3), np.uint8)])
    with pytest.raises(ValueError, match="list"):
        atoken.tokenize(torch.zeros(32, 32, 3))


def test_uint8_conversions():
    u8 = np.array([[[0, 128, 255]]], np.uint8)
    x = atoken.to_model_range(u8)
    assert torch.allclose(x, torch.tensor([[[-1.0, 128 / 255 * 2 - 1, 1.0]]]), atol=1e-6)
    assert atoken.to_uint8(x).tolist() == [[[0, 128, 255]]]
    # rounded to the nearest level (the official script truncates 254.87 to 254)
    assert atoken.to_uint8(torch.tensor([0.999, -0.999, 0.0])).tolist() == [255, 0, 128]
    assert atoken.to_uint8(torch.tensor([2.0, -3.0])).tolist() == [255, 0]  # clamped


def test_tokenize_3d_official_form():
    feats = torch.rand(5, 768)
    coords = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [0, 0, 0], [63, 63, 63]])
    x = atoken.tokenize_3d(feats, coords)
    assert x.feats.shape == (5, 3072)
    assert torch.allclose(x.feats[:, :768], feats * 2 - 1)
    assert torch.equal(x.feats[:, 768:], torch.zeros(5, 2304))
    assert x.coords[:, :2].tolist() == [[0, 1]] * 5 and torch.equal(x.coords[:, 2:], coords.int())
    g = gs_input(x)
    assert g.coords.shape == (5, 4) and g.feats.shape == (5, 768)
    with pytest.raises(ValueError, match="768"):
        atoken.tokenize_3d(torch.rand(5, 3), coords)
    with pytest.raises(ValueError, match="no occupied"):
        atoken.tokenize_3d(torch.rand(0, 768), torch.zeros(0, 3, dtype=torch.long))


def test_unpatchify_scatters_by_coords():
    feats = torch.arange(2 * 3072, dtype=torch.float32).reshape(2, 3072)
    coords = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.int32)  # reversed rows
    video = unpatchify(feats, coords)
    assert video.shape == (4, 3, 32, 16)
    assert video[0, 0, 0, 0] == feats[1, 0] and video[0, 0, 16, 0] == feats[0, 0]
