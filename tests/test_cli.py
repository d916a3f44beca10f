"""Command line: reconstruct / encode / decode / models, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atoken.cli import main
from atoken.io.media import read_image, write_video

from .conftest import GOLDEN

ROOT = Path(__file__).resolve().parent.parent
TINY_C = ["--weights", str(GOLDEN / "weights/tiny_c.safetensors"), "--config", "tiny-c"]
TINY_D = ["--weights", str(GOLDEN / "weights/tiny_d.safetensors"), "--config", "tiny-d"]


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(
        path
    )
    return path


def test_reconstruct_image(image_file, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["reconstruct", str(image_file), str(out), *TINY_C]) == 0
    report = json.loads(capsys.readouterr().out)
    assert read_image(out).shape == (48, 64, 3)
    assert report["tokens"] == 12 and 0 < report["psnr"] < 60


def test_encode_decode_video(tmp_path, capsys):
    frames = [np.full((32, 32, 3), 8 * i, np.uint8) for i in range(20)]
    vid = write_video(tmp_path / "v.mp4", frames, fps=8)
    tok = tmp_path / "t.safetensors"
    assert main(["encode", str(vid), str(tok), *TINY_D]) == 0
    assert main(["decode", str(tok), str(tmp_path / "d.mp4"), *TINY_D]) == 0
    from atoken.io.media import probe_video

    assert probe_video(tmp_path / "d.mp4").num_frames == 20
    out = tmp_path / "r.mp4"
    assert main(["reconstruct", str(vid), str(out), "--stride", "2", *TINY_D]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["frames"] == 10 and out.exists()  # every frame after the stride, none dropped


def test_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    assert main(["reconstruct", str(bad), str(tmp_path / "o.png"), *TINY_C]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not an image" in err and "Traceback" not in err
    assert main(["reconstruct", str(tmp_path / "x.txt"), "o.png", *TINY_C]) == 2
    assert "unsupported file type" in capsys.readouterr().err


def test_models_and_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "atoken", "models"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert {"so-c", "so-d", "so-c-s1", "so-c-s2", "gs", "atoken-tiny"} <= set(names)


def test_eval_folder(tmp_path, capsys):
    for i in range(2):
        img = np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    assert main(["eval", str(tmp_path), "--pca", "8", *TINY_C]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["items"] == 2 and "per_item" not in report
    assert 0 < report["psnr"] < 60 and report["pca_psnr"] > report["psnr"]  # untrained model
    assert report["perceptual"] > 0 and report["frechet"] > 0
    assert "pca_perceptual" in report and "codecs" not in report


def test_eval_contract_with_pca_and_codecs(tmp_path):
    """``python -m atoken eval FOLDER --pca 48 --codecs`` prints one JSON object (scripts read
    it): the bundled atoken-tiny on two small CC0 photos."""
    from skimage import data

    for name in ("chelsea", "coffee"):
        img = Image.fromarray(getattr(data, name)())
        img.resize((img.width // 4, img.height // 4), Image.LANCZOS).save(tmp_path / f"{name}.png")
    args = f"eval {tmp_path} --pca 48 --codecs --model atoken-tiny --device cpu".split()
    proc = subprocess.run(
        [sys.executable, "-m", "atoken", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    keys = "items psnr ssim perceptual frechet pca_psnr pca_perceptual pca_frechet tokens_bpp"
    for key in keys.split():
        assert isinstance(report[key], (int, float)) and report[key] >= 0, key
    assert report["items"] == 2 and 20 < report["psnr"] < 50
    assert report["tokens_bpp"] < report["tokens_stored_bpp"] == 3.0  # float16, 48 channels
    expected = {"jpeg", "webp", "avif"} - set(report["codecs_missing"])
    assert set(report["codecs"]) == expected
    for row in report["codecs"].values():
        assert {"bpp", "psnr", "ssim", "perceptual"} <= set(row)
        if row["fits"]:
            assert row["bpp"] <= report["tokens_bpp"] * 1.0001


def test_the_default_work_budget_applies_and_can_be_lifted(tmp_path, capsys):
    zeros = tmp_path / "zeros.png"
    Image.new("L", (5000, 3000)).save(zeros, optimize=True)  # 15 MP, 58k tokens kept whole
    out = tmp_path / "out.png"
    assert main(["reconstruct", str(zeros), str(out), *TINY_C]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["tokens"] <= 4096 and "over the limit of 4096" in captured.err
    h, w = read_image(out).shape[:2]
    assert (h // 16) * (w // 16) == report["tokens"] and w > 1024  # the aspect ratio is kept
    # an explicit size over the budget is refused in one line naming the limit and the flag
    assert main(["reconstruct", str(zeros), str(out), "--max-side", "2048", *TINY_C]) == 2
    err = capsys.readouterr().err
    assert "the limit is 4096 tokens" in err and "--no-budget" in err
    # a video whose header lies about its frame rate is counted, not estimated
    import imageio_ffmpeg

    clip = tmp_path / "fast.mp4"
    writer = imageio_ffmpeg.write_frames(str(clip), (32, 32), fps=1000, macro_block_size=1)
    writer.send(None)
    for i in range(3000):
        writer.send(np.full((32, 32, 3), i % 251, np.uint8))
    writer.close()
    assert main(["encode", str(clip), str(tmp_path / "t.safetensors"), *TINY_C]) == 2
    err = capsys.readouterr().err
    assert "3000" in err and "the limit is" in err
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1100, 40)).save(tiny)  # 2 x 68 tokens: within the budget either way
    assert main(["reconstruct", str(tiny), str(out), "--no-budget", *TINY_C]) == 0


def test_train_overrides_are_typed():
    from atoken.cli import parse_overrides
    from atoken.training.config import load_train_config

    got = parse_overrides(
        [
            "steps=5",
            "warmup_steps=0",
            "lr=3e-4",
            "freeze_encoder=true",
            "name=probe",
            "data.token_budget=64",
        ]
    )
    assert got == {
        "steps": 5,
        "warmup_steps": 0,
        "lr": 3e-4,
        "freeze_encoder": True,
        "name": "probe",
        "data.token_budget": 64,
    }
    cfg = load_train_config(ROOT / "configs" / "train" / "stage1_image.yaml", **got)
    assert cfg.steps == 5 and cfg.lr == 3e-4 and cfg.freeze_encoder is True  # no TypeError
    assert cfg.data["token_budget"] == 64
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_overrides(["steps"])
