"""App handlers called directly (no server, no browser) on the untrained random-tiny model."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import tempfile
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from app import handlers as h
from app import models
from app.models import ModelManager, sibling_key
from app.session import cleanup_session, friendly, run_dir, session_root
from app.uploads import NOT_AN_UPLOAD, trust_folder, upload_path
from atoken.io.media import read_image
from atoken.pipelines.codecs import CODECS, LABELS, missing_codecs
from atoken.pipelines.metrics import perceptual_distance
from atoken.pipelines.reconstruct import decode_file
from atoken.pipelines.visualize import code_usage
from tests.app_support import (
    EXAMPLES,
    MESHES,
    broken_glb,
    huge_png,
    long_video,
    small_limits,
    text_as_png,
    thin_rod,
    truncated_jpeg,
    video_without_frames,
)

ASTRONAUT = str(EXAMPLES / "astronaut.png")
CHELSEA = str(EXAMPLES / "chelsea.png")
VIDEO = str(EXAMPLES / "astronaut_pan.mp4")


class Req:
    """Stands in for gr.Request: only the session hash is used."""

    def __init__(self, sid: str):
        self.session_hash = sid


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    trust_folder(tmp_path_factory.getbasetemp())  # the tests' own files stand in for uploads
    previous = (h.M, h.LIMITS)
    m = ModelManager("random-tiny")
    h.configure(m, small_limits())
    yield m
    h.M, h.LIMITS = previous


def _valid(results: list) -> list[bool]:
    return [r["is_valid"] for r in results]


def _message(results: list) -> str:
    return " ".join(r.get("message", "") for r in results if not r["is_valid"])


@pytest.fixture(scope="module")
def image_result(manager):
    return h.reconstruct_image_handler(
        ASTRONAUT, 128, h.CONTINUOUS, "mean", 0, 1.0, request=Req("img")
    )


@pytest.fixture(scope="module")
def discrete_result(manager):
    return h.reconstruct_image_handler(
        ASTRONAUT, 96, h.DISCRETE, "mean", 0, 1.0, request=Req("img")
    )


def test_status_says_loudly_that_the_model_is_untrained(manager):
    text = h.status()
    assert "UNTRAINED" in text and "random-tiny" in text and "random weights" in text
    assert manager.is_random()


def test_preview_shows_the_cropped_model_input(manager):
    img, info = h.preview_image(ASTRONAUT, 100)
    assert img.shape[0] % 16 == 0 and img.shape[1] % 16 == 0 and max(img.shape[:2]) <= 100
    assert f"{img.shape[0] * img.shape[1] // 256} tokens" in info
    assert h.preview_image(None, 100) == (None, "")


def test_reconstruct_image_outputs(manager, image_result):
    (orig, rec), heat, metrics, files, state = image_result
    assert orig.shape == rec.shape == heat.shape and orig.dtype == rec.dtype == np.uint8
    assert max(orig.shape[:2]) <= 128 and orig.shape[0] % 16 == 0
    grid = (orig.shape[0] // 16, orig.shape[1] // 16)
    assert metrics["tokens"] == grid[0] * grid[1] == len(state["coords"])
    assert metrics["grid"] == list(grid) and metrics["latent_shape"] == [metrics["tokens"], 16]
    assert 0 < metrics["psnr"] < 60 and -1 <= metrics["ssim"] <= 1 and metrics["compression"] > 1
    assert metrics["mode"] == "mean" and metrics["model"] == "random-tiny"
    bpp = metrics["tokens"] * 16 * 16 / (orig.shape[0] * orig.shape[1])  # 16 float16 channels
    assert f"x 16 float16 values = {bpp:.2f} bits per pixel" in metrics["compression_means"]
    assert f"is {metrics['compression']:.1f}x the size" in metrics["compression_means"]
    assert metrics["perceptual"] == pytest.approx(perceptual_distance(orig, rec), abs=1e-4)
    assert metrics["perceptual"] > 0.05 and "EfficientNet-Lite0" in metrics["perceptual_means"]
    names = sorted(p.rsplit("/", 1)[1] for p in files)
    assert names == ["original.png", "reconstruction.png", "tokens.safetensors"]
    rec_png = next(p for p in files if p.endswith("reconstruction.png"))
    np.testing.assert_array_equal(read_image(rec_png), rec)  # lossless download
    tokens = next(p for p in files if p.endswith(".safetensors"))
    decoded = decode_file(manager.model, tokens, rec_png.replace(".png", "_decoded.png"))
    np.testing.assert_array_equal(read_image(decoded), rec)
    assert state["indices"] is None and state["pooled"].shape == (1, 384)
    assert all(
        isinstance(v, np.ndarray) for k, v in state.items() if k in ("mean", "coords", "latent")
    )


@pytest.mark.parametrize("which", ["continuous", "discrete"])
def test_codec_panel_compares_at_the_tokens_bits(manager, image_result, discrete_result, which):
    (orig, rec), _, metrics, _, state = image_result if which == "continuous" else discrete_result
    gallery, table, fig, files = h.compare_codecs_handler(state, request=Req("img"))
    available = [c for c in CODECS if c not in missing_codecs()]
    bpp = float(re.search(r"\| tokens \| ([0-9.]+) \|", table).group(1))
    if which == "discrete":  # FSQ: exactly the codes' bits, 8 groups of 4096 codes per token
        assert bpp == pytest.approx(
            metrics["tokens"] * 96 / (orig.shape[0] * orig.shape[1]), abs=1e-3
        )
        assert "bits of FSQ codes" in table
    else:
        assert "entropy-coded" in table and "stored as float16" in table
    assert "How the tokens' bits are counted" in table
    assert f"| {metrics['psnr']:.2f} |" in table  # the tokens' own row
    assert [c for _, c in gallery][0] == f"tokens: {bpp:.3f} bpp"
    np.testing.assert_array_equal(read_image(gallery[0][0]), rec)
    assert len(gallery) == 1 + len(available) == 1 + len(files)
    root = session_root(Req("img"))
    for codec, path in zip(available, files):
        assert Path(path).is_relative_to(root)  # written into the session folder
        row = re.search(
            rf"\| {LABELS[codec]} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|", table
        )
        file_bpp = 8 * Path(path).stat().st_size / (orig.shape[0] * orig.shape[1])
        assert float(row.group(1)) == pytest.approx(file_bpp, abs=1e-3)  # the real file's size
        if "smallest file is larger" not in table:
            assert file_bpp <= bpp + 1e-9
        assert 0 < float(row.group(4)) < 4  # perceptual distance
    names = [t.name for t in fig.data]
    assert all(LABELS[c] in names for c in available) and any("tokens" in n for n in names)
    curve = next(t for t in fig.data if t.name == LABELS[available[0]])
    assert len(curve.x) >= 5 and list(curve.x) == sorted(curve.x)


def test_codec_panel_needs_a_reconstruction_and_says_when_a_codec_is_missing(
    manager, image_result, monkeypatch
):
    with pytest.raises(gr.Error, match="run the image reconstruction first"):
        h.compare_codecs_handler(None, request=Req("img"))
    from PIL import features

    real = features.check
    monkeypatch.setattr(features, "check", lambda name: name != "avif" and real(name))
    gallery, table, _, files = h.compare_codecs_handler(image_result[4], request=Req("img"))
    assert "AVIF is missing:" in table and "without AVIF support" in table
    assert not any(p.endswith(".avif") for p in files) and len(gallery) == 1 + len(files)
    assert h.codecs_stale()[1].startswith("Press the button")


def test_sampled_latent_depends_on_the_seed(manager, image_result):
    rec = image_result[0][1]
    s1 = h.reconstruct_image_handler(
        ASTRONAUT, 128, h.CONTINUOUS, "sample", 1, 1.0, request=Req("s")
    )
    s1b = h.reconstruct_image_handler(
        ASTRONAUT, 128, h.CONTINUOUS, "sample", 1, 1.0, request=Req("s")
    )
    s2 = h.reconstruct_image_handler(
        ASTRONAUT, 128, h.CONTINUOUS, "sample", 2, 1.0, request=Req("s")
    )
    np.testing.assert_array_equal(s1[0][1], s1b[0][1])
    assert not np.array_equal(s1[0][1], s2[0][1]) and not np.array_equal(s1[0][1], rec)
    assert s1[2]["mode"] == "sample"


def test_discrete_switch_uses_the_fsq_sibling(manager, discrete_result):
    (_, rec), _, metrics, _, state = discrete_result
    assert sibling_key("random-tiny", True) == "random-tiny-d"
    assert metrics["mode"] == "fsq" and metrics["model"] == "random-tiny-d"
    assert state["discrete"] and state["indices"].shape == (metrics["tokens"], 8)
    assert metrics["compression"] == pytest.approx(rec.size * 8 / (metrics["tokens"] * 8 * 12))
    bpp = metrics["tokens"] * 96 / (rec.shape[0] * rec.shape[1])
    assert (
        f"{metrics['tokens']} tokens x 96 bits of FSQ codes = {bpp:.2f} bits per pixel"
        in (metrics["compression_means"])
    )


def test_latent_view_figures(manager, image_result, discrete_result):
    pca, maps, hist, usage, pooled, scatter, info = h.latent_view(image_result[4])
    assert pca.shape == image_result[0][0].shape and pca.dtype == np.uint8
    assert maps.ndim == 2 and maps.dtype == np.uint8
    assert hist.data[0].x.size == image_result[4]["latent"].size  # all values histogrammed
    assert "no codebook" in usage.layout.annotations[0].text and "explain" in info
    assert len(pooled.data[0].y) == 384 and len(scatter.data[0].x) == image_result[2]["tokens"]
    d_usage = h.latent_view(discrete_result[4])[3]
    distinct = np.array(d_usage.data[0].y)
    expected, _ = code_usage(torch.from_numpy(discrete_result[4]["indices"]), 4096)
    np.testing.assert_array_equal(distinct, expected)
    with pytest.raises(gr.Error, match="Reconstruct an image first"):
        h.latent_view(None)


def test_code_usage_counts_and_perplexity():
    idx = torch.tensor([[0, 5], [0, 6], [1, 7], [1, 8]])
    distinct, perplexity = code_usage(idx, 16)
    assert distinct.tolist() == [2, 4]
    np.testing.assert_allclose(perplexity, [2.0, 4.0])  # uniform over 2 and 4 codes
    with pytest.raises(ValueError, match="indices must lie"):
        code_usage(torch.tensor([[16]]), 16)


def test_follow_up_buttons_enable_after_reconstruction(image_result, discrete_result):
    interp, vary, edit, editor, note, posterior = h.after_image(None)
    assert not interp["interactive"] and not vary["interactive"] and not edit["interactive"]
    assert posterior == ""
    interp, vary, edit, editor, note, posterior = h.after_image(image_result[4])
    assert interp["interactive"] and vary["interactive"] and not edit["interactive"]
    assert "discrete" in note and "standard deviation" in posterior
    *_, edit, editor, note, posterior = h.after_image(discrete_result[4])
    assert edit["interactive"] and editor["value"]["background"].shape[2] == 3 and note == ""
    assert "quantized" in posterior


def test_posterior_note_gives_the_measured_width():
    rng = np.random.default_rng(0)
    mean = rng.normal(0, 2.0, (500, 8)).astype(np.float32)  # spread 2 across tokens
    narrow = {"mean": mean, "logvar": np.full_like(mean, 2 * np.log(0.002)), "discrete": False}
    text = h.posterior_note(narrow)
    assert "standard deviation 0.002" in text and "that narrow" in text
    ratio = int(re.search(r"about 1:([\d,]+)", text).group(1).replace(",", ""))
    assert 900 < ratio < 1100  # spread 2 / std 0.002
    wide = dict(narrow, logvar=np.zeros_like(mean))  # std 1: samples do move
    text = h.posterior_note(wide)
    assert "standard deviation 1 " in text and "about 1:2)" in text and "that narrow" not in text


@pytest.mark.parametrize("make", [text_as_png, truncated_jpeg, huge_png])
def test_bad_images_get_readable_messages_and_the_next_request_works(manager, tmp_path, make):
    bad = str(make(tmp_path))
    checks = h.validate_image(bad, 128, h.CONTINUOUS, "mean", 0, 1.0)
    assert _valid(checks) == [False] + [True] * 5
    message = _message(checks)
    assert any(w in message for w in ("not an image", "truncated", "too large")), message
    with pytest.raises(gr.Error) as err:
        h.reconstruct_image_handler(bad, 128, h.CONTINUOUS, "mean", 0, 1.0, request=Req("bad"))
    assert "Traceback" not in err.value.message and len(err.value.message) < 400
    preview, text = h.preview_image(bad, 128)  # said under the preview, not raised again
    assert preview is None and text.startswith("**Cannot use this file:**")
    assert any(w in text for w in ("not an image", "truncated", "too large")), text
    good = h.reconstruct_image_handler(
        CHELSEA, 64, h.CONTINUOUS, "mean", 0, 1.0, request=Req("bad")
    )
    assert good[2]["tokens"] > 0


def test_validate_image_accepts_examples_and_checks_max_side(manager):
    assert all(_valid(h.validate_image(ASTRONAUT, 256, h.CONTINUOUS, "mean", 0, 1.0)))
    assert _valid(h.validate_image(None, 256))[0] is False
    assert _valid(h.validate_image(ASTRONAUT, 5000)) == [True, False]


def test_friendly_errors_never_show_tracebacks():
    @friendly
    def boom():
        raise KeyError("internal")

    with pytest.raises(gr.Error) as err:
        boom()
    assert "still running" in err.value.message and "KeyError" in err.value.message

    @friendly
    def bad_value():
        raise ValueError("/tmp/gradio/0123456789abcdef0123/x.png is damaged")

    with pytest.raises(gr.Error) as err:
        bad_value()
    assert err.value.message == "x.png is damaged"


def test_video_outputs_and_state(manager):
    side, psnr, pca, metrics, files, state = h.reconstruct_video_handler(
        VIDEO, 2, 96, 12, h.CONTINUOUS, request=Req("vid")
    )
    assert metrics["frames"] == 12 and metrics["fps"] == 6.0
    assert len(psnr.data[0].y) == 12 and all(0 < v < 60 for v in psnr.data[0].y)
    assert side.endswith("side_by_side.mp4") and pca.endswith("latent_pca.mp4")
    assert sorted(f.rsplit("/", 1)[1] for f in files) == [
        "latent_pca.mp4",
        "original.mp4",
        "reconstruction.mp4",
        "side_by_side.mp4",
    ]
    from atoken.io.media import probe_video

    info = probe_video(side)
    w, hgt = metrics["size"]
    assert info.num_frames == 12 and info.width >= 2 * w and info.height == hgt
    assert state["kind"] == "video" and state["pooled"].shape == (1, 384)
    # every position inside the 4-frame patches, not only the first
    assert (
        metrics["perceptual_frames"]
        == "8 of 12 frames scored, evenly spaced: 0, 2, 3, 5, 6, 8, 9, 11"
    )
    assert (
        0.05 < metrics["perceptual_mean"] < 4
        and "EfficientNet-Lite0" in metrics["perceptual_means"]
    )


def test_bad_videos_are_refused_before_the_model_runs(manager, tmp_path):
    empty = str(video_without_frames(tmp_path))
    checks = h.validate_video(empty, 1, 128, 0, h.CONTINUOUS)
    assert _valid(checks)[0] is False and "no_frames.mp4" in _message(checks)
    too_long = str(long_video(tmp_path))
    assert "the limit is 20 s" in _message(h.validate_video(too_long, 1, 128, 0, h.CONTINUOUS))
    many = h.validate_video(VIDEO, 1, 128, 0, h.CONTINUOUS)
    assert all(_valid(many))  # 32 frames <= 64
    h.LIMITS.video.max_frames = 16
    try:
        # frames are counted in the container inside the queue, not in the validator
        with pytest.raises(gr.Error, match="32 frames after stride 1; the limit is 16"):
            h.reconstruct_video_handler(VIDEO, 1, 128, 0, h.CONTINUOUS, request=Req("vid"))
        assert all(_valid(h.validate_video(VIDEO, 2, 128, 0, h.CONTINUOUS)))
    finally:
        h.LIMITS.video.max_frames = 64
    with pytest.raises(gr.Error, match="no_frames.mp4"):
        h.reconstruct_video_handler(empty, 1, 128, 0, h.CONTINUOUS, request=Req("vid"))
    ok = h.reconstruct_video_handler(VIDEO, 4, 64, 4, h.CONTINUOUS, request=Req("vid"))
    assert ok[3]["frames"] == 4


def test_mesh_validation_and_preview(manager, tmp_path):
    bad = str(broken_glb(tmp_path))
    checks = h.validate_mesh(bad, 16, 256)
    assert _valid(checks) == [False, True, True] and "broken.glb" in _message(checks)
    with pytest.raises(gr.Error, match="broken.glb"):
        h.preview_mesh(bad, request=Req("mesh"))
    glb = h.preview_mesh(str(MESHES / "duck.glb"), request=Req("mesh"))
    assert glb.endswith("input.glb")
    import trimesh

    bounds = trimesh.load(glb, force="mesh").bounds
    assert np.allclose((bounds[1] - bounds[0]).max(), 1.0, atol=1e-3)  # normalised to the unit box


def test_reconstruct_3d_outputs_and_classification(manager, tmp_path):
    glb, ply, turntable, metrics, files, state = h.reconstruct_3d_handler(
        str(thin_rod(tmp_path)), 8, 128, 2, request=Req("3d")
    )
    from atoken.core.gaussians import Gaussians
    from atoken.io.media import probe_video

    g = Gaussians.load_ply(ply)
    assert len(g) == metrics["gaussians"] == 32 * metrics["voxels"] > 0
    assert 0 < metrics["psnr"] < 60 and 0 <= metrics["ssim"] <= 1 and glb.endswith(".glb")
    assert probe_video(turntable).num_frames == 2 and len(files) == 3
    assert "random" in metrics["gaussian_decoder"]
    assert state["kind"] == "3d" and state["pooled"].shape == (1, 384)
    _, _, probs = h.classify_handler(h.FROM_3D, None, "rod, duck", "sigmoid", None, None, state)
    assert set(probs) == {"rod", "duck"}
    no_turntable = h.reconstruct_3d_handler(str(thin_rod(tmp_path)), 4, 128, 0, request=Req("3d"))
    assert no_turntable[2] is None


def test_classify_from_each_source(manager, image_result, tmp_path):
    labels = "cat, astronaut, rocket"
    fig, verdict, probs = h.classify_handler(
        h.FROM_IMAGE, None, labels, "sigmoid", image_result[4], None, None
    )
    assert list(fig.data[0].y)[::-1] == list(probs) and set(probs) == {"cat", "astronaut", "rocket"}
    assert all(0 <= p <= 1 for p in probs.values())
    assert "random weights" in verdict  # the test app runs random-tiny
    _, verdict, soft = h.classify_handler(
        h.NEW_UPLOAD, ASTRONAUT, labels, "softmax", None, None, None
    )
    assert sum(soft.values()) == pytest.approx(1.0, abs=1e-5)
    assert verdict.startswith("Most likely of these labels: **" + max(soft, key=soft.get))
    _, _, vid = h.classify_handler(
        h.NEW_UPLOAD, VIDEO, "zooming in, standing still", "sigmoid", None, None, None
    )
    assert set(vid) == {"zooming in", "standing still"}
    with pytest.raises(gr.Error, match="run the reconstruction in the video tab first"):
        h.classify_handler(h.FROM_VIDEO, None, labels, "sigmoid", None, None, None)
    with pytest.raises(gr.Error, match="no labels"):
        h.classify_handler(h.FROM_IMAGE, None, " , ", "sigmoid", image_result[4], None, None)
    with pytest.raises(gr.Error, match="the limit is 64"):
        many = ", ".join(f"l{i}" for i in range(65))
        h.classify_handler(h.FROM_IMAGE, None, many, "sigmoid", image_result[4], None, None)
    with pytest.raises(gr.Error, match="the limit is 2000"):
        many = ", ".join(f"label {i}" for i in range(500))
        h.classify_handler(h.FROM_IMAGE, None, many, "sigmoid", image_result[4], None, None)
    bad = str(text_as_png(tmp_path))
    checks = h.validate_upload(h.NEW_UPLOAD, bad, labels, "sigmoid", None, None, None)
    assert _valid(checks)[1] is False and "not an image" in _message(checks)
    assert h.fill_labels("motion").startswith("moving left")


def test_the_verdict_says_when_no_label_fits_and_what_the_model_knows(manager):
    low = {"dog": 0.004, "cat": 0.001}
    text = h.verdict(low, "sigmoid", "random-tiny")
    assert text.startswith("**None of these labels fits**") and "dog" in text and "0.4%" in text
    assert "random weights" in text
    high = h.verdict({"red star": 0.7, "blue ring": 0.2}, "sigmoid", "atoken-tiny")
    assert high.startswith("Best match: **red star** (70%)")
    assert "generated world" in high and "guesses" in high


def test_interpolation_from_the_image_state(manager, image_result):
    state = image_result[4]
    video, gallery = h.interpolate_handler(CHELSEA, 5, "slerp", state, request=Req("gen"))
    assert video.endswith(".mp4") and len(gallery) == 5
    assert all(f.shape == state["original"].shape for f, _ in gallery)
    np.testing.assert_array_equal(gallery[0][0], state["reconstruction"])
    assert gallery[-1][1] == "t = 1.00"
    from atoken.io.media import probe_video

    assert probe_video(video).num_frames == 10  # A -> B -> A
    with pytest.raises(gr.Error, match="run the reconstruction in the image tab first"):
        h.interpolate_handler(CHELSEA, 5, "slerp", None, request=Req("gen"))
    with pytest.raises(gr.Error, match="second image"):
        h.interpolate_handler(None, 5, "slerp", state, request=Req("gen"))


def test_variations_write_the_seed_back(manager, image_result):
    state = image_result[4]
    gallery, seed = h.variations_handler(3, 1.0, 0, True, state)
    assert len(gallery) == 3 and isinstance(seed, int)
    rec = state["reconstruction"]
    for i, (frame, caption) in enumerate(gallery):  # each caption measures its own sample
        moved = int(np.abs(frame.astype(int) - rec).max())
        assert caption.startswith(f"seed {seed + i}: ") and f"at most {moved}/255" in caption
    again, same = h.variations_handler(3, 1.0, seed, False, state)
    assert same == seed
    for (a, _), (b, _) in zip(gallery, again):
        np.testing.assert_array_equal(a, b)


def test_token_editing(manager, image_result, discrete_result):
    state = discrete_result[4]
    h_, w_ = state["original"].shape[:2]
    layer = np.zeros((h_, w_, 4), np.uint8)
    layer[:16, :32, 3] = 255  # paint two tokens
    editor = {"background": state["original"], "layers": [layer], "composite": None}
    rec, edited = h.edit_handler(editor, h.RANDOM_CODES, None, 3, state)
    np.testing.assert_array_equal(rec, state["reconstruction"])
    assert edited.shape == rec.shape and not np.array_equal(edited, rec)
    same = h.edit_handler(editor, h.OTHER_IMAGE, ASTRONAUT, 0, state)[1]
    np.testing.assert_array_equal(same, rec)  # its own codes: nothing changes
    with pytest.raises(gr.Error, match="Paint over"):
        h.edit_handler(
            {"background": None, "layers": [], "composite": None}, h.RANDOM_CODES, None, 0, state
        )
    with pytest.raises(gr.Error, match="discrete tokens"):
        h.edit_handler(editor, h.RANDOM_CODES, None, 0, image_result[4])


def test_model_choice_is_per_session_and_refuses_stale_state(manager, image_result):
    assert h.model_info("random-tiny-d")[1]["interactive"] is False
    keys = [k for _, k in h.model_choices()]
    assert {"atoken-tiny", "random-tiny", "random-tiny-d"} <= set(keys)
    assert "so-c" not in keys  # not downloaded and downloads are off: it could never load
    for bad, words in (("so-c", "unknown model"), ("/etc/passwd", "unknown model")):
        # a failed load keeps the session's model and the dropdown usable (no error badge)
        text, dropdown, key = h.load_model(bad, "random-tiny-d")
        assert words in text and dropdown["value"] == key == "random-tiny-d"
        assert "`random-tiny-d`" in text  # the status line of what still runs
    text, dropdown, key = h.load_model("random-tiny-d", "random-tiny")
    assert "random-tiny-d" in text and dropdown["value"] == key == "random-tiny-d"
    # the session's key changed; the server's start model and other sessions did not
    assert manager.key == "random-tiny" and not manager.model.is_discrete
    assert "random-tiny-d" in h.status(key) and "`random-tiny`" in h.status()
    with pytest.raises(gr.Error, match="model changed"):
        h.variations_handler(1, 1.0, 0, False, image_result[4], key)
    gallery, _ = h.variations_handler(1, 1.0, 0, False, image_result[4], "random-tiny")
    assert len(gallery) == 1
    res = h.reconstruct_image_handler(
        ASTRONAUT, 64, h.CONTINUOUS, "mean", 0, 1.0, key, request=Req("d")
    )
    assert res[2]["model"] == "random-tiny"  # an FSQ session's continuous tokens: its sibling
    assert res[4]["tag"] == manager.tag(False, key) != image_result[4]["tag"]


def test_operator_policy_limits_the_choices(tmp_path):
    from atoken.core.checkpoint import save_checkpoint

    torch.manual_seed(0)
    meta = {"atoken_config": json.dumps(models.RANDOM_C.to_dict())}
    model = models.build("random-tiny", "cpu", torch.float32)
    save_checkpoint(model, tmp_path / "m.safetensors", meta)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    policy = models.Policy(models=("random-tiny",), weights_dir=tmp_path, max_models=2)
    m = ModelManager("random-tiny", policy=policy)
    keys = [e.key for e in m.entries()]
    assert keys == ["random-tiny"]  # the list filters the weights folder too
    policy = models.Policy(weights_dir=tmp_path, max_models=2)
    m = ModelManager("random-tiny", policy=policy)
    keys = [e.key for e in m.entries()]
    assert "file:m.safetensors" in keys and "file:notes.txt" not in keys
    with pytest.raises(ValueError, match="unknown model"):
        m.check("file:../m.safetensors")
    with pytest.raises(ValueError, match="unknown model"):
        m.check(str(tmp_path / "m.safetensors"))
    assert "file:m.safetensors" in m.load("file:m.safetensors")
    m.model_for(True)  # random-tiny-d: the cache holds at most two models
    assert len(m.cache.names()) == 2 and "file:m.safetensors" not in m.cache


def test_model_cache_is_bounded_by_bytes_and_never_loads_twice():
    cache = models.ModelCache(max_models=3, max_bytes=3000)
    built = []

    def make(n):
        built.append(n)
        return torch.nn.Linear(n, 1, bias=False)  # n float32 weights = 4n bytes

    a = cache.get("a", lambda: make(300), 1200)
    assert cache.get("a", lambda: make(300), 1200) is a and built == [300]
    cache.get("b", lambda: make(300), 1200)
    cache.get("c", lambda: make(100), 400)  # 2800 bytes: all three fit
    assert cache.names() == ["a", "b", "c"] and cache.used_bytes == 2800
    cache.get("a", lambda: make(300), 1200)  # a is now the most recently used
    cache.get("d", lambda: make(300), 1200)  # b (least recently used) makes room
    assert cache.names() == ["c", "a", "d"]
    with pytest.raises(models.ServerBusy, match="keeps at most"):
        cache.get("huge", lambda: make(10_000), 40_000)


def test_download_button_fetches_into_the_cache(tmp_path, monkeypatch):
    payload = b"x" * 300_000

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    previous = (h.M, h.LIMITS)
    h.configure(ModelManager("random-tiny"), small_limits())
    try:
        with pytest.raises(gr.Error, match="Downloads are turned off"):
            h.download_model("so-d")
        policy = models.Policy(allow_downloads=True)
        h.configure(ModelManager("random-tiny", policy=policy), small_limits())
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        monkeypatch.setenv("ATOKEN_BASE_URL", f"http://127.0.0.1:{server.server_port}/")
        monkeypatch.setenv("ATOKEN_HOME", str(tmp_path))
        info, button = h.model_info("so-d")
        assert button["interactive"] is True and "so-d" in [k for _, k in h.model_choices()]
        assert info.count("Licence") == 1 and "research" in info and "not downloaded" in info
        seen = []
        try:
            message = h.download_model("so-d", progress=lambda *a, **k: seen.append(a))
        finally:
            server.shutdown()
        assert (tmp_path / "atoken-sod.pt").read_bytes() == payload and "Downloaded" in message
        assert str(tmp_path) not in message  # no server path is shown to visitors
        assert seen and seen[-1][0] == pytest.approx(1.0)
        info, button = h.model_info("so-d")
        assert button["interactive"] is False and "in this server's cache" in info  # cached now
        assert str(tmp_path) not in info
    finally:
        h.M, h.LIMITS = previous


def test_warm_up_falls_back_to_sdpa_when_compiling_fails(monkeypatch):
    m = ModelManager("random-tiny")

    def fail(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(models, "reconstruct_image", fail)
    note = m.warm_up()
    assert m.backend == "sdpa" and "compile failed" in note and "SDPA" in m.status()


def test_session_folders_are_removed_on_unload():
    req = Req("unload-me")
    folder = run_dir(req, "image")
    (folder / "x.png").write_bytes(b"1")
    assert folder.parent == session_root(req)
    cleanup_session(req)
    assert not session_root(req).exists()


def test_example_assets_have_clear_sizes():
    for name in ("astronaut.png", "chelsea.png", "coffee.png"):
        img = Image.open(EXAMPLES / name)
        assert max(img.size) == 320


def test_raw_uploads_become_paths(manager, tmp_path):
    import base64

    limit = {"max_bytes": 2**20}
    assert upload_path(None, **limit) is None and upload_path(ASTRONAUT, **limit) == ASTRONAUT
    assert upload_path({"path": ASTRONAUT, "orig_name": "a.png"}, **limit) == ASTRONAUT
    data = base64.b64encode((EXAMPLES / "coffee.png").read_bytes()).decode()
    pasted = upload_path({"path": None, "url": f"data:image/png;base64,{data}"}, Req("p"), **limit)
    np.testing.assert_array_equal(read_image(pasted), read_image(EXAMPLES / "coffee.png"))
    assert pasted.startswith(str(session_root(Req("p"))))  # in the visitor's session folder
    with pytest.raises(ValueError, match="empty or incomplete"):
        upload_path({"path": None, "url": None}, **limit)
    with pytest.raises(ValueError, match="the limit is 0 MB"):
        upload_path({"url": f"data:image/png;base64,{data}"}, max_bytes=1000)
    # a raw FileData dict goes through the validator and the handler like a path
    raw = {"path": str(text_as_png(tmp_path)), "orig_name": "notes.png"}
    assert _valid(h.validate_image(raw, 64))[0] is False
    assert (
        h.reconstruct_image_handler({"path": CHELSEA}, 64, h.CONTINUOUS, "mean", 0, 1.0)[2][
            "tokens"
        ]
        > 0
    )
    assert _valid(h.validate_second_image(None, 4, "slerp", None))[0] is False


def test_only_uploads_are_read(manager, tmp_path_factory):
    outside = Path(tempfile.mkdtemp(prefix="not-an-upload-"))  # outside every trusted folder
    try:
        secret = outside / "secret.png"
        secret.write_bytes((EXAMPLES / "coffee.png").read_bytes())
        (outside / "folder.png").mkdir()
        link = tmp_path_factory.mktemp("links") / "link.png"
        link.symlink_to(secret)  # inside a trusted folder, pointing out of it
        paths = [secret, outside / "missing.png", outside / "folder.png", link, "/etc/passwd"]
        for value in [*paths, *({"path": str(p)} for p in paths), {"video": {"path": str(secret)}}]:
            with pytest.raises(ValueError) as err:
                upload_path(value, max_bytes=2**20)
            assert str(err.value) == NOT_AN_UPLOAD  # one message: nothing about the server
            checks = h.validate_image(value, 64)
            assert _message(checks) == NOT_AN_UPLOAD
            with pytest.raises(gr.Error) as err:
                h.reconstruct_image_handler(value, 64, h.CONTINUOUS, "mean", 0, 1.0)
            assert err.value.message == NOT_AN_UPLOAD
    finally:
        shutil.rmtree(outside)


def test_bundled_checkpoint_becomes_the_default_when_present(tmp_path, monkeypatch):
    import dataclasses
    import json

    import atoken.pretrained.hub
    from atoken.core.checkpoint import save_checkpoint

    cfg = dataclasses.replace(models.RANDOM_C, name="atoken-tiny")
    meta = {"atoken_config": json.dumps(cfg.to_dict())}
    save_checkpoint(
        models.build("random-tiny", "cpu", torch.float32),
        tmp_path / "atoken-tiny.safetensors",
        meta,
    )
    if atoken.pretrained.hub.bundled_path("atoken-tiny") is None:  # the real assets/ has none yet
        assert models.default_key() == "random-tiny"
    monkeypatch.setattr(atoken.pretrained.hub, "ASSETS", tmp_path)
    assert models.default_key() == "atoken-tiny"
    m = ModelManager()
    assert m.key == "atoken-tiny" and not m.is_random()
    assert "UNTRAINED" not in m.status() and "`atoken-tiny`" in m.status()
    entry = next(e for e in models.entries() if e.key == "atoken-tiny")
    assert entry.available and entry.note == "bundled with the app (assets/atoken-tiny.safetensors)"
    with pytest.raises(ValueError, match="no discrete"):
        m.model_for(True)  # atoken-tiny-d is not there
    _, note = m.gaussian_decoder()
    assert "untrained" in note  # atoken-tiny-gs is not there either


def test_fixed_model_hides_the_model_controls(manager):
    from app.layout import build_demo

    def elem_ids(demo) -> set:
        return {c["props"].get("elem_id") for c in demo.config["components"]}

    try:
        fixed = elem_ids(build_demo(manager, small_limits(), switchable=False))
        full = elem_ids(build_demo(manager, small_limits()))
    finally:
        h.configure(manager, small_limits())
    assert "model-status" in fixed and "model-panel" not in fixed
    assert {"model-status", "model-panel", "image-slider", "mesh-view", "zs-plot"} <= full


def test_command_line_options(monkeypatch, tmp_path):
    import importlib.util

    from tests.app_support import ROOT

    spec = importlib.util.spec_from_file_location("app_main", ROOT / "app.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    args = main.parse_args(
        [
            "--weights",
            "w.safetensors",
            "--config",
            "so-c",
            "--port",
            "7000",
            "--dtype",
            "bfloat16",
            "--share",
            "--compile",
        ]
    )
    assert (args.weights, args.config, args.port, args.dtype) == (
        "w.safetensors",
        "so-c",
        7000,
        "bfloat16",
    )
    assert args.share and args.compile and not args.fixed_model and args.host == "127.0.0.1"
    monkeypatch.setenv("ATOKEN_FIXED_MODEL", "1")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("ATOKEN_MODEL", "so-d")
    env_args = main.parse_args([])
    assert env_args.fixed_model and env_args.host == "0.0.0.0" and env_args.model == "so-d"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main.compile_cache() == tmp_path / "atoken" / "inductor"
