"""The trust boundary for files: what a visitor sends is a path only if this server made it.

Every file-typed input of every event, whatever the payload's shape (a path string, Gradio's
``FileData`` dict with or without ``meta``, a video dict, a data URL), goes through
:func:`upload_path`. A path is accepted only when its real path (symlinks resolved) lies inside
Gradio's upload/cache folder, or the app's own example folders; anything else gets one and the
same message (:data:`NOT_AN_UPLOAD`) that says nothing about the server's disk. Data URLs are
size-checked before decoding and written into the visitor's session folder.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from gradio.utils import get_upload_folder

from app.session import run_dir
from atoken.io.media import MediaError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
NOT_AN_UPLOAD = "that file is not an upload of this app (or it has expired): upload it again"
DATA_URL_TYPES = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/bmp": ".bmp",
}
_extra_roots: list[Path] = []


def trust_folder(folder: str | Path) -> None:
    """Accept files under ``folder`` too (for tests and the operator; never from a request)."""
    _extra_roots.append(Path(os.path.realpath(folder)))


def trusted_roots() -> list[Path]:
    """Folders whose files count as uploads: Gradio's upload cache and the bundled examples."""
    roots = [get_upload_folder(), ASSETS / "examples", ASSETS / "meshes"]
    return [Path(os.path.realpath(r)) for r in roots] + _extra_roots


def is_trusted(path: str) -> bool:
    """True when the real path of ``path`` lies inside a trusted folder (no file access)."""
    real = os.path.realpath(path)
    for root in trusted_roots():
        try:
            if os.path.commonpath([real, str(root)]) == str(root) and real != str(root):
                return True
        except ValueError:  # different drives
            continue
    return False


def upload_path(value, request=None, *, max_bytes: int, what: str = "file") -> str | None:
    """The local path of an uploaded file, or None when nothing was sent.

    Raises MediaError with :data:`NOT_AN_UPLOAD` for any path that is not an upload, and with
    the limit when the file (or a data URL's decoded size) exceeds ``max_bytes``.
    """
    if value is None:
        return None
    if isinstance(value, dict) and isinstance(value.get("video"), dict):
        value = value["video"]  # gr.Video's raw payload
    if isinstance(value, dict):
        if value.get("path"):
            value = value["path"]
        elif isinstance(value.get("url"), str) and value["url"].startswith("data:"):
            return _data_url(value["url"], request, max_bytes, what)
        else:
            raise MediaError(f"the {what} upload is empty or incomplete: upload it again")
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value or len(value) > 4096 or "\x00" in value:
        raise MediaError(NOT_AN_UPLOAD)
    if not is_trusted(value):
        raise MediaError(NOT_AN_UPLOAD)
    real = os.path.realpath(value)
    if not os.path.isfile(real):
        raise MediaError(NOT_AN_UPLOAD)
    size = os.path.getsize(real)
    if size > max_bytes:
        raise MediaError(
            f"the {what} is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB"
        )
    if size == 0:
        raise MediaError(f"the {what} file is empty")
    return value


def _data_url(url: str, request, max_bytes: int, what: str) -> str:
    """Decode a ``data:image/...;base64,`` URL into the visitor's session folder."""
    head, _, body = url.partition(",")
    # base64: 4 characters per 3 bytes; refuse before decoding anything
    approx = len(body) * 3 // 4
    if approx > max_bytes:
        raise MediaError(
            f"the pasted {what} is {approx / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB"
        )
    mime = head[5:].split(";")[0].strip().lower()
    if mime not in DATA_URL_TYPES or not head.endswith(";base64"):
        raise MediaError(
            f"a pasted {what} must be a base64 image ({', '.join(DATA_URL_TYPES)}), "
            f"not {mime[:40] or 'unknown'}"
        )
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"the pasted {what} is not valid base64") from e
    if not data:
        raise MediaError(f"the pasted {what} is empty")
    path = run_dir(request, "paste") / f"pasted{DATA_URL_TYPES[mime]}"
    path.write_bytes(data)
    return str(path)


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` (413) on every route but the
    upload route, which Gradio limits with ``max_file_size``.

    A JSON payload is parsed whole by the server before any handler runs, so its size is
    bounded here, before parsing: by Content-Length, and by counting when there is none.
    """

    def __init__(self, app, max_bytes: int = 80 * 2**20, exempt: tuple[str, ...] = ("/upload",)):
        self.app, self.max_bytes, self.exempt = app, max_bytes, exempt

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "").endswith(self.exempt):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = self.max_bytes + 1
        if declared > self.max_bytes:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        try:
            return await self.app(scope, counted, send)
        except BodyTooLarge:
            return await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = (
            f'{{"detail": "request body over the limit of {self.max_bytes // 2**20} MB"}}'
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    """Raised inside :class:`BodyLimit` when a body without Content-Length grows too large."""


class KnownEvents:
    """ASGI middleware: a queue join naming an event the app does not have gets a 404 with a
    one-line reason (Gradio itself answers 500 and prints a traceback for each such request)."""

    def __init__(self, app, blocks, path: str = "/queue/join"):
        self.app, self.blocks, self.path = app, blocks, path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").endswith(self.path):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:  # the body is bounded by BodyLimit, which runs before this
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message)
            more = message.get("more_body", False)
        body = b"".join(m.get("body", b"") for m in chunks)
        try:
            index = json.loads(body).get("fn_index")
        except (ValueError, AttributeError):
            index = None  # not a JSON object: Gradio's own validation answers
        if isinstance(index, int) and not isinstance(index, bool) and index not in self.blocks.fns:
            return await _json_response(send, 404, f"this app has no event {index}")
        one = {"type": "http.request", "body": body, "more_body": False}
        return await self.app(scope, _replay([one], receive), send)


def _replay(messages: list, receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()

    return replayed


async def _json_response(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def launch_options(max_file_size: str | int, max_body_bytes: int = 80 * 2**20, blocks=None) -> dict:
    """``demo.launch`` keyword arguments of the trust boundary (app.py and the tests use them):
    the upload size limit, outputs served only from the session folders, the body limit, and
    (given the ``blocks``) a clean 404 for queue joins naming events that do not exist."""
    from starlette.middleware import Middleware

    from app.session import ROOT

    ROOT.mkdir(parents=True, exist_ok=True)
    middleware = [Middleware(BodyLimit, max_bytes=max_body_bytes)]
    if blocks is not None:
        middleware.append(Middleware(KnownEvents, blocks=blocks))
    return {
        "max_file_size": max_file_size,
        "allowed_paths": [str(ROOT)],
        "app_kwargs": {"middleware": middleware},
    }
