"""Tests for atoken/pipelines/rate.py: FSQ bits, the model code length, the continuous estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from atoken.core.checkpoint import load
from atoken.pipelines.rate import MAX_PSNR_DROP, fsq_bits, model_code_length, token_rate
from atoken.pipelines.reconstruct import reconstruct_image

from ..conftest import GOLDEN


def test_fsq_bits_per_token():
    assert fsq_bits(10, (4, 4, 4, 4, 4, 4), 8) == 960  # So/D: 96 bits per token
    assert fsq_bits(3, (8, 5, 5, 5), 1) == pytest.approx(3 * math.log2(1000))
    with pytest.raises(ValueError):
        fsq_bits(1, (1, 4), 1)


def test_model_code_length_matches_gaussian_entropy():
    # fine steps: bits per value ~ h(N(0, s^2)) - log2(step) = 0.5 log2(2 pi e s^2) - log2(step)
    z = torch.from_numpy(np.random.default_rng(0).normal(0, 3.0, (20000, 2)))
    step = 0.25
    per_value = model_code_length(z, step) / z.numel()
    expected = 0.5 * math.log2(2 * math.pi * math.e * 9.0) - math.log2(step)
    assert per_value == pytest.approx(expected, abs=0.02)
    # Laplace data are charged less under the Laplace model than a Gaussian fit would cost
    lap = torch.from_numpy(np.random.default_rng(1).laplace(0, 1.0, (20000, 1)))
    gauss_cost = 0.5 * math.log2(2 * math.pi * math.e * float(lap.var())) - math.log2(step)
    assert model_code_length(lap, step) / lap.numel() < gauss_cost - 0.05
    # coarser steps cost fewer bits
    assert model_code_length(z, 1.0) < model_code_length(z, 0.25)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.asarray(Image.fromarray(data.chelsea()).resize((96, 64), Image.LANCZOS))


def test_token_rate_fsq_is_exact(photo):
    model = load(GOLDEN / "weights/tiny_d.safetensors", "tiny-d")
    res = reconstruct_image(model, photo)
    rate = token_rate(model, res.latent, res.original, res.reconstruction)
    assert rate.kind == "fsq" and rate.num_tokens == 24
    levels, groups = model.config.quantizer_levels, model.config.quantizer_num_codebooks
    assert rate.bits == rate.stored_bits == 24 * groups * sum(math.log2(v) for v in levels)
    assert rate.bpp == pytest.approx(rate.bits / (96 * 64))
    assert "exactly" in rate.explanation()


def test_token_rate_continuous_keeps_the_psnr(photo):
    model = load(GOLDEN / "weights/tiny_c.safetensors", "tiny-c")
    res = reconstruct_image(model, photo)
    rate = token_rate(model, res.latent, res.original, res.reconstruction)
    assert rate.kind == "continuous" and rate.precision == "float16"
    assert rate.stored_bits == 24 * model.config.latent_channels * 16
    assert rate.psnr_drop <= MAX_PSNR_DROP and rate.step > 0
    assert 0 < rate.bits < rate.stored_bits and rate.entropy_bits == rate.bits
    assert "float16" in rate.explanation()
    assert rate.to_dict()["bpp"] == pytest.approx(rate.bpp)
