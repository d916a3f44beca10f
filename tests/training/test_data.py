"""Training data: samples, augmentation, folder sources, mixing and token-budget batching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from atoken.core.patchify import tokenize
from atoken.training import data


def test_image_sample_matches_official_tokenization():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    s = data.image_sample(img, "cap", "src")
    ref = tokenize([torch.from_numpy(img).float() / 127.5 - 1.0])
    torch.testing.assert_close(s.feats, ref.feats)
    assert torch.equal(s.coords, ref.coords[:, 1:])
    assert s.num_tokens == 2 * 3 and s.kind == "image" and s.caption == "cap"
    # frames 1..3 of an image token are the zero padding
    assert s.feats[:, 768:].abs().max() == 0


def test_video_sample_pads_and_truncates():
    v = np.full((6, 32, 32, 3), 200, np.uint8)
    s = data.video_sample(v)
    assert s.num_tokens == 4 and int(s.coords[:, 0].max()) == 0  # 6 frames -> 4 (one latent step)
    short = data.video_sample(v[:2])
    assert torch.all(short.feats.reshape(4, 4, -1)[:, 2:] == 0)  # padded frames are 0
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        data.video_sample(v[0])


def test_voxel_sample_and_subsampling():
    rng = np.random.default_rng(0)
    feats = rng.uniform(0, 1, (50, 768)).astype(np.float32)
    coords = np.stack(np.unravel_index(np.arange(50) * 7, (64, 64, 64)), -1)
    s = data.voxel_sample(feats, coords, "a cube")
    assert s.kind == "3d" and s.num_tokens == 50
    assert torch.all(s.coords[:, 0] == 1)  # t = 1 as the official 3D path
    torch.testing.assert_close(s.feats[:, :768], torch.from_numpy(feats) * 2 - 1)
    assert s.feats[:, 768:].abs().max() == 0
    sub = data.voxel_sample(feats, coords, max_tokens=20, rng=np.random.default_rng(1))
    assert sub.num_tokens == 20
    keys = sub.coords[:, 1:].long()
    flat = (keys[:, 0] * 64 + keys[:, 1]) * 64 + keys[:, 2]
    assert torch.all(flat[1:] > flat[:-1])  # original order kept
    assert set(flat.tolist()) <= set((np.arange(50) * 7).tolist())


def test_crop_policy():
    pol = data.CropPolicy(32, 96, min_scale=0.5)
    rng = np.random.default_rng(0)
    frames = np.random.default_rng(1).integers(0, 256, (2, 100, 150, 3), dtype=np.uint8)
    for _ in range(20):
        p = pol.draw(rng, 100, 150)
        out = data.CropPolicy.apply(frames, p)
        h, w = out.shape[1:3]
        assert h % 16 == 0 and w % 16 == 0 and 32 <= h <= 96 and 32 <= w <= 96
    p = {"size": (100, 150), "box": (10, 20, 32, 48), "flip": True}
    np.testing.assert_array_equal(
        data.CropPolicy.apply(frames, p)[0], frames[0, 10:42, 20:68][:, ::-1]
    )
    with pytest.raises(ValueError, match="multiples of 16"):
        data.CropPolicy(30, 64)
    with pytest.raises(ValueError, match="max_side"):
        data.CropPolicy(64, 32)


def _stream(*sources, seed=0, rank=0):
    return data.MixtureStream(list(sources), seed=seed, rank=rank)


def test_token_budget_batching_mixes_modalities_and_drops_nothing():
    srcs = [
        data.SyntheticSource("image", side=32),
        data.SyntheticSource("video", side=32),
        data.SyntheticSource("3d", voxels=7),
    ]
    drawn = [next(_stream(*srcs, seed=3)) for _ in range(1)]
    assert drawn[0].num_tokens > 0
    stream = _stream(*srcs, seed=3)
    seen = []

    def counting():
        for s in stream:
            seen.append(s)
            yield s

    batcher = data.TokenBudgetBatcher(counting(), token_budget=20)
    batches = [next(batcher) for _ in range(15)]
    kinds = set()
    for b in batches:
        assert len(b.tokens) <= 20
        b_ids = b.tokens.coords[:, 0]
        assert torch.all(b_ids[1:] >= b_ids[:-1]) and int(b_ids.max()) == b.size - 1
        kinds |= set(b.kinds)
        assert len(b.captions) == len(b.sources) == b.size
    assert kinds == {"image", "video", "3d"}
    assert any(len(set(b.kinds)) > 1 for b in batches)  # modalities share batches
    # every drawn sample is in a batch, except at most the one waiting for the next batch
    assert sum(b.size for b in batches) == len(seen) - 1


def test_oversized_sample_is_rejected():
    batcher = data.TokenBudgetBatcher(iter([data.image_sample(np.zeros((64, 64, 3), np.uint8))]), 8)
    with pytest.raises(ValueError, match="16 tokens.*budget 8"):
        next(batcher)


def test_streams_differ_by_rank_and_resume_exactly():
    src = data.SyntheticSource("image")
    a = [next(_stream(src, seed=1, rank=0)).source for _ in range(1)]
    s0, s1 = _stream(src, seed=1, rank=0), _stream(src, seed=1, rank=1)
    r0 = [next(s0).source for _ in range(10)]
    r1 = [next(s1).source for _ in range(10)]
    assert a[0] == r0[0] and set(r0).isdisjoint(r1)
    state = s0.state_dict()
    ahead = [next(s0).source for _ in range(5)]
    s2 = _stream(src, seed=1, rank=0)
    s2.load_state_dict(json.loads(json.dumps(state)))
    assert [next(s2).source for _ in range(5)] == ahead


def test_image_folder_with_captions(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "sub/c.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("a sidecar caption\n")
    (tmp_path / "captions.json").write_text(json.dumps({"sub/c.jpg": "from the json"}))
    src = data.ImageFolderSource(tmp_path, crop=None)
    caps = dict(zip([n.split("/")[-1] for n in src.names], src.captions))
    assert caps == {"a.png": "a sidecar caption", "b.png": None, "c.jpg": "from the json"}
    s = src.draw(np.random.default_rng(0))
    assert s.num_tokens == 3 * 4
    cropped = data.ImageFolderSource(tmp_path, crop=data.CropPolicy(16, 32))
    assert cropped.draw(np.random.default_rng(0)).num_tokens <= 4
    with pytest.raises(ValueError, match="no image files"):
        data.ImageFolderSource(_empty(tmp_path))


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_video_folder_decodes_only_the_clip(tmp_path):
    import imageio.v2 as iio

    path = tmp_path / "v" / "clip.mp4"
    path.parent.mkdir()
    levels = np.arange(20) * 12
    with iio.get_writer(
        str(path),
        fps=10,
        codec="libx264",
        quality=None,
        ffmpeg_params=["-crf", "0"],
        macro_block_size=16,
    ) as w:
        for v in levels:
            w.append_data(np.full((32, 48, 3), v, np.uint8))
    assert data.count_frames(path) == 20
    frames = data.read_frames(path, 5, 4, stride=2)
    assert frames.shape == (4, 32, 48, 3)
    np.testing.assert_allclose(frames.reshape(4, -1).mean(1), levels[[5, 7, 9, 11]], atol=3)
    src = data.VideoFolderSource(tmp_path / "v", frames=8, crop=None, cache_frames=False)
    s = src.draw(np.random.default_rng(0))
    assert s.kind == "video" and s.num_tokens == 2 * 2 * 3  # 8 frames -> 2 latent steps


def test_voxel_folder(tmp_path):
    rng = np.random.default_rng(0)
    data.save_voxels(
        tmp_path / "x.safetensors",
        rng.uniform(0, 1, (30, 768)),
        np.stack([np.arange(30), np.zeros(30), np.zeros(30)], -1),
    )
    np.savez(
        tmp_path / "y.npz",
        feats768=rng.uniform(0, 1, (10, 768)).astype(np.float16),
        coords_xyz=np.ones((10, 3), np.int32) * np.arange(10)[:, None],
    )
    (tmp_path / "x.txt").write_text("a line of voxels")
    src = data.VoxelFolderSource(tmp_path, max_tokens=12)
    assert len(src) == 2
    sizes = {src.draw(np.random.default_rng(i)).num_tokens for i in range(10)}
    assert sizes == {10, 12}


def test_world_and_texture_sources():
    rng = np.random.default_rng(0)
    img = data.WorldSource("image", crop=data.CropPolicy(32, 48, square=True)).draw(rng)
    assert img.caption and img.caption.endswith(".") and img.num_tokens in (4, 9)
    vid = data.WorldSource("video", crop=data.CropPolicy(32, 32), frames=16).draw(rng)
    assert vid.kind == "video" and vid.num_tokens == 4 * 4
    assert any(w in vid.caption for w in ("video", "clip", "footage"))
    tex = data.TextureSource(data.CropPolicy(32, 32)).draw(rng)
    assert tex.caption is None and tex.num_tokens == 4


def test_build_source_errors():
    with pytest.raises(ValueError, match="type must be one of"):
        data.build_source({"type": "laser"})
    with pytest.raises(ValueError, match="needs 'path'"):
        data.build_source({"type": "image_folder"})
    with pytest.raises(ValueError, match="no bundled image"):
        data.build_source({"type": "skimage", "names": ["not_an_image"]})
    src = data.build_source(
        {"type": "skimage", "names": ["astronaut"], "min_side": 32, "max_side": 64}
    )
    assert src.draw(np.random.default_rng(0)).num_tokens <= 16


def test_exif_rotated_photo_reads_the_same_in_training_eval_and_reconstruct(tmp_path):
    """One reader: ``atoken eval`` (data.read_image) and ``atoken reconstruct`` / the app
    (media.read_image) must score the same picture (they once read 40x20 and 20x40)."""
    from atoken.io import media

    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = (255, 0, 0)  # a red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(img).save(path, exif=exif, quality=95)
    a, b = data.read_image(path), media.read_image(path)
    assert a.shape == b.shape == (40, 20, 3)  # shown upright: taller than wide
    np.testing.assert_array_equal(a, b)
    assert a[:8, :, 0].mean() > 200 > a[-8:, :, 0].mean()  # the band ends up at the top
