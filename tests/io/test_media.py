"""Media I/O: limits and clear errors, video streaming and writing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from atoken.io.media import (
    MediaError,
    crop_to_grid,
    iter_video_frames,
    kind_of,
    prepare_image,
    probe_video,
    read_image,
    resize_max_side,
    scaled_size,
    write_video,
)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_read_image_variants(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(read_image(png_bytes(rgb)), rgb)
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent -> white
    assert read_image(Image.fromarray(rgba, "RGBA")).min() == 255
    grey = read_image(np.full((5, 6), 7, np.uint8))
    assert grey.shape == (5, 6, 3)
    assert read_image(np.ones((4, 4, 3), np.float32)).max() == 255


def test_bad_images_give_clear_errors(tmp_path):
    txt = tmp_path / "notes.png"
    txt.write_text("hello, I am not an image")
    with pytest.raises(MediaError, match="not an image"):
        read_image(txt)
    good = png_bytes(np.zeros((64, 64, 3), np.uint8))
    trunc = tmp_path / "cut.jpg"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, "JPEG"
    )
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(MediaError, match="damaged or truncated"):
        read_image(trunc)
    # a header claiming 20000x20000 is refused before decoding
    huge = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(huge, optimize=True)
    with pytest.raises(MediaError, match="limit"):
        read_image(huge)
    with pytest.raises(MediaError, match="cannot open"):
        read_image(tmp_path / "missing.png")
    assert len(good) > 0


def test_resize_and_crop():
    img = np.zeros((300, 200, 3), np.uint8)
    assert resize_max_side(img, 150).shape == (150, 100, 3)
    assert resize_max_side(img, 1000) is img
    assert crop_to_grid(np.zeros((70, 100, 3))).shape == (64, 96, 3)
    assert prepare_image(np.zeros((70, 100, 3), np.uint8), max_side=50).shape == (32, 48, 3)
    with pytest.raises(MediaError):
        prepare_image(np.zeros((10, 100, 3), np.uint8))


def test_kind_of():
    assert (
        kind_of("a.JPG") == "image" and kind_of("b.webm") == "video" and kind_of("c.glb") == "mesh"
    )
    with pytest.raises(MediaError, match="unsupported"):
        kind_of("d.txt")


def test_video_round_trip_and_stride(tmp_path):
    frames = [np.full((32, 48, 3), 10 * i, np.uint8) for i in range(10)]
    path = write_video(tmp_path / "v.mp4", frames, fps=5)
    info = probe_video(path)
    assert (info.width, info.height, info.num_frames) == (48, 32, 10)
    got = list(iter_video_frames(path, stride=3))
    assert len(got) == 4
    assert abs(int(got[1].mean()) - 30) <= 3  # frame 3
    assert len(list(iter_video_frames(path, max_frames=2))) == 2
    small = list(iter_video_frames(path, max_side=24))
    assert small[0].shape == (16, 24, 3)
    assert scaled_size(1280, 720, 640) == (640, 360)


def test_bad_videos(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        probe_video(empty)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 1000)
    with pytest.raises(MediaError):
        probe_video(junk)
