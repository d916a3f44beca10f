"""The bundled checkpoints atoken-tiny / atoken-tiny-d (assets/, see assets/atoken-tiny.md).

They are part of the repository, so these tests fail (not skip) when a file is missing. The
thresholds sit well below the card's measurements and far above what an untrained model gives.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import atoken
from atoken import training
from atoken.pipelines.metrics import psnr
from atoken.pretrained.hub import bundled_path
from atoken.training import data


@pytest.fixture(scope="module")
def tiny():
    return atoken.load_pretrained("atoken-tiny")


@pytest.fixture(scope="module")
def tiny_d():
    return atoken.load_pretrained("atoken-tiny-d")


def held_out_crop() -> np.ndarray:
    """A 192x256 crop of chelsea (a photo kept out of training)."""
    (img,) = data.skimage_photos(["chelsea"])
    return img[40:232, 100:356]


def test_files_are_small_and_share_the_encoder(tiny, tiny_d):
    cont, disc = bundled_path("atoken-tiny"), bundled_path("atoken-tiny-d")
    assert cont is not None and disc is not None
    assert (cont.stat().st_size + disc.stat().st_size) / 2**20 < 25
    assert tiny.config.latent_channels == 48 and not tiny.is_discrete
    assert tiny_d.is_discrete and tiny_d.config.text_tower == "minilm"
    a, b = tiny.encoder.state_dict(), tiny_d.encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(tiny.proj.weight, tiny_d.proj.weight)


def test_reconstructs_an_unseen_photo(tiny, tiny_d):
    random = atoken.load(None, tiny.config)
    crop = held_out_crop()
    (t, r), (_, rd) = (training.reconstruct_arrays(m, [crop])[0] for m in (tiny, tiny_d))
    ((_, r0),) = training.reconstruct_arrays(random, [crop])
    assert t.shape == r.shape == (1, 192, 256, 3)
    assert psnr(t[0], r[0]) > 27.0  # card: 32.2 dB on the whole photo
    assert psnr(t[0], rd[0]) > 19.0  # card: 23.3 dB
    assert psnr(t[0], r0[0]) < 15.0  # untrained


def test_zero_shot_colours_of_held_out_pairs(tiny):
    res = training.evaluate_world(tiny, "minilm", "image", split="held_out", count=24, seed=3)
    assert res["accuracy"] > 5 * res["chance"]
    assert res["colour_accuracy"] > 0.7  # card: 0.97


def test_build_script_stages_chain_to_existing_configs():
    """Every stage of scripts/build_atoken_tiny.py has a config that parses, and starts from an
    earlier stage, so one command really rebuilds the bundle."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location(
        "build_tiny", root / "scripts/build_atoken_tiny.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seen: list[str] = []
    for stage, parent in mod.STAGES.items():
        cfg = training.load_train_config(root / "configs/train" / f"atoken_tiny_{stage}.yaml")
        assert cfg.steps > 0
        assert parent is None or parent in seen, f"{stage} starts from {parent}, not trained yet"
        seen.append(stage)
    # the continuous bundle and the FSQ bundle come from stages whose encoder is frozen
    for stage in ("s3c_mse", "s4_fsq"):
        cfg = training.load_train_config(root / "configs/train" / f"atoken_tiny_{stage}.yaml")
        assert cfg.freeze_encoder and mod.STAGES[stage] == "s3b_polish"
    # both are polished with the EfficientNet-Lite0 feature distance before the frames step
    for stage, parent in (("s3e_perceptual", "s3c_mse"), ("s4e_perceptual", "s4_fsq")):
        cfg = training.load_train_config(root / "configs/train" / f"atoken_tiny_{stage}.yaml")
        assert cfg.freeze_encoder and mod.STAGES[stage] == parent
        assert cfg.loss["image"]["lpips"] > 0
        assert cfg.loss["image"]["feature_net"]["layout"] == "effnet-lite0"


def test_videos_reconstruct_every_frame_of_a_temporal_patch(tiny):
    """Issue 16: frames 1-3 of a token are reconstructed, not repeated from frame 0 (the card's
    "Video frames inside a temporal patch"; benchmarks/video_frames.py has the full curve)."""
    from PIL import Image

    from atoken.training import frames, world

    rng = np.random.default_rng(5)
    clips = [
        world.render_video(world.sample_spec(rng, "video", "held_out"), 96, 16) for _ in range(4)
    ]
    (img,) = data.skimage_photos(["coffee"])
    pan = [img[50:306, 60 + 4 * i : 316 + 4 * i] for i in range(16)]  # 2 px a frame at 128 px
    clips.append(np.stack([np.asarray(Image.fromarray(f).resize((128, 128))) for f in pan]))
    x, _, _, y = frames.run_tokens(tiny, frames.clip_tokens(clips))
    pos = frames.position_psnr(x, y)
    assert max(pos) - min(pos) < 2.0, pos  # card: 1.3 dB; the stuttering model: 8.9 dB
    # the decoded frames of a patch move as the true ones do (the stuttering model: 5-10% of the
    # true frame-to-frame change, i.e. near copies of frame 0; the bundle: 25-41%)
    for k in range(1, 4):
        true = ((x[:, k * 768 : (k + 1) * 768] - x[:, :768]) ** 2).mean()
        decoded = ((y[:, k * 768 : (k + 1) * 768] - y[:, :768]) ** 2).mean()
        assert decoded > 0.2 * true, (k, float(decoded / true))
