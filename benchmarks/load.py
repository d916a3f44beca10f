"""Load test: N concurrent visitors (one gradio_client session each) use the app for T seconds.

    python benchmarks/load.py --visitors 8 --seconds 180                  # starts app.py itself
    python benchmarks/load.py --visitors 2 --seconds 30 --model atoken-tiny
    python benchmarks/load.py --url http://127.0.0.1:7860/ --pid 12345    # an app already running

Each visitor loops over a mix of the app's calls (image reconstruction with the follow-up
events a browser fires, zero-shot classification, interpolation, variations, a small video,
now and then a small mesh) until the time is up, then closes its session, which makes the
app's ``demo.unload`` delete the session's output folder. One JSON object is printed at the
end: request counts, failures, latencies, the server's memory (RSS of the process and its
children: before and after a warm-up that makes every call once, peak sampled every 0.5 s,
end after the sessions closed) and the size of the app's output folder and of Gradio's file cache (before, peak,
after).

With ``--start`` (the default without ``--url``) the server gets a fresh ``TMPDIR`` and
``GRADIO_TEMP_DIR``, so the folders measured hold only this run's files; against ``--url``
the default folders of this machine are measured (other users' files included) and memory
only with ``--pid``. Only 127.0.0.1 is contacted; telemetry is switched off.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.http_support import call, config, fn_index  # noqa: E402

EXAMPLES = ROOT / "assets" / "examples"
IMAGES = sorted(str(p) for p in EXAMPLES.glob("*.png"))
VIDEO = str(EXAMPLES / "astronaut_pan.mp4")
MESH = str(EXAMPLES / "pencil.glb")  # the smallest mesh in assets/
CONTINUOUS, DISCRETE = "continuous (KL)", "discrete (FSQ)"
LABELS = "cat, dog, cup"
# Relative frequency of each visitor action; those needing an image reconstruction in the
# session first fall back to one.
WEIGHTS = {
    "reconstruct_image": 4.0,
    "classify_upload": 1.0,
    "classify_image_tab": 1.0,
    "interpolate": 1.0,
    "variations": 1.0,
    "reconstruct_video": 1.0,
    "reconstruct_3d": 0.25,
}
NEEDS_IMAGE = {"classify_image_tab", "interpolate", "variations"}
# The events a browser runs after every image reconstruction (.success / .then).
CHAIN = ("latent_view", "after_image")


@dataclass
class Stats:
    """Thread-safe record of every request."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, api: str, seconds: float, error: str | None) -> None:
        """Count one request."""
        with self.lock:
            self.latencies.setdefault(api, []).append(seconds)
            if error is not None:
                self.failures[api] = self.failures.get(api, 0) + 1
                if len(self.errors) < 8:
                    self.errors.append(f"{api}: {error[:300]}")


# -- server and measurements ------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, tmp: Path) -> subprocess.Popen:
    """``python app.py`` on 127.0.0.1 with its temporary files under ``tmp``."""
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "GRADIO_TEMP_DIR": str(tmp / "gradio"),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, "app.py", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    with open(tmp / "server.log", "wb") as log:  # the child keeps its own handle
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_until_up(url: str, server: subprocess.Popen | None, timeout: float = 300) -> None:
    """Poll ``{url}config`` until the app answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(url + "config", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop_server(server: subprocess.Popen) -> None:
    """Interrupt the app as Ctrl-C would; kill it if it lingers."""
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


def process_tree_rss(pid: int) -> int | None:
    """Resident memory in bytes of ``pid`` and all its descendants (None once it is gone)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo, seen = 0, [pid], 0
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                rss = next((line for line in f if line.startswith("VmRSS:")), None)
        except OSError:
            continue
        seen += 1
        total += int(rss.split()[1]) * 1024 if rss else 0
        todo.extend(children.get(p, []))
    return total if seen else None


def folder_size(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path``; (0, 0) when it does not exist."""
    size = count = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                size += os.lstat(os.path.join(folder, name)).st_size
                count += 1
            except OSError:  # deleted while walking
                pass
    return size, count


class Sampler(threading.Thread):
    """Samples the server's memory and both folders every ``period`` seconds; keeps the peaks."""

    def __init__(
        self, pid: int | None, folders: dict[str, Path], period: float = 0.5, every: float = 5.0
    ):
        super().__init__(daemon=True)
        self.pid, self.folders, self.period, self.every = pid, folders, period, every
        self.peak_rss = 0
        self.peak = {name: [0, 0] for name in folders}
        self.timeline: list[list] = []  # [s, rss MB, files per folder...] every `every` s
        self.t0 = time.monotonic()
        self.stopped = threading.Event()

    def sample(self) -> None:
        """Take one sample."""
        rss = process_tree_rss(self.pid) if self.pid is not None else None
        self.peak_rss = max(self.peak_rss, rss or 0)
        counts = []
        for name, path in self.folders.items():
            size, count = folder_size(path)
            self.peak[name] = [max(self.peak[name][0], size), max(self.peak[name][1], count)]
            counts.append(count)
        t = time.monotonic() - self.t0
        if not self.timeline or t - self.timeline[-1][0] >= self.every:
            self.timeline.append([round(t, 1), _mb(rss), *counts])

    def run(self) -> None:
        """Sample until stopped."""
        while not self.stopped.wait(self.period):
            self.sample()


# -- visitors ---------------------------------------------------------------------------------


def new_client(url: str, downloads: Path):
    """A gradio_client session that downloads outputs (as a browser would fetch them)."""
    from gradio_client import Client

    downloads.mkdir(parents=True, exist_ok=True)
    return Client(
        url, verbose=False, download_files=str(downloads), analytics_enabled=False, max_workers=4
    )


def actions(client, rng: random.Random) -> dict[str, Callable]:
    """The visitor's calls, by name; each returns the result or raises."""
    from gradio_client import handle_file

    def image() -> object:
        side, tokens = rng.choice([128, 256]), rng.choice([CONTINUOUS, DISCRETE])
        return client.submit(
            handle_file(rng.choice(IMAGES)),
            side,
            tokens,
            "mean",
            0,
            1.0,
            api_name="/reconstruct_image",
        )

    return {
        "reconstruct_image": image,
        "classify_upload": lambda: client.submit(
            "new upload",
            handle_file(rng.choice(IMAGES)),
            LABELS,
            rng.choice(["sigmoid", "softmax"]),
            api_name="/classify",
        ),
        "classify_image_tab": lambda: client.submit(
            "image tab", None, LABELS, "sigmoid", api_name="/classify"
        ),
        "interpolate": lambda: client.submit(
            handle_file(rng.choice(IMAGES)),
            4,
            rng.choice(["lerp", "slerp"]),
            api_name="/interpolate",
        ),
        "variations": lambda: client.submit(2, 1.0, 0, True, api_name="/variations"),
        "reconstruct_video": lambda: client.submit(
            handle_file(VIDEO),
            1,
            128,
            16,
            rng.choice([CONTINUOUS, DISCRETE]),
            api_name="/reconstruct_video",
        ),
        "reconstruct_3d": lambda: client.submit(
            handle_file(MESH), 8, 128, 0, api_name="/reconstruct_3d"
        ),
    }


def timed(stats: Stats, api: str, run: Callable[[], object], timeout: float) -> bool:
    """Run one request (a gradio_client Job or a raw call), record it; True on success."""
    t0 = time.perf_counter()
    error = None
    try:
        out = run()
        if hasattr(out, "result"):  # a Job
            try:
                out.result(timeout=timeout)
            except Exception:  # a timeout leaves the job queued: cancel it
                out.cancel()
                raise
        elif getattr(out, "ok", True) is False:  # a tests.http_support.Result
            error = out.error or "failed"
    except Exception as e:  # every failure is counted; none stops the visitor
        error = f"{type(e).__name__}: {e}"
    stats.add(api, time.perf_counter() - t0, error)
    return error is None


def visitor(
    i: int,
    url: str,
    deadline: float,
    stats: Stats,
    chain: dict[str, int],
    work: Path,
    timeout: float,
    sessions: list[str],
) -> None:
    """One visitor: a session that makes requests until ``deadline``, then closes."""
    rng = random.Random(i)
    try:
        client = new_client(url, work / f"visitor-{i}")
    except Exception as e:  # counted, like a failed request
        stats.add("connect", 0.0, f"{type(e).__name__}: {e}")
        return
    sessions.append(client.session_hash)
    calls = actions(client, rng)
    names, weights = list(WEIGHTS), list(WEIGHTS.values())
    has_image = False
    try:
        while time.monotonic() < deadline:
            name = rng.choices(names, weights)[0]
            if name in NEEDS_IMAGE and not has_image:
                name = "reconstruct_image"
            ok = timed(stats, name, calls[name], timeout)
            if name == "reconstruct_image" and ok:
                has_image = True
                for event in CHAIN:  # what the browser runs next, in the same session
                    if event in chain and time.monotonic() < deadline:
                        data = [None]  # the image state; the server uses the session's own
                        timed(
                            stats,
                            event,
                            lambda e=event, d=data: call(
                                url, chain[e], d, session_hash=client.session_hash, timeout=timeout
                            ),
                            timeout,
                        )
    finally:
        client.close()


# -- the run ----------------------------------------------------------------------------------


def percentiles(xs: list[float]) -> dict:
    """p50 / p95 / max in seconds (nearest rank)."""
    if not xs:
        return {"p50_s": None, "p95_s": None, "max_s": None}
    s = sorted(xs)

    def rank(q: float) -> float:
        return round(s[min(len(s) - 1, max(0, int(q * len(s) + 0.5) - 1))], 3)

    return {"p50_s": rank(0.5), "p95_s": rank(0.95), "max_s": round(s[-1], 3)}


def size_report(size: tuple[int, int] | list[int]) -> dict:
    """{"mb", "files"} of one folder measurement."""
    return {"mb": round(size[0] / 2**20, 2), "files": size[1]}


def warm_up(url: str, work: Path, stats: Stats, timeout: float) -> str | None:
    """Every call of the mix once, in a session of its own (closed afterwards): the first use
    of each tab loads what stays loaded (renderer contexts, lazily imported modules)."""
    client = new_client(url, work / "warm-up")
    try:
        calls = actions(client, random.Random(-1))
        for name in ["reconstruct_image", *(n for n in calls if n != "reconstruct_image")]:
            timed(stats, "warm_up", calls[name], timeout)
    finally:
        client.close()
    return client.session_hash


def wait_for_unload(out_dir: Path, sessions: list[str], settle: float) -> tuple[int, float]:
    """Wait (at most ``settle`` s) until the sessions' output folders are gone."""
    t0 = time.monotonic()
    while True:
        left = [s for s in sessions if (out_dir / s).exists()]
        if not left or time.monotonic() - t0 > settle:
            return len(sessions) - len(left), round(time.monotonic() - t0, 1)
        time.sleep(0.5)


def run(args: argparse.Namespace) -> dict:
    """Start (or reach) the app, let the visitors loose, measure, stop."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # gradio_client telemetry
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    work = Path(tempfile.mkdtemp(prefix="atoken-load-"))
    server = None
    if args.url:
        url = args.url if args.url.endswith("/") else args.url + "/"
        if not url.startswith("http://127.0.0.1:"):
            raise ValueError(f"--url must be on this machine (127.0.0.1), got {url}")
        pid = args.pid
        out_dir = Path(tempfile.gettempdir()) / "atoken-app"
        cache = Path(os.environ.get("GRADIO_TEMP_DIR", Path(tempfile.gettempdir()) / "gradio"))
    else:
        port = args.port or free_port()
        url = f"http://127.0.0.1:{port}/"
        server = start_server(args.model, port, work)
        pid = server.pid
        out_dir, cache = work / "atoken-app", work / "gradio"
    folders = {"output_dir": out_dir, "gradio_cache": cache}
    stats = Stats()
    try:
        t0 = time.monotonic()
        wait_until_up(url, server)
        startup = round(time.monotonic() - t0, 1)
        before = {name: folder_size(p) for name, p in folders.items()}
        cfg = config(url)
        chain = {e: fn_index(url, e, cfg) for e in CHAIN} if args.chain else {}
        rss_cold = process_tree_rss(pid) if pid else None
        sessions: list[str] = [warm_up(url, work / "clients", stats, args.request_timeout)]
        rss_start = process_tree_rss(pid) if pid else None
        sampler = Sampler(pid, folders)
        sampler.sample()
        sampler.start()
        t_run = time.monotonic()
        deadline = t_run + args.seconds
        threads = [
            threading.Thread(
                target=visitor,
                args=(i, url, deadline, stats, chain, work / "clients", args.request_timeout),
                kwargs={"sessions": sessions},
                daemon=True,
            )
            for i in range(args.visitors)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.seconds + args.request_timeout * (1 + len(CHAIN)) + 60)
        elapsed = round(time.monotonic() - t_run, 1)
        cleaned, unload_s = wait_for_unload(out_dir, sessions, args.settle)
        time.sleep(args.settle_extra)
        sampler.stopped.set()
        sampler.join(5)
        sampler.sample()
        rss_end = process_tree_rss(pid) if pid else None
        after = {name: folder_size(p) for name, p in folders.items()}
    finally:
        if server is not None:
            stop_server(server)
    everything = [x for name, xs in stats.latencies.items() if name != "warm_up" for x in xs]
    report = {
        "url": url,
        "started_server": server is not None,
        "model": args.model if server is not None else None,
        "visitors": args.visitors,
        "seconds": args.seconds,
        "elapsed_s": elapsed,
        "startup_s": startup,
        "requests": len(everything),
        "failures": sum(n for name, n in stats.failures.items() if name != "warm_up"),
        "errors": stats.errors,
        "latency": percentiles(everything),
        "per_api": {
            name: {"count": len(xs), "failures": stats.failures.get(name, 0), **percentiles(xs)}
            for name, xs in sorted(stats.latencies.items())
        },
        "rss_mb": {
            "before_warm_up": _mb(rss_cold),
            "start": _mb(rss_start),
            "peak": _mb(sampler.peak_rss) if pid else None,
            "end": _mb(rss_end),
        },
        "unload": {
            "sessions": len(sessions),
            "folders_deleted": cleaned,
            "waited_s": unload_s,
            "fired": cleaned > 0,
        },
    }
    report["timeline"] = {
        "columns": ["s", "rss_mb", *(f"{name}_files" for name in folders)],
        "rows": sampler.timeline,
    }
    for name, path in folders.items():
        report[name] = {
            "path": str(path),
            "before": size_report(before[name]),
            "peak": size_report(sampler.peak[name]),
            "after": size_report(after[name]),
        }
    if server is not None:
        report["server_log"] = str(work / "server.log")
    if args.keep:
        report["work_dir"] = str(work)
    else:
        log = work / "server.log"
        if log.exists():  # keep the log beside the report, drop the rest
            kept = Path(tempfile.gettempdir()) / f"{work.name}.server.log"
            shutil.copy(log, kept)
            report["server_log"] = str(kept)
        shutil.rmtree(work, ignore_errors=True)
    return report


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--visitors", type=int, default=8)
    p.add_argument("--seconds", type=float, default=180.0)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="an app already running on 127.0.0.1")
    where.add_argument("--start", action="store_true", help="start app.py (default)")
    p.add_argument("--pid", type=int, default=None, help="the --url app's process, for RSS")
    p.add_argument("--model", default="random-tiny", help="--model of the started app")
    p.add_argument("--port", type=int, default=None, help="port of the started app (default: free)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--settle", type=float, default=40.0, help="max seconds to wait for unload")
    p.add_argument("--settle-extra", type=float, default=3.0, help="seconds after unload")
    p.add_argument("--no-chain", dest="chain", action="store_false", help="skip latent_view etc.")
    p.add_argument("--keep", action="store_true", help="keep the work folder (server files)")
    args = p.parse_args(argv)
    if args.visitors < 1 or args.seconds <= 0:
        p.error(f"--visitors and --seconds must be positive ({args.visitors}, {args.seconds})")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run and print the JSON report."""
    report = run(parse_args(argv))
    rows = report["timeline"]["rows"]
    report["timeline"]["rows"] = [f"@row{i}@" for i in range(len(rows))]
    text = json.dumps(report, indent=2)
    for i, row in enumerate(rows):  # one line per timeline row
        text = text.replace(f'"@row{i}@"', json.dumps(row))
    print(text)


if __name__ == "__main__":
    main()
