"""Per-session output folders (deleted when the browser tab closes) and friendly errors."""

from __future__ import annotations

import functools
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import torch

from atoken.checkpoint import CheckpointError
from atoken.download import DownloadError
from atoken.media import MediaError
from atoken.text import TextTowerUnavailable

log = logging.getLogger("atoken.app")
ROOT = Path(tempfile.gettempdir()) / "atoken-app"
# Errors whose message is written for people: shown as they are.
READABLE = (
    MediaError,
    ValueError,
    FileNotFoundError,
    TextTowerUnavailable,
    CheckpointError,
    DownloadError,
)


def session_root(request: gr.Request | None) -> Path:
    """The output folder of one browser session."""
    sid = getattr(request, "session_hash", None) or "local"
    return ROOT / re.sub(r"[^A-Za-z0-9_-]", "_", str(sid))[:64]


def run_dir(request: gr.Request | None, kind: str) -> Path:
    """A fresh folder for one request's files inside the session folder."""
    root = session_root(request)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=root))


def cleanup_session(request: gr.Request) -> None:
    """Delete a session's files (wired to ``demo.unload``)."""
    shutil.rmtree(session_root(request), ignore_errors=True)


def friendly(fn: Callable) -> Callable:
    """Turn every exception of a handler into a ``gr.Error`` with a readable message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except torch.OutOfMemoryError as e:
            raise gr.Error(
                "The model ran out of memory: lower the max side (or the number of frames) and "
                "try again."
            ) from e
        except ImportError as e:
            raise gr.Error(f"This feature is not available in this installation: {e}") from e
        except READABLE as e:
            raise gr.Error(_clean(str(e))) from e
        except Exception as e:
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(
                f"Something unexpected went wrong ({type(e).__name__}: {_clean(str(e))[:300]}). "
                "The app is still running: check the input and try again."
            ) from e

    return wrapper


def _clean(message: str) -> str:
    """Drop temporary upload folders from paths in a message; keep the file name."""
    message = message.strip().strip("'\"") or "the input could not be processed"
    return re.sub(r"(/[^\s'\"]*)?/gradio/[0-9a-f]{16,}/", "", message)
