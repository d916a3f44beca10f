"""Tests for atoken/pipelines/codecs.py: budget search, curves, missing codecs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from atoken.pipelines import codecs
from atoken.pipelines.metrics import perceptual_distance, psnr


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.asarray(Image.fromarray(data.coffee()).resize((128, 96), Image.LANCZOS))


@pytest.mark.parametrize("codec", [c for c in codecs.CODECS if c not in codecs.missing_codecs()])
def test_budget_search_takes_the_largest_quality_that_fits(photo, codec):
    budget = 0.6 * photo.shape[0] * photo.shape[1]
    point = codecs.encode_at_budget(photo, codec, budget)
    assert point.fits and point.bits <= budget
    assert point.bpp == pytest.approx(point.bits / (128 * 96))
    _, _, top, _ = codecs._FORMATS[codec]
    if point.quality < top:
        data_up, _ = codecs.encode_image(photo, codec, point.quality + 1)
        assert 8 * len(data_up) > budget
    assert point.psnr == pytest.approx(psnr(photo, point.decoded))
    assert 0 < point.ssim <= 1 and 0 < point.perceptual < 4


def test_a_budget_below_the_smallest_file_says_so(photo):
    point = codecs.encode_at_budget(photo, "jpeg", 100, perceptual=False)
    assert not point.fits and point.quality == 1 and point.bits > 100
    with pytest.raises(ValueError, match="budget_bits"):
        codecs.encode_at_budget(photo, "jpeg", 0)


def test_rate_distortion_curves_rise(photo):
    curves = codecs.rate_distortion(photo, ["jpeg", "webp"], qualities=(10, 50, 90))
    for points in curves.values():
        assert [p.quality for p in points] == [10, 50, 90]
        assert points[0].bpp < points[1].bpp < points[2].bpp
        assert points[0].psnr < points[2].psnr and points[0].ssim is None


def test_compare_shares_encodings_and_summarises(photo):
    cmp = codecs.compare_codecs(photo, 0.8 * 128 * 96, ["jpeg", "webp"], qualities=(20, 80))
    assert set(cmp.at_budget) == set(cmp.curves) == {"jpeg", "webp"}
    assert cmp.budget_bpp == pytest.approx(0.8)
    row = cmp.summary()["webp"]
    assert set(row) == {"bpp", "psnr", "ssim", "perceptual", "quality", "fits"}
    assert row["bpp"] <= 0.8 and row["fits"]
    # the codecs' decodes go through the network together: same distance as one at a time
    for name, point in cmp.at_budget.items():
        assert point.perceptual == pytest.approx(
            perceptual_distance(photo, point.decoded), rel=1e-4, abs=1e-6
        ), name


def test_missing_codecs_are_reported_not_dropped(photo, monkeypatch):
    from PIL import features

    real = features.check
    monkeypatch.setattr(features, "check", lambda name: False if name == "avif" else real(name))
    assert set(codecs.missing_codecs()) == {"avif"}
    assert "without AVIF" in codecs.missing_codecs()["avif"]
    cmp = codecs.compare_codecs(photo, 5000, qualities=None, perceptual=False)
    assert "avif" in cmp.missing and "avif" not in cmp.at_budget
    with pytest.raises(ValueError, match="without AVIF"):
        codecs.encode_image(photo, "avif", 50)
    with pytest.raises(ValueError, match="unknown codec"):
        codecs.missing_codecs(["gif"])


def test_input_checks(photo):
    with pytest.raises(ValueError, match="uint8 RGB"):
        codecs.encode_image(photo.astype(np.float32), "jpeg", 50)
    with pytest.raises(ValueError, match="quality"):
        codecs.encode_image(photo, "jpeg", 0)
