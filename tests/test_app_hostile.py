"""The app as a hostile visitor tries it: raw HTTP to ``/gradio_api/queue/join`` with any
``fn_index`` and any payload (no gradio_client, no browser), on 127.0.0.1.

Each class of attack from the public-demo issue has its cases here: server files read through
payloads without Gradio's ``meta``, oversized bodies and data URLs, one visitor switching the
model of others, requests whose work is unbounded (huge images, lying video headers, huge
meshes parsed outside the queue), orphaned outputs, and numbers or choices the controls would
never send.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app import session
from app.uploads import NOT_AN_UPLOAD
from tests.app_support import EXAMPLES, MESHES, app_server
from tests.http_support import call, close_session, file_data, fn_index, fn_index_by_elem, upload

ASTRONAUT = EXAMPLES / "astronaut.png"
VIDEO = EXAMPLES / "astronaut_pan.mp4"
CONTINUOUS, DISCRETE = "continuous (KL)", "discrete (FSQ)"
GRADIO_META = "'meta' field must be explicitly provided"  # Gradio's refusal of File payloads


@pytest.fixture(scope="module")
def url() -> str:
    return app_server()["url"]


@pytest.fixture(scope="module")
def outside():
    """A folder outside every upload folder, holding a 'private' image of the server."""
    folder = Path(tempfile.mkdtemp(prefix="server-private-"))
    shutil.copy(ASTRONAUT, folder / "secret.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.png").mkdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _image_args(image, side=64, tokens=CONTINUOUS, mode="mean", seed=0, temperature=1.0):
    return [image, side, tokens, mode, seed, temperature, None]  # None: the model State slot


def _reconstruct(url, image, **kwargs):
    return call(url, fn_index(url, "reconstruct_image"), _image_args(image, **kwargs))


def _sid() -> str:
    return uuid.uuid4().hex[:12]


def _message(r) -> str:
    """The message a visitor sees (a validator's verdict comes prefixed by the input's name)."""
    assert not r.ok, r.output
    return re.sub(r"^\w+: ", "", r.error)


# -- trust boundary -------------------------------------------------------------------------


def test_server_files_are_never_read_whatever_the_payload(url, outside):
    secret = str(outside / "secret.png")
    payloads = [
        {"path": secret},  # no meta: Gradio's own upload check is skipped
        {"path": f"{outside}/../{outside.name}/secret.png"},
    ]
    for payload in payloads:
        r = _reconstruct(url, payload)
        assert _message(r) == NOT_AN_UPLOAD, payload
    # a malformed meta or a bare string is refused by Gradio itself before any handler runs
    odd = (
        {"path": secret, "orig_name": "x.png", "meta": None},
        secret,
        {"video": {"path": secret}},
    )
    for payload in odd:
        r = _reconstruct(url, payload)
        assert not r.ok and r.output is None
    preview = fn_index_by_elem(url, "image-input", "change")
    r = call(url, preview, [{"path": secret}, 64])  # previews say it as text, not as an error
    assert r.ok and r.output == [None, f"**Cannot use this file:** {NOT_AN_UPLOAD}"]
    r = call(url, fn_index_by_elem(url, "video-input", "change"), [{"path": secret}, 1, 64])
    assert r.output == [f"**Cannot use this file:** {NOT_AN_UPLOAD}"] or GRADIO_META in r.error
    # every event that takes a file
    events = {
        "reconstruct_video": [{"path": secret}, 1, 64, 4, CONTINUOUS, None],
        "reconstruct_3d": [{"path": secret}, 8, 128, 0, None],
        "classify": ["new upload", {"path": secret}, "cat", "sigmoid", None, None, None, None],
    }
    for name, data in events.items():
        r = call(url, fn_index(url, name), data)
        # Gradio's own FileData check (meta required) or ours: either way nothing is read
        assert not r.ok and r.output is None, name
        assert _message(r) == NOT_AN_UPLOAD or GRADIO_META in r.error, (name, r.error)
    r = call(url, fn_index_by_elem(url, "mesh-input", "change"), [{"path": secret}])
    assert _message(r) == NOT_AN_UPLOAD or GRADIO_META in r.error


def test_a_missing_path_a_folder_and_a_text_file_get_the_same_message(url, outside):
    messages = set()
    for name in ("secret.png", "missing.png", "sub.png", "notes.txt", "/etc/hostname"):
        messages.add(_message(_reconstruct(url, {"path": str(outside / name)})))
    assert messages == {NOT_AN_UPLOAD}  # nothing tells what exists on the server


def test_chained_events_refuse_server_files_too(url, outside):
    sid = _sid()
    ok = call(
        url,
        fn_index(url, "reconstruct_image"),
        _image_args(file_data(upload(url, ASTRONAUT)), tokens=DISCRETE),
        session_hash=sid,
    )
    assert ok.ok, ok.error
    secret = {"path": str(outside / "secret.png")}
    r = call(url, fn_index(url, "interpolate"), [secret, 4, "slerp", None, None], session_hash=sid)
    assert _message(r) == NOT_AN_UPLOAD
    editor = {"background": None, "layers": [secret], "composite": None}
    data = [editor, "random codes", None, 0, None, None]
    r = call(url, fn_index(url, "edit_tokens"), data, session_hash=sid)
    # the editor's payload is validated by Gradio first (its layers need meta); a layer that
    # passes that check (meta present) still has to be an upload of this server
    assert not r.ok and r.output is None
    editor["layers"] = [{**secret, "meta": {"_type": "gradio.FileData"}}]
    r = call(url, fn_index(url, "edit_tokens"), data, session_hash=sid)
    assert not r.ok and r.output is None
    close_session(url, sid)


def _data_url(nbytes: int) -> str:
    raw = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).tobytes()
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def test_data_urls_are_size_checked_before_decoding_and_bodies_are_bounded(url):
    sid = _sid()
    before = session.folder_size(session.ROOT / sid)
    # 5 MB decoded: over the test app's 4 MB image limit, under its 8 MB body limit
    r = call(
        url,
        fn_index(url, "reconstruct_image"),
        _image_args({"url": _data_url(5 * 2**20)}),
        session_hash=sid,
    )
    assert not r.ok and "the limit is 4 MB" in r.error, r.error
    assert session.folder_size(session.ROOT / sid) == before == 0  # nothing was written
    # a body over the server's limit is refused before it is parsed
    big = {"data": _image_args({"url": _data_url(7 * 2**20)}), "fn_index": 0, "session_hash": sid}
    resp = httpx.post(f"{url}gradio_api/queue/join", json=big, timeout=60)
    assert resp.status_code == 413 and "limit" in resp.text
    # a small pasted image works and lands in the visitor's own session folder
    buf = io.BytesIO()
    Image.open(ASTRONAUT).save(buf, "PNG")
    small = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    r = call(url, fn_index(url, "reconstruct_image"), _image_args({"url": small}), session_hash=sid)
    assert r.ok, r.error
    assert list((session.ROOT / sid).glob("paste-*/pasted.png"))
    close_session(url, sid)


# -- per-visitor model ----------------------------------------------------------------------


def test_unknown_events_get_a_clean_refusal(url):
    join = f"{url}gradio_api/queue/join"
    for index in (10_000, -1):
        body = {"data": [], "fn_index": index, "session_hash": uuid.uuid4().hex}
        resp = httpx.post(join, json=body, timeout=30)
        assert resp.status_code == 404, resp.text
        assert resp.json() == {"detail": f"this app has no event {index}"}
    # known events still run (the body is passed on intact); malformed bodies are Gradio's
    r = _reconstruct(url, file_data(upload(url, EXAMPLES / "chelsea.png")))
    assert r.ok, r.error
    assert httpx.post(join, content=b"[1, 2]", timeout=30).status_code == 422


def test_one_visitor_switching_models_changes_nothing_for_another(url):
    load = fn_index_by_elem(url, "model-load", "click")
    a, b = _sid(), _sid()
    r = call(url, load, ["random-tiny-d", None], session_hash=a)
    assert r.ok, r.error
    assert "random-tiny-d" in r.output[0]
    status = fn_index(url, "status")  # the status line each session sees

    def running(sid: str) -> str:
        r = call(url, status, [None], session_hash=sid)
        return re.search(r"\*\*Running:\*\* `([^`]+)`", r.output[0]).group(1)

    assert (running(a), running(b)) == ("random-tiny-d", "random-tiny")
    # the image state made under a's model is refused once a switches back: the choice is a's
    astronaut = file_data(upload(url, ASTRONAUT))
    assert call(url, fn_index(url, "reconstruct_image"), _image_args(astronaut), session_hash=a).ok
    assert call(url, load, ["random-tiny", None], session_hash=a).ok
    r = call(url, fn_index(url, "variations"), [1, 1.0, 0, False, None, None], session_hash=a)
    assert "model changed" in _message(r)
    for bad in ("/etc/passwd", "custom", "so-c", {"key": 1}, ["random-tiny"]):
        r = call(url, load, [bad, None], session_hash=b)
        # the dropdown's own check (Gradio) or ours (said in the status line, so the panel stays
        # usable): either way nothing is loaded
        said = r.output[0] if r.ok else _message(r)
        assert re.search("unknown model|not in this server|not in the list of choices", said)
    assert running(b) == "random-tiny" and app_server()["manager"].key == "random-tiny"
    for sid in (a, b):
        close_session(url, sid)


def test_downloads_and_paths_are_not_offered_by_default(url):
    cfg = httpx.get(f"{url}config", timeout=10).json()
    labels = {
        str(c.get("props", {}).get("label") or c.get("props", {}).get("value"))
        for c in cfg["components"]
    }
    assert not any("checkpoint path" in x or "Download official" in x for x in labels)


# -- work budget ----------------------------------------------------------------------------


def _zero_png(path: Path, side: int) -> Path:
    Image.new("L", (side, side)).save(path, optimize=True)
    return path


def test_keep_size_is_downscaled_to_the_token_budget(url, tmp_path):
    big = _zero_png(tmp_path / "zeros.png", 6000)  # 36 MP in ~40 kB; 140k tokens kept whole
    assert big.stat().st_size < 200_000
    t0 = time.perf_counter()
    r = _reconstruct(url, file_data(upload(url, big)), side=0)
    assert r.ok, r.error
    metrics = r.output[2]
    assert metrics["tokens"] <= 1024 and "limit of 1024" in metrics["note"]
    assert time.perf_counter() - t0 < 30
    # an explicit max side over the budget is refused, naming the limit
    r = _reconstruct(url, file_data(upload(url, big)), side=1024)
    assert not r.ok and "the limit is 1024 tokens" in r.error


def test_images_over_the_pixel_limit_are_refused_from_the_header(url, tmp_path):
    huge = _zero_png(tmp_path / "huge.png", 8000)  # 64 MP
    r = _reconstruct(url, file_data(upload(url, huge)), side=0)
    assert not r.ok and "the limit is 40 megapixels" in r.error


def _fast_clip(path: Path, frames: int = 10_000, fps: int = 1000) -> Path:
    import imageio_ffmpeg

    w = imageio_ffmpeg.write_frames(str(path), (32, 32), fps=fps, macro_block_size=1)
    w.send(None)
    for i in range(frames):
        w.send(np.full((32, 32, 3), i % 251, np.uint8))
    w.close()
    return path


def test_video_frames_are_counted_in_the_container_not_estimated(url, tmp_path):
    clip = _fast_clip(tmp_path / "fast.mp4")  # 10 s at 1000 fps: 10,000 frames
    r = call(
        url,
        fn_index(url, "reconstruct_video"),
        [file_data(upload(url, clip)), 1, 0, 0, CONTINUOUS, None],
    )
    assert not r.ok and "10000" in r.error and "the limit is 64" in r.error, r.error


def _big_obj(path: Path, faces: int) -> Path:
    """A grid-free OBJ with ``faces`` triangles over 3 vertices (fast to write, slow to parse)."""
    with open(path, "w") as f:
        f.write("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
        f.write("f 1 2 3\n" * faces)
    return path


def test_huge_meshes_are_refused_from_a_count_and_the_server_stays_responsive(url, tmp_path):
    obj = _big_obj(tmp_path / "huge.obj", 1_500_000)  # 12 MB
    server_path = upload(url, obj)
    index = fn_index(url, "reconstruct_3d")
    results = []

    def hostile():
        results.append(call(url, index, [file_data(server_path), 8, 128, 0, None], timeout=120))

    threads = [threading.Thread(target=hostile) for _ in range(4)]
    for t in threads:
        t.start()
    worst = 0.0
    deadline = time.monotonic() + 30
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        t0 = time.perf_counter()
        httpx.get(f"{url}gradio_api/info", timeout=10).raise_for_status()
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.05)
    for t in threads:
        t.join(60)
    assert len(results) == 4
    for r in results:
        assert not r.ok and "1500000 faces" in r.error and "the limit is 200000" in r.error
    assert worst < 1.0, f"/gradio_api/info took {worst:.2f} s during the hostile uploads"


# -- inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (dict(seed=2**70), "seed must be from 0 to 4294967295"),
        (dict(seed=-1), "seed must be from 0"),
        (dict(seed="7"), "seed must be a number"),
        (dict(tokens="quantum"), "tokens must be one of"),
        (dict(temperature=1e300), "temperature must be from 0 to 3"),
        (dict(mode="median"), "latent must be one of"),
        (dict(side=-16), "max side must be from 0"),
        (dict(side=8), "max side must be 0 (keep) or 16"),
        (dict(side=[64]), "max side must be a number"),
    ],
)
def test_numbers_and_choices_are_checked_on_the_server(url, args, words):
    astronaut = file_data(upload(url, ASTRONAUT))
    r = _reconstruct(url, astronaut, **args)
    assert not r.ok and words in r.error, r.error


def test_other_events_check_their_inputs(url):
    sid = _sid()
    astronaut = file_data(upload(url, ASTRONAUT))
    video = file_data(upload(url, VIDEO))
    mesh = file_data(upload(url, MESHES / "duck.glb"))
    assert call(
        url, fn_index(url, "reconstruct_image"), _image_args(astronaut), session_hash=sid
    ).ok
    cases = [
        (
            "variations",
            [10**9, 1.0, 0, False, None, None],
            "samples must be from 1 to 8|greater than maximum value 8",
        ),
        ("variations", [2, 1.0, 0, "yes", None, None], "new seed must be true or false"),
        (
            "interpolate",
            [astronaut, 10**6, "slerp", None, None],
            "steps must be from 2 to 32|greater than maximum value 32",
        ),
        ("interpolate", [astronaut, 4, "teleport", None, None], "path must be one of"),
        (
            "classify",
            ["image tab", None, ["cat"], "sigmoid", None, None, None, None],
            "labels must be text",
        ),
        (
            "classify",
            ["image tab", None, "cat", "argmax", None, None, None, None],
            "must be one of",
        ),
        (
            "classify",
            ["somewhere", None, "cat", "sigmoid", None, None, None, None],
            "item must be one of",
        ),
        (
            "reconstruct_video",
            [video, 99, 64, 4, CONTINUOUS, None],
            "frame stride must be from 1 to 8",
        ),
        (
            "reconstruct_3d",
            [mesh, 4096, 128, 0, None],
            "views must be from 4 to 64|greater than maximum value 64",
        ),
    ]
    for name, data, words in cases:
        r = call(url, fn_index(url, name), data, session_hash=sid)
        assert re.search(words, _message(r)), (name, r.error)
    close_session(url, sid)


# -- disk -----------------------------------------------------------------------------------


def test_outputs_of_sessions_that_never_unload_are_swept(url):
    sid = _sid()  # a raw-HTTP visitor: never opens the heartbeat, so unload never runs
    r = call(
        url,
        fn_index(url, "reconstruct_image"),
        _image_args(file_data(upload(url, ASTRONAUT))),
        session_hash=sid,
    )
    assert r.ok, r.error
    folder = session.ROOT / sid
    assert folder.is_dir() and session.folder_size(folder) > 0
    assert sid not in session.sweep(ttl=3600)  # recent: kept
    old = time.time() - 7200
    for p in [folder, *folder.rglob("*")]:
        os.utime(p, (old, old))
    assert sid in session.sweep(ttl=3600) and not folder.exists()


def test_the_output_folder_has_a_size_cap(tmp_path):
    root = tmp_path / "outputs"
    for i, age in enumerate((300, 200, 100)):
        folder = root / f"s{i}"
        folder.mkdir(parents=True)
        (folder / "out.bin").write_bytes(b"x" * 1000)
        t = time.time() - age
        for p in (folder, folder / "out.bin"):
            os.utime(p, (t, t))
    removed = session.sweep(root, ttl=3600, cap=2500, keep="s0")
    assert removed == ["s1"]  # the oldest other than the kept one; 2000 bytes remain
    assert sorted(p.name for p in root.iterdir()) == ["s0", "s2"]


def test_unload_removes_the_session_folder(url):
    sid = _sid()
    r = call(
        url,
        fn_index(url, "reconstruct_image"),
        _image_args(file_data(upload(url, ASTRONAUT))),
        session_hash=sid,
    )
    assert r.ok and (session.ROOT / sid).is_dir()
    close_session(url, sid)
    deadline = time.monotonic() + 10
    while (session.ROOT / sid).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (session.ROOT / sid).exists()


def test_a_cached_output_is_never_rewritten_while_it_is_being_served(tmp_path, monkeypatch):
    """Two visitors getting the same picture share Gradio's cache path: the second write must not
    truncate the file the first is downloading, and a new file never shows up part-written."""
    import builtins

    import numpy as np
    from gradio import processing_utils as pu

    from app import cache_writes

    cache_writes.install()
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    first = pu.save_img_array_to_cache(picture, str(tmp_path), format="png")
    size = os.path.getsize(first)
    opened_for_writing = []
    real_open = io.open

    def spy(file, mode="r", *args, **kwargs):
        writing = any(c in mode for c in "wax+")
        if writing and not isinstance(file, int) and os.path.realpath(file) == first:
            opened_for_writing.append(mode)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", spy)
    monkeypatch.setattr(builtins, "open", spy)
    with real_open(first, "rb") as download:  # a download in progress holds the file open
        head = download.read(1000)
        again = pu.save_img_array_to_cache(picture, str(tmp_path), format="png")
        rest = download.read()
    assert again == first and not opened_for_writing
    assert len(head) + len(rest) == size == os.path.getsize(first)
    fresh = pu.save_img_array_to_cache(picture[::-1].copy(), str(tmp_path), format="png")
    assert fresh != first and os.path.getsize(fresh) > 0
    assert not [p for p in Path(fresh).parent.iterdir() if p.name.startswith(".")]
