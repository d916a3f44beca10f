"""Tests for atoken/evaluate.py: folder metrics with images, a video and a too-small image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from atoken.checkpoint import load
from atoken.evaluate import evaluate_folder
from atoken.media import write_video

from .conftest import GOLDEN


@pytest.fixture(scope="module")
def tiny_c():
    return load(GOLDEN / "weights/tiny_c.safetensors", "tiny-c")


def test_folder_with_images_video_and_a_small_image(tmp_path, tiny_c):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    frames = [np.full((48, 48, 3), 10 * i, np.uint8) for i in range(4)]
    write_video(tmp_path / "v.mp4", frames, fps=4)
    res = evaluate_folder(tiny_c, tmp_path, pca_components=8, codecs=True)
    items = {p.rsplit("/", 1)[-1]: x for p, x in ((x["path"], x) for x in res["per_item"])}
    assert res["items"] == 3 and items["v.mp4"]["frames"] == 4
    assert res["psnr"] == pytest.approx(np.mean([x["psnr"] for x in res["per_item"]]))
    assert "rfid" not in res  # the random-feature Frechet distance is gone (issue 14)
    assert items["s.png"]["perceptual"] is None  # under 32 px: no feature metrics
    assert items["a.png"]["perceptual"] > 0 and res["frechet"] > 0
    known = [items[k]["perceptual"] for k in ("a.png", "v.mp4")]
    assert res["perceptual"] == pytest.approx(np.mean(known))
    assert res["pca_perceptual"] > 0 and res["pca_psnr"] > 0
    assert "tokens_bpp" in items["a.png"] and "tokens_bpp" not in items["v.mp4"]
    for row in res["codecs"].values():
        assert row["perceptual"] > 0  # from the image that has features


def test_missing_or_empty_folder(tmp_path, tiny_c):
    with pytest.raises(ValueError, match="not found"):
        evaluate_folder(tiny_c, tmp_path / "nope")
    with pytest.raises(ValueError, match="no images"):
        evaluate_folder(tiny_c, tmp_path)
