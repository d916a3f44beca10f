"""Per-session output folders (deleted when the browser tab closes, swept when orphaned) and
friendly errors."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import torch

from atoken.core.checkpoint import CheckpointError
from atoken.io.media import MediaError
from atoken.pretrained.download import DownloadError
from atoken.text.towers import TextTowerUnavailable

log = logging.getLogger("atoken.app")
ROOT = Path(tempfile.gettempdir()) / "atoken-app"
SESSION_TTL = 3600.0  # s: a session folder untouched this long is removed by the sweep
OUTPUT_CAP = 2 * 2**30  # bytes: above this the oldest session folders are removed first


class ServerBusy(RuntimeError):
    """The server cannot take this request now (output space or model memory is full)."""


# Errors whose message is written for people: shown as they are.
READABLE = (
    MediaError,
    ValueError,
    FileNotFoundError,
    TextTowerUnavailable,
    CheckpointError,
    DownloadError,
    ServerBusy,
)


def session_root(request: gr.Request | None) -> Path:
    """The output folder of one browser session."""
    sid = getattr(request, "session_hash", None) or "local"
    return ROOT / re.sub(r"[^A-Za-z0-9_-]", "_", str(sid))[:64]


def run_dir(request: gr.Request | None, kind: str) -> Path:
    """A fresh folder for one request's files inside the session folder.

    Over the output cap, the oldest other sessions are swept first; if that is not enough the
    request is refused before it writes anything."""
    root = session_root(request)
    if folder_size(ROOT) > OUTPUT_CAP:
        sweep(keep=root.name)
        if folder_size(ROOT) > OUTPUT_CAP:
            raise ServerBusy(
                f"the server's output space ({OUTPUT_CAP / 2**30:.0f} GB) is full; try again "
                "in a few minutes"
            )
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=root))


def cleanup_session(request: gr.Request) -> None:
    """Delete a session's files (wired to ``demo.unload``) and give freed memory back."""
    shutil.rmtree(session_root(request), ignore_errors=True)
    release_memory()


def release_memory() -> None:
    """Collect garbage and return the C heap's free pages to the system (glibc malloc_trim).

    Without it the server's RSS stays at its busiest level after the visitors leave: tensors
    are freed, but glibc keeps the pages in its arenas.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def folder_size(path: Path) -> int:
    """Bytes of all files under ``path`` (0 when it does not exist)."""
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def _last_use(folder: Path) -> float:
    """Newest modification time of a session folder and its run folders."""
    times = [folder.stat().st_mtime]
    times += [p.stat().st_mtime for p in folder.iterdir()]
    return max(times)


def sweep(
    root: Path | None = None,
    *,
    ttl: float | None = None,
    cap: int | None = None,
    keep: str = "",
) -> list[str]:
    """Remove session folders older than ``ttl``, then the oldest until the total is under
    ``cap`` (never the folder named ``keep``); returns the removed folder names.

    Catches sessions that never sent an unload (raw HTTP clients, killed tabs)."""
    root = ROOT if root is None else root
    ttl = SESSION_TTL if ttl is None else ttl
    cap = OUTPUT_CAP if cap is None else cap
    removed: list[str] = []
    if not root.is_dir():
        return removed
    now = time.time()
    folders = []
    for folder in root.iterdir():
        try:
            if not folder.is_dir() or folder.is_symlink():
                continue
            folders.append((_last_use(folder), folder))
        except OSError:  # removed meanwhile
            continue
    folders.sort()
    alive = []
    for used, folder in folders:
        if now - used > ttl and folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
        else:
            alive.append((used, folder, folder_size(folder)))
    total = sum(size for *_, size in alive)
    for _, folder, size in alive:
        if total <= cap:
            break
        if folder.name == keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
        total -= size
    return removed


def start_sweeper(interval: float = 60.0, **kwargs) -> threading.Thread:
    """Sweep now and then every ``interval`` seconds in a daemon thread."""
    sweep(**kwargs)

    def loop() -> None:
        while True:
            time.sleep(interval)
            try:
                sweep(**kwargs)
                release_memory()
            except Exception:  # noqa: BLE001 - a failed sweep must never stop the server
                log.exception("output sweep failed")

    thread = threading.Thread(target=loop, name="atoken-sweeper", daemon=True)
    thread.start()
    return thread


def error_message(e: BaseException) -> str:
    """What a visitor reads for an exception: its own text when it was written for people,
    a short generic line otherwise (the details go to the server log)."""
    if isinstance(e, gr.Error):
        return str(e.message)
    if isinstance(e, torch.OutOfMemoryError):
        return (
            "The model ran out of memory: lower the max side (or the number of frames) and try "
            "again."
        )
    if isinstance(e, ImportError):
        return f"This feature is not available in this installation: {e}"
    if isinstance(e, READABLE):
        return _clean(str(e))
    log.error("unexpected error", exc_info=e)
    return (
        f"Something unexpected went wrong ({type(e).__name__}: {_clean(str(e))[:300]}). "
        "The app is still running: check the input and try again."
    )


def friendly(fn: Callable) -> Callable:
    """Turn every exception of a handler into a ``gr.Error`` with a readable message.

    A visitor's mistake is one line in the server log, not a traceback (Gradio prints one for
    every ``gr.Error`` unless told not to); an unexpected error is logged with its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as e:
            e.print_exception = False
            log.info("%s refused: %s", fn.__name__, e.message)
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a readable message
            message = error_message(e)
            if isinstance(e, READABLE):
                log.info("%s refused: %s", fn.__name__, message)
            raise gr.Error(message, print_exception=False) from e

    return wrapper


def _clean(message: str) -> str:
    """Drop temporary upload folders from paths in a message; keep the file name."""
    message = message.strip()
    if len(message) >= 2 and message[0] == message[-1] and message[0] in "'\"":
        message = message[1:-1]  # KeyError-style quoting
    message = message or "the input could not be processed"
    return re.sub(r"(/[^\s'\"]*)?/gradio/[0-9a-f]{16,}/", "", message)
