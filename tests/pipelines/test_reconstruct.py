"""One-call verbs: image reconstruction, streamed video (== whole-video result), token files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import atoken
from atoken.io.media import read_video, write_video
from atoken.pipelines.reconstruct import (
    chunk_frames,
    decode_file,
    encode_file,
    read_token_file,
    reconstruct_image,
    reconstruct_video,
)

from ..conftest import GOLDEN


@pytest.fixture(scope="module")
def model_c():
    return atoken.load(GOLDEN / "weights/tiny_c.safetensors", "tiny-c")


@pytest.fixture(scope="module")
def model_d():
    return atoken.load(GOLDEN / "weights/tiny_d.safetensors", "tiny-d")


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    frames = [np.roll(base, i, axis=1) for i in range(37)]
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", frames, fps=12)


def test_reconstruct_image_matches_manual_path(model_c):
    img = np.random.default_rng(1).integers(0, 255, (70, 100, 3), dtype=np.uint8)
    res = reconstruct_image(model_c, img)
    assert res.original.shape == res.reconstruction.shape == (64, 96, 3)
    assert res.mode == "mean" and res.indices is None and res.num_tokens == 24
    x = atoken.tokenize([atoken.to_model_range(res.original)])
    with torch.no_grad():
        rec, _ = model_c.reconstruct(x)
    manual = atoken.to_uint8(atoken.detokenize(rec, ["image"])[0][0].permute(1, 2, 0))
    assert np.array_equal(manual, res.reconstruction)
    m = res.metrics()
    assert 0 < m["psnr"] < 60 and -1 <= m["ssim"] <= 1 and m["tokens"] == 24
    assert m["compression"] == pytest.approx(64 * 96 * 3 * 8 / (24 * 8 * 16))


def test_reconstruct_image_modes(model_c, model_d):
    img = np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    a = reconstruct_image(model_c, img, mode="sample", seed=1)
    b = reconstruct_image(model_c, img, mode="sample", seed=1)
    c = reconstruct_image(model_c, img, mode="sample", seed=2)
    assert np.array_equal(a.reconstruction, b.reconstruction)
    assert not np.array_equal(a.reconstruction, c.reconstruction)
    d = reconstruct_image(model_d, img)
    assert d.mode == "fsq" and d.indices.shape == (4, 8)
    with pytest.raises(ValueError, match="no quantizer"):
        reconstruct_image(model_c, img, mode="fsq")
    with pytest.raises(ValueError, match="latent mode"):
        reconstruct_image(model_c, img, mode="bogus")


def test_chunk_frames_keep_every_frame():
    frames = [np.full((1,), i) for i in range(37)]
    chunks = list(chunk_frames(frames, 16))
    assert [(len(c), real) for c, real in chunks] == [(16, 16), (16, 16), (8, 5)]
    tail = chunks[-1][0]
    assert list(tail[:, 0]) == [32, 33, 34, 35, 36, 36, 36, 36]  # padded with the last frame
    assert [(len(c), r) for c, r in chunk_frames(frames[:2], 16)] == [(4, 2)]
    assert [(len(c), r) for c, r in chunk_frames(frames[:18], 16)] == [(16, 16), (4, 2)]


def test_a_video_that_is_not_a_multiple_of_4_frames_keeps_all_of_them(model_c, tmp_path):
    clip = np.random.default_rng(0).integers(0, 256, (10, 32, 48, 3), dtype=np.uint8)
    write_video(tmp_path / "ten.mp4", clip, fps=10)
    res = reconstruct_video(model_c, tmp_path / "ten.mp4", tmp_path / "out")
    assert res.num_frames == 10 == len(res.psnr_per_frame)
    assert len(read_video(res.files["reconstruction"])) == 10
    tokens = encode_file(model_c, tmp_path / "ten.mp4", tmp_path / "ten.safetensors")
    back = decode_file(model_c, tokens, tmp_path / "back.mp4")
    assert len(read_video(back)) == 10


def test_streamed_video_equals_whole_video(model_c, video_path, tmp_path):
    res = reconstruct_video(model_c, video_path, tmp_path / "out", perceptual_frames=5)
    assert res.num_frames == 37 and res.size == (48, 32)  # every frame, none dropped
    assert set(res.files) == {"reconstruction", "original", "side_by_side", "latent_pca"}
    assert all(p.stat().st_size > 0 for p in res.files.values())
    frames = read_video(video_path)
    padded = np.concatenate([frames, frames[-1:].repeat(3, axis=0)])  # 37 -> 40, last repeated
    x = atoken.tokenize([atoken.to_model_range(padded)])
    with torch.no_grad():
        enc = model_c.encode(x)
        rec = model_c.decode(enc.latent())
    whole = atoken.to_uint8(atoken.detokenize(rec, ["video"])[0].permute(0, 2, 3, 1))
    assert (enc.pooled - res.pooled).abs().max() < 1e-5  # streamed pooling is exact
    from atoken.pipelines.metrics import psnr

    cropped = frames[:, 4:36, 4:52]
    for i in (5, 36):
        assert abs(psnr(cropped[i], whole[i], data_range=255) - res.psnr_per_frame[i]) < 1e-6
    # 5 frames evenly spaced over 0..36 get the EfficientNet-Lite0 distance (positions 0 1 2 3 0
    # inside the temporal patches)
    from atoken.pipelines.metrics import perceptual_distance

    assert [i for i, _ in res.perceptual_per_frame] == [0, 9, 18, 27, 36]
    for i, d in res.perceptual_per_frame[::4]:
        assert d == pytest.approx(perceptual_distance(cropped[i], whole[i]), rel=1e-3, abs=1e-5)
    assert res.mean_perceptual == pytest.approx(np.mean([d for _, d in res.perceptual_per_frame]))


def test_video_limits(model_c, video_path, tmp_path):
    from atoken.io.media import MediaError
    from atoken.pipelines.reconstruct import VideoLimits

    with pytest.raises(MediaError, match="limit is 10"):
        reconstruct_video(model_c, video_path, tmp_path, limits=VideoLimits(max_frames=10))
    with pytest.raises(MediaError, match="per side"):
        reconstruct_video(model_c, video_path, tmp_path, limits=VideoLimits(max_side=32))


def test_token_files_round_trip(model_d, video_path, tmp_path):
    tok = encode_file(model_d, video_path, tmp_path / "v.safetensors")
    tensors, meta = read_token_file(tok)
    assert meta["kind"] == "video" and meta["frames"] == "37" and meta["latent_mode"] == "fsq"
    assert tensors["indices"].shape == (tensors["coords"].shape[0], 8)
    assert torch.equal(model_d.dequantize(tensors["indices"]), tensors["latent"])
    assert tensors["coords"][:, 1].max() == 9  # 37 frames (padded to 40) -> 10 latent frames
    out = decode_file(model_d, tok, tmp_path / "v.mp4")
    direct = reconstruct_video(
        model_d,
        video_path,
        tmp_path / "direct",
        write_original=False,
        write_side_by_side=False,
        write_latent_pca=False,
    )
    a, b = read_video(out), read_video(direct.files["reconstruction"])
    assert a.shape == b.shape == (37, 32, 48, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2  # same frames up to mp4 coding


def test_image_token_file(model_c, tmp_path):
    from atoken.io.media import read_image, write_image

    img = np.random.default_rng(3).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    src = write_image(tmp_path / "i.png", img)
    tok = encode_file(model_c, src, tmp_path / "i.safetensors")
    out = decode_file(model_c, tok, tmp_path / "i_rec.png")
    assert np.array_equal(read_image(out), reconstruct_image(model_c, img).reconstruction)
    bad = atoken.load(None, "tiny-d")
    with pytest.raises(ValueError, match="channels"):
        decode_file(bad, tok, tmp_path / "x.png")


def test_scored_frames_cover_every_position_of_the_temporal_patches():
    from atoken.pipelines.reconstruct import scored_frames

    assert sorted(scored_frames(32, 8)) == [0, 4, 9, 13, 18, 22, 27, 31]
    assert {i % 4 for i in scored_frames(32, 8)} == {0, 1, 2, 3}
    assert scored_frames(5, 8) == set(range(5)) and scored_frames(10, 0) == set()
    assert scored_frames(10, 1) == {0} and scored_frames(0, 3) == set()
