"""Raw-HTTP calls to a Gradio app, the way a hostile visitor makes them (no gradio_client).

    from tests.http_support import call, file_data, fn_index, upload
    i = fn_index(url, "reconstruct_image")
    r = call(url, i, [file_data(upload(url, "assets/examples/astronaut.png")), 128, ...])
    assert r.ok, r.error

Protocol of Gradio 6.31 (``sse_v3``): ``POST {url}gradio_api/queue/join`` with
``{"data", "fn_index", "session_hash", "event_data", "trigger_id"}`` answers
``{"event_id"}`` (or refuses: 422 with the validator's verdicts, 400, 503 queue full, 500),
then ``GET {url}gradio_api/queue/data?session_hash=...`` streams ``data: {json}`` lines:
``estimation``, ``process_starts``, ``progress``, ``log``, ``heartbeat``, then
``process_completed`` (``success``, ``output``: ``{"data": [...]}`` or ``{"error": ...}``) and
``close_stream`` once the session has no pending event. ``gr.State`` inputs still take a slot
in ``data`` (send ``None``): the server uses the session's own value.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

API = "gradio_api"


@dataclass
class Result:
    """What one queued call returned."""

    status_code: int  # of the join request
    ok: bool
    output: list | None = None  # output.data on success
    error: str | None = None  # the message shown to the visitor on failure
    events: list[dict] = field(default_factory=list)  # every SSE message, heartbeats included
    event_id: str | None = None
    detail: Any = None  # the join's JSON body when it was refused


def _base(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def config(url: str) -> dict:
    """The app's config (``GET {url}config``: components, dependencies, protocol)."""
    r = httpx.get(_base(url) + "config", timeout=30)
    r.raise_for_status()
    return r.json()


def fn_index(url: str, name: str, cfg: dict | None = None) -> int:
    """The index of the dependency whose ``api_name`` is ``name``.

    Private events are listed too: Gradio 6 names them after the handler function
    (``preview_image``, ``cleanup_session``; a second one ``preview_image_1``) and marks them
    ``"api_visibility": "private"``.
    """
    cfg = cfg or config(url)
    for i, dep in enumerate(cfg["dependencies"]):
        if dep.get("api_name") == name:
            return dep.get("id", i)
    names = [d.get("api_name") for d in cfg["dependencies"]]
    raise ValueError(f"no dependency named {name!r}; the app has {names}")


def fn_index_by_elem(url: str, elem_id: str, event: str, cfg: dict | None = None) -> int:
    """The index of the dependency triggered by ``event`` on the component ``elem_id``."""
    cfg = cfg or config(url)
    ids = [c["id"] for c in cfg["components"] if c.get("props", {}).get("elem_id") == elem_id]
    if not ids:
        raise ValueError(f"no component with elem_id {elem_id!r}")
    for i, dep in enumerate(cfg["dependencies"]):
        if [ids[0], event] in [list(t) for t in dep["targets"]]:
            return dep.get("id", i)
    raise ValueError(f"no {event!r} event on {elem_id!r} (component {ids[0]})")


def upload(url: str, path: str | Path) -> str:
    """Upload one file (``POST {url}gradio_api/upload``) and return its path on the server."""
    path = Path(path)
    with open(path, "rb") as f:
        r = httpx.post(f"{_base(url)}{API}/upload", files={"files": (path.name, f)}, timeout=60)
    r.raise_for_status()
    return r.json()[0]


def file_data(server_path: str, orig_name: str | None = None) -> dict:
    """The FileData payload the browser sends for an uploaded file."""
    return {
        "path": server_path,
        "orig_name": orig_name or Path(server_path).name,
        "meta": {"_type": "gradio.FileData"},
    }


def call(
    url: str,
    fn_index: int,
    data: list,
    *,
    session_hash: str | None = None,
    timeout: float = 60,
    event_data: Any = None,
    trigger_id: int | None = None,
) -> Result:
    """Queue one event and read its SSE stream until it completes (bounded by ``timeout``)."""
    base = _base(url)
    session_hash = session_hash or uuid.uuid4().hex[:12]
    body = {
        "data": data,
        "fn_index": fn_index,
        "session_hash": session_hash,
        "event_data": event_data,
        "trigger_id": trigger_id,
    }
    with httpx.Client(timeout=httpx.Timeout(timeout, connect=10)) as http:
        join = http.post(f"{base}{API}/queue/join", json=body)
        if join.status_code != 200:
            detail = _json_or_text(join)
            return Result(join.status_code, False, error=_refusal(detail), detail=detail)
        event_id = join.json()["event_id"]
        result = Result(join.status_code, False, event_id=event_id)
        _read_stream(http, base, session_hash, event_id, timeout, result)
    return result


def close_session(url: str, session_hash: str, timeout: float = 30) -> None:
    """Run the app's ``unload`` events for a session, as a closing browser tab does.

    Gradio fires ``demo.unload`` when the session's heartbeat stream
    (``GET {url}gradio_api/heartbeat/{session_hash}``) disconnects: open it, read the first
    ``ALIVE`` and hang up. The unload handlers run in the background just after this returns.
    A caller that never opens the heartbeat never triggers them.
    """
    with httpx.stream("GET", f"{_base(url)}{API}/heartbeat/{session_hash}", timeout=timeout) as r:
        r.raise_for_status()
        next(r.iter_lines(), None)


def _read_stream(
    http: httpx.Client, base: str, session_hash: str, event_id: str, timeout: float, out: Result
) -> None:
    """Fill ``out`` from the session's SSE stream until our event completes."""
    deadline = time.monotonic() + timeout
    params = {"session_hash": session_hash}
    try:
        with http.stream("GET", f"{base}{API}/queue/data", params=params) as r:
            if r.status_code != 200:
                out.error = f"queue/data answered {r.status_code}"
                return
            for line in r.iter_lines():
                if line.startswith("data:"):
                    msg = json.loads(line[5:])
                    out.events.append(msg)
                    if _finished(msg, event_id, out):
                        return
                if time.monotonic() > deadline:
                    out.error = f"no result within {timeout} s"
                    return
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
        return
    if out.error is None and not out.ok:
        out.error = "the stream closed without a result"


def _finished(msg: dict, event_id: str, out: Result) -> bool:
    """Record a terminal message in ``out``; True once nothing more will come for us."""
    kind = msg.get("msg")
    if kind == "process_completed" and msg.get("event_id") == event_id:
        output = msg.get("output") or {}
        out.ok = bool(msg.get("success"))
        if out.ok:
            out.output = output.get("data")
        else:
            out.error = output.get("error") or msg.get("title") or "error (no message shown)"
        return True
    if kind == "unexpected_error":
        out.error = msg.get("message") or "unexpected error"
        return True
    return kind == "close_stream"


def _json_or_text(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text


def _refusal(detail: Any) -> str:
    """A readable message from a refused join (validator verdicts, HTTP error detail)."""
    if isinstance(detail, dict):
        detail = detail.get("detail", detail)
    if isinstance(detail, list):  # validator: one verdict per input
        bad = [d for d in detail if isinstance(d, dict) and d.get("is_valid") is False]
        if bad:
            return "; ".join(f"{d.get('parameter_name')}: {d.get('message')}" for d in bad)
        fastapi = [d for d in detail if isinstance(d, dict) and "msg" in d]  # malformed body
        if fastapi:
            return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d['msg']}" for d in fastapi)
    return detail if isinstance(detail, str) else json.dumps(detail)[:2000]
