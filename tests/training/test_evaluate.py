"""Tests for atoken/training/evaluate.py: folder metrics with images, a video and a too-small image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from atoken.core.checkpoint import load
from atoken.io.media import write_video
from atoken.training.evaluate import evaluate_folder

from ..conftest import GOLDEN


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


def test_exif_rotated_photo_scores_the_same_in_eval_and_reconstruct(tmp_path, tiny_c):
    """`atoken eval` and `atoken reconstruct` read, crop, convert and score one picture."""
    from atoken.pipelines.metrics import psnr
    from atoken.pipelines.reconstruct import reconstruct_image

    rng = np.random.default_rng(0)
    img = (np.add.outer(np.arange(40), np.arange(72))[..., None] * [3, 2, 1] % 256).astype(np.uint8)
    img = np.clip(img + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 72 x 40, shown 40 x 72
    (tmp_path / "photos").mkdir()
    Image.fromarray(img).save(tmp_path / "photos" / "rotated.jpg", exif=exif, quality=95)
    report = evaluate_folder(tiny_c, tmp_path / "photos", max_side=None)
    res = reconstruct_image(tiny_c, tmp_path / "photos" / "rotated.jpg")
    assert res.original.shape == (64, 32, 3)  # upright, cropped to the 16-px grid
    assert report["psnr"] == pytest.approx(psnr(res.original, res.reconstruction), abs=1e-9)
