"""Tests for atoken/pipelines/metrics.py: hand-computed values, skimage SSIM, closed-form Frechet and the
EfficientNet-Lite0 distances' orderings on a photo."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image, ImageFilter
from skimage import data
from skimage.metrics import structural_similarity

from atoken.pipelines.metrics import (
    compression_ratio,
    error_heatmap,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    frechet_feature_distance,
    input_bits,
    latent_bits,
    perceptual_distance,
    perceptual_distance_per_frame,
    psnr,
    psnr_per_frame,
    ssim,
    ssim_per_frame,
)


def skimage_ssim(a: np.ndarray, b: np.ndarray, data_range: float, channel_axis=None) -> float:
    return structural_similarity(
        a,
        b,
        data_range=data_range,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        channel_axis=channel_axis,
    )


# --- PSNR -------------------------------------------------------------------------------------


def test_psnr_of_known_mse():
    x = np.zeros((8, 8, 3), np.uint8)
    y = np.full((8, 8, 3), 10, np.uint8)  # MSE 100
    assert psnr(x, y) == pytest.approx(10 * math.log10(255**2 / 100))
    a = torch.zeros(3, 8, 8)
    b = torch.full((3, 8, 8), 0.1)  # MSE 0.01, range 2
    assert psnr(a, b, data_range=2.0) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-6)
    assert psnr(x, x) == math.inf


def test_psnr_input_errors():
    with pytest.raises(ValueError, match="data_range is required"):
        psnr(torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="not a mix"):
        psnr(np.zeros(4), torch.zeros(4), data_range=1.0)


def test_psnr_per_frame():
    x = np.zeros((3, 4, 4, 3), np.uint8)
    y = x.copy()
    y[1] += 5
    y[2] += 20
    out = psnr_per_frame(x, y)
    assert out[0] == math.inf
    assert out[1] == pytest.approx(10 * math.log10(255**2 / 25))
    assert out[2] == pytest.approx(10 * math.log10(255**2 / 400))
    # channel-first tensor video [C, T, H, W] with frame_axis=1
    t = torch.zeros(3, 2, 4, 4)
    u = t.clone()
    u[:, 1] = 0.5
    assert psnr_per_frame(t, u, data_range=1.0, frame_axis=1)[1] == pytest.approx(
        10 * math.log10(1 / 0.25)
    )


# --- SSIM -------------------------------------------------------------------------------------


def test_ssim_matches_skimage_rgb_uint8():
    img = data.astronaut()[100:164, 150:230]  # 64x80x3 uint8
    rng = np.random.default_rng(0)
    noisy = np.clip(img.astype(np.int32) + rng.integers(-25, 26, img.shape), 0, 255)
    noisy = noisy.astype(np.uint8)
    ref = skimage_ssim(img, noisy, 255, channel_axis=-1)
    assert ssim(img, noisy) == pytest.approx(ref, abs=1e-9)
    assert 0.2 < ref < 0.95  # a non-trivial case
    # the same images as channel-first tensors
    ti = torch.from_numpy(img).permute(2, 0, 1)
    tn = torch.from_numpy(noisy).permute(2, 0, 1)
    assert ssim(ti, tn) == pytest.approx(ref, abs=1e-9)


def test_ssim_matches_skimage_grey_float():
    rng = np.random.default_rng(1)
    a = rng.uniform(-1, 1, (33, 47))
    b = np.clip(a + rng.normal(0, 0.2, a.shape), -1, 1)
    ref = skimage_ssim(a, b, 2.0)
    assert ssim(a, b, data_range=2.0) == pytest.approx(ref, abs=1e-9)
    assert ssim(a, a, data_range=2.0) == pytest.approx(1.0)


def test_ssim_banded_and_conv_filters_agree(monkeypatch):
    import atoken.pipelines.metrics as metrics

    rng = np.random.default_rng(3)
    a = rng.integers(0, 255, (40, 57, 3), dtype=np.uint8)
    b = np.clip(a + rng.normal(0, 9, a.shape), 0, 255).astype(np.uint8)
    banded = ssim(a, b)
    monkeypatch.setattr(metrics, "_BANDED_MAX_SIDE", 0)
    assert ssim(a, b) == pytest.approx(banded, abs=1e-12)


def test_ssim_batch_is_mean_of_items_and_too_small_raises():
    x = torch.rand(3, 3, 20, 24)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    items = [ssim(x[i], y[i], data_range=1.0) for i in range(3)]
    assert ssim(x, y, data_range=1.0) == pytest.approx(sum(items) / 3, abs=1e-12)
    assert ssim_per_frame(x, y, data_range=1.0) == pytest.approx(items, abs=1e-12)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(3, 10, 30), torch.zeros(3, 10, 30), data_range=1.0)


# --- Frechet distance -------------------------------------------------------------------------


def test_frechet_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    # = 1 + 0 + 4 + (1 + 1 + 6.25) = 13.25
    assert expected == pytest.approx(13.25)
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(13.25, rel=1e-12)


def test_frechet_matches_scipy_sqrtm_on_full_covariances():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6))
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(torch.from_numpy(b))
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance_from_features(a, b) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_singular_covariance_is_finite():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 20)), rng.normal(size=(5, 20))  # rank 4 covariances
    d = frechet_distance_from_features(a, b)
    assert math.isfinite(d) and d > 0


def test_feature_statistics_and_errors():
    f = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 4.0]])
    mu, sigma = feature_statistics(f)
    np.testing.assert_allclose(mu, [3.0, 4.0])
    np.testing.assert_allclose(sigma, [[4.0, 2.0], [2.0, 4.0]])  # unbiased (N - 1)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="do not fit"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


# --- heatmap and bits -------------------------------------------------------------------------


def test_error_heatmap_colours_and_monotone_brightness():
    x = np.zeros((4, 64, 3), np.uint8)
    y = np.tile(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], (4, 1, 3))
    heat = error_heatmap(x, y, vmax=255)
    assert heat.shape == (4, 64, 3) and heat.dtype == np.uint8
    lum = heat[0].astype(float) @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(lum) >= -1e-9) and lum[-1] - lum[0] > 200
    # default vmax = data_range / 4: a quarter-range error already saturates
    sat = error_heatmap(torch.zeros(3, 2, 2), torch.full((3, 2, 2), 0.5), data_range=2.0)
    zero = error_heatmap(torch.zeros(2, 2), torch.zeros(2, 2), data_range=1.0)
    assert tuple(sat[0, 0]) == tuple(heat[0, -1]) and tuple(zero[0, 0]) == tuple(heat[0, 0])


def test_compression_ratio_bits():
    assert input_bits((256, 256, 3)) == 256 * 256 * 3 * 8
    assert latent_bits(256, 48, "float16") == 256 * 48 * 16
    assert latent_bits(256, 48, torch.float32) == 256 * 48 * 32
    assert latent_bits(256, codebook_size=4096, num_codebooks=8) == pytest.approx(256 * 96)
    assert compression_ratio((256, 256, 3), 256, 48) == pytest.approx(8.0)
    fsq = compression_ratio((256, 256, 3), 256, codebook_size=4096, num_codebooks=8)
    assert fsq == pytest.approx(64.0)
    with pytest.raises(ValueError, match="latent_channels"):
        latent_bits(10)


# --- EfficientNet-Lite0 distances -------------------------------------------------------------


@pytest.fixture(scope="module")
def cat() -> np.ndarray:
    """chelsea (CC0) at 192x128: small enough for a fast suite, big enough for the features."""
    return np.asarray(Image.fromarray(data.chelsea()).resize((192, 128), Image.LANCZOS))


def blurred(img: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))


def noisy(img: np.ndarray, sigma: float) -> np.ndarray:
    noise = np.random.default_rng(0).normal(0.0, sigma, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def test_feature_distances_of_identical_images_are_zero(cat):
    assert perceptual_distance(cat, cat) == 0.0
    assert frechet_feature_distance([cat], [cat.copy()]) == pytest.approx(0.0, abs=1e-6)


def test_feature_distances_grow_with_blur_and_noise(cat):
    for degrade, strengths in ((blurred, (0.7, 1.5, 3.0)), (noisy, (3.0, 8.0, 20.0))):
        imgs = [degrade(cat, s) for s in strengths]
        perc = [perceptual_distance(cat, d) for d in imgs]
        fd = [frechet_feature_distance([cat], [d]) for d in imgs]
        assert 0 < perc[0] < perc[1] < perc[2] <= 4, (degrade.__name__, perc)
        assert 0 < fd[0] < fd[1] < fd[2], (degrade.__name__, fd)


def test_heavy_blur_is_further_than_light_jpeg(cat):
    light = jpeg(cat, 85)
    heavy = blurred(cat, 3.0)
    assert perceptual_distance(cat, heavy) > 2 * perceptual_distance(cat, light)
    assert frechet_feature_distance([cat], [heavy]) > 2 * frechet_feature_distance([cat], [light])


def test_perceptual_distance_per_frame_and_layouts(cat):
    video = np.stack([cat, cat, blurred(cat, 2.0)])
    frames = perceptual_distance_per_frame(video, np.stack([cat, blurred(cat, 2.0), cat]))
    assert frames[0] == 0.0 and frames[1] == pytest.approx(frames[2], rel=1e-3) and frames[1] > 0
    chw = torch.from_numpy(cat.copy()).permute(2, 0, 1)
    blur_chw = torch.from_numpy(blurred(cat, 2.0).copy()).permute(2, 0, 1)
    assert perceptual_distance(chw, blur_chw) == pytest.approx(frames[1], rel=1e-5)


def test_feature_distance_input_errors(cat):
    with pytest.raises(ValueError, match="at least 32x32"):
        perceptual_distance(cat[:20], cat[:20])
    with pytest.raises(ValueError, match="uint8"):
        perceptual_distance(cat.astype(np.float32), cat.astype(np.float32))
    with pytest.raises(ValueError, match="shapes differ"):
        perceptual_distance(cat, cat[:64])
    with pytest.raises(ValueError, match="at least one image"):
        frechet_feature_distance([], [cat])
