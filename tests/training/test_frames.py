"""The frames step (`atoken.training.frames`): fitting frames 1-3 of the video code in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import atoken
from atoken.core.sparse import SparseTensor
from atoken.training import data, frames, world


def world_clips(split: str, count: int, seed: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        world.render_video(world.sample_spec(rng, "video", split), size, 16) for _ in range(count)
    ]


def pans(img: np.ndarray, count: int, seed: int, size: int = 64) -> list[np.ndarray]:
    """Slow pans over random crops of ``img``: 16 frames, 1-3 px a frame."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        side = int(rng.integers(size * 2, min(img.shape[:2]) - 64))
        top, left = rng.integers(0, img.shape[0] - side), rng.integers(0, img.shape[1] - side - 48)
        step = int(rng.integers(1, 4))
        big = [img[top : top + side, left + i * step : left + i * step + side] for i in range(16)]
        out.append(
            np.stack(
                [np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in big]
            )
        )
    return out


@pytest.fixture(scope="module")
def stuttering():
    """atoken-tiny made to stutter the way it used to: frames 1-3 of a token neither read by the
    encoder nor decoded on their own (the decoder repeats frame 0)."""
    model = atoken.load_pretrained("atoken-tiny").float()
    w = frames.frame_width(model)
    with torch.no_grad():
        model.encoder.input_layer.weight[:, w:] = 0
        out = model.decoder.out_layer.weight
        out[w:] = out[:w].repeat(model.patch_t - 1, 1)
    return model


def test_design_reconstructs_every_frame_and_leaves_images_alone(stuttering):
    model = stuttering
    w = frames.frame_width(model)
    photo, unseen = data.skimage_photos(["astronaut", "chelsea"])
    pool = frames.clip_tokens(world_clips("train", 40, 1) + pans(photo, 24, 2))
    held = frames.clip_tokens(world_clips("held_out", 8, 3) + pans(unseen, 6, 9))
    image = data.collate([data.image_sample(photo[:128, :128])]).tokens
    before_img = model.encode(image, pool=False).mean
    in0 = model.encoder.input_layer.weight[:, :w].clone()
    out0 = model.decoder.out_layer.weight[:w].clone()
    x, _, _, y = frames.run_tokens(model, held)
    before = frames.position_psnr(x, y)

    report = frames.design_frame_code(model, pool, log=lambda *_: None)

    assert torch.equal(model.encoder.input_layer.weight[:, :w], in0)
    assert torch.equal(model.decoder.out_layer.weight[:w], out0)
    assert torch.equal(model.encode(image, pool=False).mean, before_img)
    assert report["surrogate_r2"] > 0.99  # the image path is nearly linear, as the step assumes
    x, _, _, y = frames.run_tokens(model, held)
    after = frames.position_psnr(x, y)
    # the copy decoder falls off with the distance from frame 0; the designed code is flat
    assert before[0] - before[3] > 2.5, before
    assert max(after) - min(after) < 2.0, after
    assert np.mean(after[1:]) > np.mean(before[1:]) + 1.0, (before, after)


def test_fit_frame_rows_only_touches_frames_1_to_3():
    model = atoken.load_pretrained("atoken-tiny-d").float()
    w = frames.frame_width(model)
    pool = frames.clip_tokens(world_clips("train", 12, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = frames.fit_frame_rows(model, pool)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert changed == ["decoder.out_layer.weight"]
    assert torch.equal(model.decoder.out_layer.weight[:w], state["decoder.out_layer.weight"][:w])
    # least squares on the pool cannot do worse than the rows it replaced
    for k in range(1, 4):
        assert report["rows_after"][k] >= report["rows_before"][k] - 0.01, report


def test_run_tokens_decodes_what_the_model_decodes(stuttering):
    (clip,) = world_clips("train", 1, 5)
    (tokens,) = frames.clip_tokens([clip])
    x, z, h, y = frames.run_tokens(stuttering, [tokens])
    with torch.no_grad():
        enc = stuttering.encode(tokens, pool=False)
        ref = stuttering.decode(SparseTensor(enc.mean, tokens.coords)).feats
    assert torch.equal(x, tokens.feats) and torch.equal(z, enc.mean)
    assert torch.allclose(y, ref) and h.shape == (len(x), stuttering.config.decoder.channels)
