"""Tests for atoken/pretrained/download.py against a local HTTP server on 127.0.0.1 (no internet needed)."""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from atoken.pretrained import download as dl
from atoken.pretrained.download import (
    OFFICIAL_WEIGHTS,
    DownloadError,
    IntegrityError,
    cache_dir,
    cached_path,
    download,
    weights_url,
)

DATA = random.Random(0).randbytes(200_003)  # odd size so halves and chunks do not line up
CHUNK = 16 * 1024
STALL_S = 5.0  # how long a "stall" response keeps the connection open without data


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files`` with Range support; ``server.modes`` queues per-request faults."""

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append({"path": self.path, "range": self.headers.get("Range")})
        mode = srv.modes.pop(0) if srv.modes else srv.default_mode
        data = srv.files.get(self.path)
        if mode == "404" or data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m is not None and mode != "ignore_range":
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if mode != "no_length":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode in ("drop", "stall"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if mode == "stall":
                time.sleep(STALL_S)
            return  # HTTP/1.0: the connection closes here, short of Content-Length
        if mode == "slow":
            step = len(body) // 8 + 1
            for i in range(0, len(body), step):
                self.wfile.write(body[i : i + step])
                time.sleep(0.03)
            return
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {"/w/model.pt": DATA}
        self.modes: list[str] = []
        self.default_mode = "ok"
        self.requests: list[dict[str, str | None]] = []

    def url(self, path: str = "/w/model.pt") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Point the cache at a fresh folder and forget any mirror URL."""
    monkeypatch.setenv("ATOKEN_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ATOKEN_BASE_URL", raising=False)
    return tmp_path / "cache"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*")) if folder.exists() else []


def test_full_download_into_cache(server, home):
    path = download(server.url(), progress=False, chunk_size=CHUNK)
    assert path == home / "model.pt"
    assert path.read_bytes() == DATA
    assert _leftovers(home) == ["model.pt"]  # no .part, no .lock
    assert server.requests == [{"path": "/w/model.pt", "range": None}]


def test_existing_file_is_returned_without_a_request(server, home):
    download(server.url(), progress=False)
    again = download(server.url(), progress=False)
    assert again.read_bytes() == DATA
    assert len(server.requests) == 1
    download(server.url(), progress=False, force=True)
    assert len(server.requests) == 2


def test_resume_after_interrupted_download(server, home):
    server.modes = ["drop"]
    with pytest.raises(DownloadError, match="interrupted") as err:
        download(server.url(), progress=False, retries=0, chunk_size=CHUNK)
    assert "run" in str(err.value) and "resume" in str(err.value)
    part = home / "model.pt.part"
    half = len(DATA) // 2
    assert part.read_bytes() == DATA[:half]
    assert not (home / "model.pt").exists()
    assert not (home / "model.pt.lock").exists()

    path = download(server.url(), progress=False, chunk_size=CHUNK)
    assert server.requests[1]["range"] == f"bytes={half}-"
    assert path.read_bytes() == DATA
    assert _leftovers(home) == ["model.pt"]


def test_resume_within_one_call(server, home):
    server.modes = ["drop"]
    path = download(server.url(), progress=False, retries=1, chunk_size=CHUNK)
    assert path.read_bytes() == DATA
    assert [r["range"] for r in server.requests] == [None, f"bytes={len(DATA) // 2}-"]


def test_server_ignoring_range_restarts_cleanly(server, home):
    home.mkdir(parents=True)
    (home / "model.pt.part").write_bytes(b"\xff" * 1000)  # wrong bytes a resume would keep
    server.modes = ["ignore_range"]
    seen: list[tuple[int, int | None]] = []
    path = download(
        server.url(), progress=False, chunk_size=CHUNK, callback=lambda d, t: seen.append((d, t))
    )
    assert server.requests[0]["range"] == "bytes=1000-"
    assert path.read_bytes() == DATA
    assert seen[0] == (0, len(DATA))  # progress restarts from 0, not from the stale part
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))


def test_complete_part_is_finished_after_416(server, home):
    home.mkdir(parents=True)
    (home / "model.pt.part").write_bytes(DATA)  # crashed between the last byte and the rename
    path = download(server.url(), progress=False)
    assert server.requests[0]["range"] == f"bytes={len(DATA)}-"
    assert path.read_bytes() == DATA
    assert _leftovers(home) == ["model.pt"]


def test_announced_size_mismatch_keeps_nothing(server, home):
    with pytest.raises(IntegrityError) as err:
        download(server.url(), progress=False, expected_size=len(DATA) + 1)
    assert str(len(DATA)) in str(err.value) and str(len(DATA) + 1) in str(err.value)
    assert _leftovers(home) == []


def test_size_mismatch_found_after_download_without_content_length(server, home):
    server.modes = ["no_length"]
    with pytest.raises(IntegrityError, match=f"{len(DATA) - 7} were expected"):
        download(server.url(), progress=False, expected_size=len(DATA) - 7)
    assert _leftovers(home) == []
    server.modes = ["no_length"]  # without an expected size, end of stream means complete
    assert download(server.url(), progress=False).read_bytes() == DATA


def test_sha256_mismatch_and_match(server, home):
    good = hashlib.sha256(DATA).hexdigest()
    with pytest.raises(IntegrityError, match="sha256") as err:
        download(server.url(), progress=False, sha256="0" * 64)
    assert good in str(err.value)
    assert _leftovers(home) == []
    path = download(server.url(), progress=False, sha256=good.upper())
    assert path.read_bytes() == DATA


def test_wrong_existing_file_is_replaced_when_sha256_is_given(server, home):
    home.mkdir(parents=True)
    (home / "model.pt").write_bytes(b"old")
    good = hashlib.sha256(DATA).hexdigest()
    assert download(server.url(), progress=False, sha256=good).read_bytes() == DATA
    assert len(server.requests) == 1


def test_http_404_names_url_cache_and_manual_steps(server, home):
    url = server.url("/w/missing.pt")
    with pytest.raises(DownloadError) as err:
        download(url, progress=False)
    msg = str(err.value)
    assert "404" in msg and url in msg and str(home) in msg
    assert "ATOKEN_HOME" in msg and "--weights" in msg
    assert not isinstance(err.value, IntegrityError)
    assert _leftovers(home) == []


def test_connection_refused_is_a_clear_error(home):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w/model.pt"
    with pytest.raises(DownloadError) as err:
        download(url, progress=False, timeout=5)
    assert isinstance(err.value, RuntimeError)
    msg = str(err.value)
    assert url in msg and "ATOKEN_HOME" in msg and "--weights" in msg and str(home) in msg
    assert _leftovers(home) == []


def test_stalled_server_times_out_and_keeps_the_part(server, home):
    server.modes = ["stall"]
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="interrupted"):
        download(server.url(), progress=False, retries=0, timeout=0.3, chunk_size=CHUNK)
    # gave up on the 0.3 s timeout, not when the server woke (generous for a loaded machine)
    assert time.monotonic() - t0 < STALL_S - 1.0
    assert (home / "model.pt.part").read_bytes() == DATA[: len(DATA) // 2]


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ATOKEN_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("ATOKEN_HOME")
    assert cache_dir() == tmp_path / "x" / "atoken"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert cache_dir() == tmp_path / "h" / ".cache" / "atoken"


def test_official_names_use_base_url_and_cache(server, home, monkeypatch):
    assert set(OFFICIAL_WEIGHTS) == {"so-c", "so-d", "so-c-s1", "so-c-s2", "gs"}
    filename, preset, licence, size, sha = OFFICIAL_WEIGHTS["so-c"]
    assert (filename, preset, size, sha) == ("atoken-soc.pt", "so-c", None, None)
    assert "research" in licence
    assert weights_url("gs") == "https://ml-site.cdn-apple.com/models/atoken/3d_decode_gs.pt"

    server.files["/mirror/atoken-soc.pt"] = DATA
    monkeypatch.setenv("ATOKEN_BASE_URL", server.url("/mirror"))
    assert cached_path("so-c") is None
    path = download("so-c", progress=False)
    assert path == home / "atoken-soc.pt" and path.read_bytes() == DATA
    assert cached_path("so-c") == path
    assert cached_path("atoken-soc.pt") == path

    (home / "atoken-sod.pt.part").write_bytes(DATA[:10])
    assert cached_path("so-d") is None  # a partial file is not a cached file

    server.files["/elsewhere/x.bin"] = DATA[:5000]
    got = download("so-d", url=server.url("/elsewhere/x.bin"), progress=False)
    assert got == home / "atoken-sod.pt" and got.read_bytes() == DATA[:5000]


def test_dest_as_folder_or_file(server, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    assert download(server.url(), dest=folder, progress=False) == folder / "model.pt"
    target = tmp_path / "deep" / "named.bin"
    assert download(server.url(), dest=target, progress=False) == target
    assert target.read_bytes() == DATA


def test_callback_progress_is_monotone(server):
    seen: list[tuple[int, int | None]] = []
    download(
        server.url(), progress=False, chunk_size=4096, callback=lambda d, t: seen.append((d, t))
    )
    done = [d for d, _ in seen]
    assert len(seen) > 10
    assert all(t == len(DATA) for _, t in seen)
    assert done == sorted(done) and done[0] == 0 and done[-1] == len(DATA)


def test_tqdm_bar_writes_to_stderr(server, capsys):
    download(server.url(), progress=True)
    assert "model.pt" in capsys.readouterr().err


def test_concurrent_downloads_of_one_file_share_one_request(server, home):
    server.default_mode = "slow"
    results: list[Path | BaseException] = []

    def worker() -> None:
        try:
            results.append(download(server.url(), progress=False, chunk_size=CHUNK))
        except BaseException as e:
            results.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [home / "model.pt"] * 2
    assert len(server.requests) == 1
    assert (home / "model.pt").read_bytes() == DATA
    assert _leftovers(home) == ["model.pt"]


def test_stale_lock_by_age_is_taken_over(server, home):
    home.mkdir(parents=True)
    lock = home / "model.pt.lock"
    lock.write_text(f"{os.getpid()} {socket.gethostname()}\n")  # alive owner, but silent
    old = time.time() - dl.LOCK_STALE_S - 10
    os.utime(lock, (old, old))
    assert download(server.url(), progress=False).read_bytes() == DATA
    assert not lock.exists()


@pytest.mark.skipif(os.name != "posix", reason="dead-owner detection uses os.kill(pid, 0)")
def test_lock_of_a_dead_process_is_taken_over(server, home):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    home.mkdir(parents=True)
    lock = home / "model.pt.lock"
    lock.write_text(f"{proc.pid} {socket.gethostname()}\n")
    assert download(server.url(), progress=False).read_bytes() == DATA


def test_fresh_lock_makes_the_second_caller_wait(server, home):
    home.mkdir(parents=True)
    lock = home / "model.pt.lock"
    lock.write_text(f"{os.getpid()} {socket.gethostname()}\n")
    timer = threading.Timer(0.4, lock.unlink)
    timer.start()
    t0 = time.monotonic()
    path = download(server.url(), progress=False)
    assert time.monotonic() - t0 >= 0.35
    assert path.read_bytes() == DATA
    timer.join()


def test_bad_arguments_raise_value_error(server):
    with pytest.raises(ValueError, match="so-c"):
        download("so-x", progress=False)
    with pytest.raises(ValueError, match="http"):
        download("ftp://example.org/a.pt", progress=False)
    with pytest.raises(ValueError, match="64 hex"):
        download(server.url(), sha256="abc", progress=False)
    with pytest.raises(ValueError, match="file name"):
        download(server.url("/"), progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        download(server.url(), chunk_size=0, progress=False)
    with pytest.raises(ValueError, match="twice"):
        download(server.url(), url=server.url(), progress=False)
    with pytest.raises(ValueError, match="unknown"):
        cached_path("nope")
    assert server.requests == []
