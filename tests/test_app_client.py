"""The app over HTTP: gradio_client calls every api_name on 127.0.0.1 with example files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import ValidationError

from atoken.io.media import probe_video, read_image
from atoken.pipelines.metrics import psnr, ssim
from tests.app_support import (
    EXAMPLES,
    app_server,
    broken_glb,
    huge_png,
    text_as_png,
    thin_rod,
    truncated_jpeg,
    video_without_frames,
)

ASTRONAUT = str(EXAMPLES / "astronaut.png")
COFFEE = str(EXAMPLES / "coffee.png")
VIDEO = str(EXAMPLES / "astronaut_pan.mp4")
CONTINUOUS, DISCRETE = "continuous (KL)", "discrete (FSQ)"


@pytest.fixture(scope="module")
def client() -> Client:
    return Client(app_server()["url"], verbose=False)


def _image(client: Client, path: str = ASTRONAUT, side: int = 128, tokens: str = CONTINUOUS):
    return client.predict(
        handle_file(path), side, tokens, "mean", 0, 1.0, api_name="/reconstruct_image"
    )


def _plot(data) -> dict:
    assert data["type"] == "plotly"
    return json.loads(data["plot"])


def test_every_api_name_is_exposed(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    expected = {"/reconstruct_image", "/reconstruct_video", "/reconstruct_3d", "/classify"}
    assert expected | {"/interpolate"} <= names


def test_reconstruct_image_pngs_match_the_server_metrics(client):
    slider, heat, metrics, files, *_ = _image(client)
    orig, rec = (read_image(p) for p in slider)
    assert all(p.endswith(".png") for p in slider) and orig.shape == rec.shape
    assert max(orig.shape[:2]) <= 128 and orig.shape[0] % 16 == 0 and orig.shape[1] % 16 == 0
    # lossless outputs: the metrics of the served images equal the server-side ones
    assert psnr(orig, rec, data_range=255) == pytest.approx(metrics["psnr"], abs=1e-3)
    assert ssim(orig, rec, data_range=255) == pytest.approx(metrics["ssim"], abs=1e-3)
    assert metrics["tokens"] == orig.shape[0] * orig.shape[1] // 256
    assert read_image(heat).shape == orig.shape
    names = sorted(os.path.basename(f) for f in files)
    assert names == ["original.png", "reconstruction.png", "tokens.safetensors"]
    np.testing.assert_array_equal(read_image(next(f for f in files if "recon" in f)), rec)


def test_classify_chains_from_the_image_tab_and_takes_uploads(client):
    _image(client)
    plot, verdict, probs = client.predict(
        "image tab", None, "cat, astronaut, rocket", "sigmoid", api_name="/classify"
    )
    bars = _plot(plot)["data"][0]
    assert sorted(bars["y"]) == ["astronaut", "cat", "rocket"] == sorted(probs)
    assert all(0 <= x <= 1 for x in bars["x"])
    best = max(probs, key=probs.get)
    assert f"*{best}*" in verdict and "random weights" in verdict
    plot, _, probs = client.predict(
        "new upload",
        handle_file(VIDEO),
        "zooming in, standing still",
        "softmax",
        api_name="/classify",
    )
    assert sum(_plot(plot)["data"][0]["x"]) == pytest.approx(1.0, abs=1e-4)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)


def test_interpolate_after_reconstruction(client):
    slider, *_ = _image(client)
    video, gallery = client.predict(handle_file(COFFEE), 4, "lerp", api_name="/interpolate")
    assert probe_video(video).num_frames == 8 and len(gallery) == 4
    first = read_image(gallery[0]["image"])
    np.testing.assert_array_equal(first, read_image(slider[1]))  # t=0 is the reconstruction


def test_reconstruct_video_outputs(client):
    side, plot, pca, metrics, files = client.predict(
        handle_file(VIDEO), 2, 96, 8, DISCRETE, api_name="/reconstruct_video"
    )
    info = probe_video(side)
    assert metrics["frames"] == 8 and info.num_frames == 8 and metrics["mode"] == "fsq"
    ys = _plot(plot)["data"][0]["y"]
    assert len(ys) == 8 and all(0 < y < 60 for y in ys)
    assert metrics["psnr_mean"] == pytest.approx(np.mean(ys), abs=1e-3)
    assert probe_video(pca).num_frames == 8 and len(files) == 4


def test_reconstruct_3d_outputs(client, tmp_path):
    glb, ply, turntable, metrics, files = client.predict(
        handle_file(str(thin_rod(tmp_path))), 8, 128, 2, api_name="/reconstruct_3d"
    )
    assert glb.endswith(".glb") and ply.endswith(".ply") and metrics["gaussians"] > 0
    assert 0 < metrics["psnr"] < 60 and probe_video(turntable).num_frames == 2
    with open(ply, "rb") as f:
        header = f.read(2000).decode("latin-1")
    assert header.startswith("ply") and "property float opacity" in header
    _, _, probs = client.predict("3D tab", None, "duck, car", "sigmoid", api_name="/classify")
    assert set(probs) == {"duck", "car"}


@pytest.mark.parametrize("make", [text_as_png, truncated_jpeg, huge_png])
def test_bad_images_are_refused_readably(client, tmp_path, make):
    with pytest.raises(ValidationError) as err:
        _image(client, str(make(tmp_path)))
    message = str(err.value)
    assert any(w in message for w in ("not an image", "truncated", "too large")), message
    assert "Traceback" not in message
    assert _image(client, COFFEE, 64)[2]["tokens"] > 0  # the next request works


def test_bad_video_and_mesh_are_refused_readably(client, tmp_path):
    with pytest.raises(ValidationError, match="no_frames.mp4"):
        client.predict(
            handle_file(str(video_without_frames(tmp_path))),
            1,
            96,
            0,
            CONTINUOUS,
            api_name="/reconstruct_video",
        )
    with pytest.raises(ValidationError, match="broken.glb"):
        client.predict(
            handle_file(str(broken_glb(tmp_path))), 8, 128, 0, api_name="/reconstruct_3d"
        )
    ok = client.predict(handle_file(VIDEO), 4, 64, 4, CONTINUOUS, api_name="/reconstruct_video")
    assert ok[3]["frames"] == 4


def test_oversized_upload_is_refused_before_it_is_sent(client, tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(25 * 2**20)  # sparse: costs no disk
    with pytest.raises(ValueError, match="maximum file size"):
        _image(client, str(big))
    assert _image(client, COFFEE, 64)[2]["tokens"] > 0
