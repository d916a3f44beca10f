"""atoken.pipelines.generation: interpolation, posterior variations, FSQ token editing, token files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import atoken
from atoken.core.sparse import SparseTensor
from atoken.pipelines.generation import (
    edit_tokens,
    interpolate,
    mask_to_tokens,
    posterior_variations,
    resize_index_grid,
    resize_latent_grid,
    save_image_tokens,
    slerp,
    token_grid_size,
)
from atoken.pipelines.reconstruct import decode_file, reconstruct_image


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model_c():
    torch.manual_seed(1)
    return atoken.load(None, "tiny-c")


@pytest.fixture(scope="module")
def model_d():
    torch.manual_seed(2)
    return atoken.load(None, "tiny-d")


A = _image(48, 64, 0)
B = _image(48, 64, 1)


def _decode_mean(model, mean, coords) -> np.ndarray:
    rec = model.decode(SparseTensor(mean, coords))
    return atoken.to_uint8(atoken.detokenize(rec, "image")[0].permute(0, 2, 3, 1))[0]


def test_slerp_matches_hand_values():
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 2.0], [2.0, 2.0]])  # last row parallel: lerp
    mid = slerp(a, b, 0.5)
    s = math.sqrt(0.5)
    torch.testing.assert_close(mid[0], torch.tensor([s, s]))
    torch.testing.assert_close(mid[1], torch.tensor([2 * s, 2 * s]))
    torch.testing.assert_close(mid[2], torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_interpolate_ends_are_the_reconstructions_and_lerp_midpoint(model_c):
    frames = interpolate(model_c, A, B, 3, mode="lerp")
    assert len(frames) == 3 and all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)
    np.testing.assert_array_equal(frames[0], reconstruct_image(model_c, A).reconstruction)
    np.testing.assert_array_equal(frames[-1], reconstruct_image(model_c, B).reconstruction)
    ea = model_c.encode(atoken.tokenize([atoken.to_model_range(A)]))
    eb = model_c.encode(atoken.tokenize([atoken.to_model_range(B)]))
    mid = _decode_mean(model_c, (ea.mean + eb.mean) / 2, ea.coords)
    assert np.abs(frames[1].astype(int) - mid.astype(int)).max() <= 1
    # an Encoded item gives the same frames as the image it came from
    again = interpolate(model_c, ea, B, 3, mode="lerp")
    for x, y in zip(frames, again):
        np.testing.assert_array_equal(x, y)
    slerped = interpolate(model_c, A, B, 3)
    assert not np.array_equal(slerped[1], frames[1])  # slerp and lerp differ in the middle


@torch.no_grad()
def test_interpolate_resizes_b_to_a_grid(model_c):
    small = _image(32, 32, 3)  # 2x2 tokens vs A's 3x4
    frames = interpolate(model_c, A, small, 4)
    assert all(f.shape == A.shape for f in frames)
    big = B[:, :, :]
    enc = model_c.encode(atoken.tokenize([atoken.to_model_range(small)]))
    lat = resize_latent_grid(
        enc.mean,
        enc.coords,
        token_grid_size(model_c.encode(atoken.tokenize([atoken.to_model_range(big)])).coords),
    )
    assert lat.feats.shape == (12, model_c.config.latent_channels)
    frames2 = interpolate(model_c, A, SparseTensor(enc.mean, enc.coords), 2)
    assert frames2[-1].shape == A.shape


def test_resize_latent_grid_bilinear_identity_and_constant():
    coords = torch.tensor([[0, 0, x, y, 0] for x in range(2) for y in range(3)], dtype=torch.int32)
    feats = torch.arange(12.0).reshape(6, 2)
    same = resize_latent_grid(feats, coords, (2, 3))
    torch.testing.assert_close(same.feats, feats)
    const = resize_latent_grid(torch.ones(6, 2), coords, (4, 5))
    assert const.feats.shape == (20, 2) and torch.allclose(const.feats, torch.ones(20, 2))


@torch.no_grad()
def test_interpolate_fsq_quantizes_each_step(model_d):
    frames = interpolate(model_d, A, B, 3)
    np.testing.assert_array_equal(frames[0], reconstruct_image(model_d, A).reconstruction)
    np.testing.assert_array_equal(frames[-1], reconstruct_image(model_d, B).reconstruction)
    ea = model_d.encode(atoken.tokenize([atoken.to_model_range(A)]))
    eb = model_d.encode(atoken.tokenize([atoken.to_model_range(B)]))
    codes, _ = model_d.quantize(slerp(ea.mean, eb.mean, 0.5))
    mid = _decode_mean(model_d, codes, ea.coords)
    assert np.abs(frames[1].astype(int) - mid.astype(int)).max() <= 1


@torch.no_grad()
def test_interpolate_videos_first_chunk(model_c):
    va = np.stack([_image(32, 48, i) for i in range(6)])
    vb = np.stack([_image(32, 32, 10 + i) for i in range(9)])
    clips = interpolate(model_c, va, vb, 2)
    assert len(clips) == 2 and clips[0].shape == (4, 32, 48, 3)


def test_interpolate_errors(model_c, model_d):
    with pytest.raises(ValueError, match="steps"):
        interpolate(model_c, A, B, 1)
    with pytest.raises(ValueError, match="steps"):
        interpolate(model_c, A, B, 1000)
    with pytest.raises(ValueError, match="mode"):
        interpolate(model_c, A, B, 3, mode="cubic")
    with pytest.raises(ValueError, match="two images or two videos"):
        interpolate(model_c, A, np.stack([A, A, A, A]), 3)
    enc_d = model_d.encode(atoken.tokenize([atoken.to_model_range(A)]))
    with pytest.raises(ValueError, match="channels"):
        interpolate(model_c, enc_d, B, 3)
    with pytest.raises(ValueError, match="expected"):
        interpolate(model_c, "a.png", B, 3)


@torch.no_grad()
def test_posterior_variations_seeded_and_temperature(model_c):
    frames, seed = posterior_variations(model_c, A, 3, temperature=1.0, seed=7)
    assert seed == 7 and len(frames) == 3
    again, _ = posterior_variations(model_c, A, 3, temperature=1.0, seed=7)
    for x, y in zip(frames, again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(frames[0], frames[1])
    # sample i uses seed + i
    one, _ = posterior_variations(model_c, A, 1, temperature=1.0, seed=8)
    np.testing.assert_array_equal(one[0], frames[1])
    zero, _ = posterior_variations(model_c, A, 1, temperature=0.0, seed=3)
    np.testing.assert_array_equal(zero[0], reconstruct_image(model_c, A).reconstruction)
    drawn, s = posterior_variations(model_c, A, 1, temperature=0.5)
    assert isinstance(s, int) and s >= 0
    np.testing.assert_array_equal(drawn[0], posterior_variations(model_c, A, 1, 0.5, s)[0][0])
    with pytest.raises(ValueError, match="n must"):
        posterior_variations(model_c, A, 0)
    with pytest.raises(ValueError, match="temperature"):
        posterior_variations(model_c, A, 2, temperature=-1)


@torch.no_grad()
def test_posterior_variations_fsq_samples_then_quantizes(model_d):
    frames, seed = posterior_variations(model_d, A, 2, temperature=2.0, seed=5)
    enc = model_d.encode(atoken.tokenize([atoken.to_model_range(A)]))
    z = enc.latent(sample=True, seed=5, temperature=2.0)
    codes, _ = model_d.quantize(z.feats)
    expected = _decode_mean(model_d, codes, z.coords)
    np.testing.assert_array_equal(frames[0], expected)


def test_mask_to_tokens_and_index_grid_resize():
    pixel = np.zeros((48, 64), bool)
    pixel[0, 0] = True  # touches the top-left token only
    pixel[47, 63] = True
    tok = mask_to_tokens(pixel, (3, 4))
    assert tok.sum() == 2 and tok[0, 0] and tok[2, 3]
    assert mask_to_tokens(np.ones((3, 4, 4), np.uint8), (3, 4)).all()
    with pytest.raises(ValueError, match="2D"):
        mask_to_tokens(np.zeros(5), (3, 4))
    coords = torch.tensor([[0, 0, x, y, 0] for x in range(2) for y in range(2)], dtype=torch.int32)
    idx = torch.tensor([[0], [1], [2], [3]])
    up = resize_index_grid(idx, coords, (4, 4))
    assert up[:, 0].reshape(4, 4).tolist() == [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 3, 3],
        [2, 2, 3, 3],
    ]


@torch.no_grad()
def test_edit_tokens_swaps_codes(model_c, model_d):
    ra, rb = reconstruct_image(model_d, A), reconstruct_image(model_d, B)
    full = np.ones((3, 4), bool)
    swapped = edit_tokens(
        model_d, ra.indices, ra.latent.coords, full, (rb.indices, rb.latent.coords)
    )
    np.testing.assert_array_equal(swapped, rb.reconstruction)
    part = np.zeros((3, 4), bool)
    part[1, 1:3] = True
    same = edit_tokens(model_d, ra.indices, ra.latent.coords, part, (ra.indices, ra.latent.coords))
    np.testing.assert_array_equal(same, ra.reconstruction)
    r1 = edit_tokens(model_d, ra.indices, ra.latent.coords, part, "random", seed=3)
    r2 = edit_tokens(model_d, ra.indices, ra.latent.coords, part, "random", seed=3)
    np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(r1, ra.reconstruction)
    # numpy inputs and a smaller other image (resized nearest) work too
    small = reconstruct_image(model_d, _image(32, 32, 4))
    out = edit_tokens(
        model_d,
        ra.indices.numpy(),
        ra.latent.coords.numpy(),
        np.ones((48, 64), bool),
        (small.indices.numpy(), small.latent.coords.numpy()),
    )
    assert out.shape == A.shape
    with pytest.raises(ValueError, match="covers no token"):
        edit_tokens(model_d, ra.indices, ra.latent.coords, np.zeros((3, 4), bool))
    with pytest.raises(ValueError, match="continuous"):
        edit_tokens(model_c, ra.indices, ra.latent.coords, full)
    with pytest.raises(ValueError, match="indices must be"):
        edit_tokens(model_d, ra.indices[:, :3], ra.latent.coords, full)


@torch.no_grad()
@pytest.mark.parametrize("which", ["c", "d"])
def test_save_image_tokens_round_trip(which, model_c, model_d, tmp_path):
    model = model_c if which == "c" else model_d
    res = reconstruct_image(model, A)
    path = save_image_tokens(model, res, tmp_path / "tokens.safetensors")
    out = decode_file(model, path, tmp_path / "decoded.png")
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(out)), res.reconstruction)
