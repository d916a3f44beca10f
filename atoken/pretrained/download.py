"""Fetch the official AToken weights into a local cache, resumably and atomically.

Apple published five checkpoints under a research-only licence. Their URLs follow Apple's CDN
pattern ``https://ml-site.cdn-apple.com/models/atoken/<file>`` as given in the official README;
we could not reach it from our machines, so that base URL is **unverified**. Override it with the
``ATOKEN_BASE_URL`` environment variable or per call with ``download(..., url=...)``.

Files land in :func:`cache_dir` (``$ATOKEN_HOME``, else ``$XDG_CACHE_HOME/atoken``, else
``~/.cache/atoken``). A download streams into ``<file>.part``, resumes it with an HTTP Range
request, checks size and optional sha256, and only then renames it to ``<file>``; a lock file
keeps two processes from writing the same file. Nothing here unpickles anything: loading is
``atoken.core.checkpoint``'s job.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from atoken.pretrained.registry import MODELS

__all__ = [
    "DEFAULT_BASE_URL",
    "OFFICIAL_WEIGHTS",
    "DownloadError",
    "IntegrityError",
    "WeightsInfo",
    "cache_dir",
    "cached_path",
    "download",
    "weights_url",
]

log = logging.getLogger(__name__)

# From the official README; unverified from here (no internet access on our machines).
DEFAULT_BASE_URL = "https://ml-site.cdn-apple.com/models/atoken/"

# A lock not touched for this long is considered abandoned (the owner refreshes it while it
# streams, so this bounds how long a crashed download blocks the next one).
LOCK_STALE_S = 120.0
_LOCK_HEARTBEAT_S = 5.0
_LOCK_POLL_S = 0.1


class WeightsInfo(NamedTuple):
    """One official checkpoint: file name, config preset, licence, optional size / sha256."""

    filename: str
    preset: str
    licence: str
    size: int | None = None
    sha256: str | None = None


# The official files, from the model table (sizes and hashes are filled in there once known).
OFFICIAL_WEIGHTS: dict[str, WeightsInfo] = {
    s.name: WeightsInfo(s.file, s.preset, s.licence, s.size, s.sha256)
    for s in MODELS.values()
    if s.source == "official"
}


class DownloadError(RuntimeError):
    """A download failed (offline, HTTP error, interrupted); the message says how to recover."""


class IntegrityError(DownloadError):
    """The downloaded bytes do not match the expected size or sha256."""


def cache_dir() -> Path:
    """Weights folder: `$ATOKEN_HOME`, else `$XDG_CACHE_HOME/atoken`, else `~/.cache/atoken`."""
    home = os.environ.get("ATOKEN_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "atoken"
    return Path.home() / ".cache" / "atoken"


def weights_url(name: str) -> str:
    """URL of an official checkpoint: ``$ATOKEN_BASE_URL`` (or the unverified CDN) + file name."""
    info = _official(name)
    base = os.environ.get("ATOKEN_BASE_URL") or DEFAULT_BASE_URL
    return base.rstrip("/") + "/" + urllib.parse.quote(info.filename)


def cached_path(name: str) -> Path | None:
    """The complete cached file of an official checkpoint, or None if it is not there yet."""
    info = _official(name)
    path = cache_dir() / info.filename
    if not path.is_file():
        return None
    if info.size is not None and path.stat().st_size != info.size:
        return None
    return path


def download(
    name_or_url: str,
    *,
    dest: str | os.PathLike[str] | None = None,
    url: str | None = None,
    expected_size: int | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 30,
    chunk_size: int = 1 << 20,
    callback: Callable[[int, int | None], None] | None = None,
    retries: int = 2,
    force: bool = False,
) -> Path:
    """Download an official checkpoint (by name) or any http(s) URL and return its local path.

    Args:
        name_or_url: a key of ``OFFICIAL_WEIGHTS`` (or its file name), or an http(s) URL.
        dest: target file, or an existing folder to put it in; default ``cache_dir()/<file>``.
        url: source URL overriding ``ATOKEN_BASE_URL`` for an official name.
        expected_size: size in bytes to insist on (official entries supply theirs when known).
        sha256: hex digest to insist on; on mismatch the file is deleted.
        progress: show a tqdm bar on stderr.
        timeout: seconds to wait for the connection or for the next bytes.
        chunk_size: bytes per read.
        callback: called as ``callback(done_bytes, total_bytes)`` while streaming;
            ``total_bytes`` is None when the server does not say.
        retries: how many times to resume within this call when the connection drops mid-file.
        force: download even when the destination file already exists.

    Returns:
        Path of the complete file. An existing file that passes the size / sha256 checks is
        returned without touching the network.

    Raises:
        ValueError: unknown name, bad URL or bad argument.
        DownloadError: offline, HTTP error, or interrupted (the ``.part`` file is kept, so
            calling again resumes).
        IntegrityError: size or sha256 mismatch (the ``.part`` file is deleted).
    """
    src, filename, expected_size, sha256 = _resolve(name_or_url, url, expected_size, sha256)
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0 bytes, got {chunk_size}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")

    final = _destination(dest, filename)
    if not force and _is_good(final, expected_size, sha256):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")

    with _file_lock(final.with_name(final.name + ".lock")) as heartbeat:
        # Another process may have finished the file while we waited for the lock.
        if not force and _is_good(final, expected_size, sha256):
            return final
        if expected_size is not None and part.exists() and part.stat().st_size > expected_size:
            part.unlink()

        attempt = 0
        while True:
            total, error = _fetch(
                src,
                part,
                final,
                expected_size=expected_size,
                timeout=timeout,
                chunk_size=chunk_size,
                progress=progress,
                callback=callback,
                heartbeat=heartbeat,
            )
            size = part.stat().st_size
            if total is not None and size > total:
                part.unlink()
                raise IntegrityError(
                    f"{src} sent {size} bytes but announced {total}; deleted {part}."
                    + _manual_hint(final)
                )
            if error is None and (total is None or size == total):
                break
            done = f"{size} of {total}" if total is not None else f"{size}"
            if attempt < retries:
                attempt += 1
                log.warning(
                    "download of %s interrupted at %s bytes (%s); resuming, try %d/%d",
                    src,
                    done,
                    error or "connection closed early",
                    attempt,
                    retries,
                )
                time.sleep(0.2 * attempt)
                continue
            raise DownloadError(
                f"download of {src} interrupted at {done} bytes "
                f"({error or 'connection closed early'}); the partial file {part} is kept, "
                "so running the same command again resumes it." + _manual_hint(final)
            )

        size = part.stat().st_size
        if expected_size is not None and size != expected_size:
            part.unlink()
            raise IntegrityError(
                f"{src} gave {size} bytes but {expected_size} were expected; deleted {part}."
                + _manual_hint(final)
            )
        if sha256 is not None:
            digest = _sha256_of(part)
            if digest != sha256:
                part.unlink()
                raise IntegrityError(
                    f"sha256 of {src} is {digest} but {sha256} was expected; deleted {part}."
                    + _manual_hint(final)
                )
        os.replace(part, final)
    log.info("downloaded %s to %s", src, final)
    return final


def _official(name: str) -> WeightsInfo:
    """Look up an official checkpoint by key or file name."""
    if name in OFFICIAL_WEIGHTS:
        return OFFICIAL_WEIGHTS[name]
    for info in OFFICIAL_WEIGHTS.values():
        if name == info.filename:
            return info
    raise ValueError(
        f"unknown AToken weights {name!r}; expected one of {sorted(OFFICIAL_WEIGHTS)} "
        "(or their file names) or an http(s) URL"
    )


def _check_url(url: str) -> str:
    """Reject anything but an absolute http(s) URL with a host."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"expected an http(s) URL with a host, got {url!r}")
    return url


def _resolve(
    name_or_url: str, url: str | None, expected_size: int | None, sha256: str | None
) -> tuple[str, str, int | None, str | None]:
    """Turn the arguments into (url, file name, expected size, lower-case sha256)."""
    if "://" in name_or_url:
        if url is not None:
            raise ValueError(f"got a URL twice: {name_or_url!r} and url={url!r}; pass one")
        src = _check_url(name_or_url)
        filename = urllib.parse.unquote(Path(urllib.parse.urlparse(src).path).name)
        if not filename:
            raise ValueError(f"cannot take a file name from URL {src!r}; pass dest=<file>")
    else:
        info = _official(name_or_url)
        src = _check_url(url) if url is not None else weights_url(name_or_url)
        filename = info.filename
        expected_size = info.size if expected_size is None else expected_size
        sha256 = info.sha256 if sha256 is None else sha256
    if expected_size is not None and expected_size < 0:
        raise ValueError(f"expected_size must be >= 0 bytes, got {expected_size}")
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return src, filename, expected_size, sha256


def _destination(dest: str | os.PathLike[str] | None, filename: str) -> Path:
    """Final file path: the cache by default, inside ``dest`` if it is a folder, else ``dest``."""
    if dest is None:
        return cache_dir() / filename
    path = Path(dest).expanduser()
    return path / filename if path.is_dir() else path


def _is_good(path: Path, expected_size: int | None, sha256: str | None) -> bool:
    """Whether ``path`` exists and passes the size and sha256 checks that are known."""
    if not path.is_file():
        return False
    if expected_size is not None and path.stat().st_size != expected_size:
        log.warning("%s has the wrong size; downloading it again", path)
        return False
    if sha256 is not None and _sha256_of(path) != sha256:
        log.warning("%s has the wrong sha256; downloading it again", path)
        return False
    return True


def _sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _manual_hint(final: Path) -> str:
    """The recovery advice appended to every error message."""
    return (
        f"\nCache dir: {final.parent} (set ATOKEN_HOME to use another folder)."
        f"\nTo install the file by hand, download it on a machine with internet access and copy "
        f"it to {final}, or pass its path directly with --weights /path/to/{final.name}. "
        "A mirror can be used with ATOKEN_BASE_URL=<base url> or download(..., url=<url>)."
    )


def _content_range_total(value: str | None) -> tuple[int | None, int | None]:
    """Parse ``bytes a-b/total`` or ``bytes */total`` into (a, total); None where absent."""
    if not value:
        return None, None
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value)
    if m is None:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _fetch(
    url: str,
    part: Path,
    final: Path,
    *,
    expected_size: int | None,
    timeout: float,
    chunk_size: int,
    progress: bool,
    callback: Callable[[int, int | None], None] | None,
    heartbeat: Callable[[], None],
) -> tuple[int | None, str | None]:
    """One request that appends to (206) or rewrites (200) ``part``.

    Returns (total size or None, error text if the body stopped early, else None). Raises
    DownloadError when no usable response arrives, so nothing is retried for that.
    """
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "atoken-download/0.1", "Accept-Encoding": "identity"}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        with e:
            if e.code == 416 and start > 0:
                # The part covers the whole file already (crash before the rename), or the
                # remote file shrank: finish or start over.
                _, total = _content_range_total(e.headers.get("Content-Range"))
                if total == start:
                    if callback is not None:
                        callback(start, total)
                    return total, None
                log.warning("server refused to resume %s at byte %d; restarting", url, start)
                part.unlink()
                return _fetch(
                    url,
                    part,
                    final,
                    expected_size=expected_size,
                    timeout=timeout,
                    chunk_size=chunk_size,
                    progress=progress,
                    callback=callback,
                    heartbeat=heartbeat,
                )
            raise DownloadError(
                f"could not download {url}: HTTP {e.code} {e.reason}." + _manual_hint(final)
            ) from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(
            f"could not download {url}: {reason} (offline, DNS failure or server down?)."
            + _manual_hint(final)
        ) from e

    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.strip().isdigit() else None
        if status == 206:
            range_start, total = _content_range_total(response.headers.get("Content-Range"))
            if range_start != start:
                if start == 0:
                    raise DownloadError(
                        f"could not download {url}: the server sent a partial response "
                        f"(Content-Range start {range_start}) to a plain request."
                        + _manual_hint(final)
                    )
                # A range we did not ask for: drop what we have and ask for everything.
                log.warning("server answered %s with range start %s", url, range_start)
                response.close()
                if part.exists():
                    part.unlink()
                return _fetch(
                    url,
                    part,
                    final,
                    expected_size=expected_size,
                    timeout=timeout,
                    chunk_size=chunk_size,
                    progress=progress,
                    callback=callback,
                    heartbeat=heartbeat,
                )
            mode = "ab"
        elif status == 200:
            if start > 0:
                log.warning("server ignored the Range request for %s; restarting", url)
            start, total, mode = 0, length, "wb"
        else:
            raise DownloadError(
                f"could not download {url}: unexpected HTTP status {status}." + _manual_hint(final)
            )
        if expected_size is not None and total is not None and total != expected_size:
            if part.exists():
                part.unlink()
            raise IntegrityError(
                f"{url} announces {total} bytes but {expected_size} were expected; nothing kept."
                + _manual_hint(final)
            )

        done, error = start, None
        if callback is not None:
            callback(done, total)
        bar = tqdm(
            total=total,
            initial=start,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=final.name,
            disable=not progress,
        )
        with bar, open(part, mode) as f:
            while True:
                try:
                    chunk = response.read1(chunk_size)
                except (OSError, http.client.HTTPException) as e:
                    error = f"{type(e).__name__}: {e}"
                    break
                if not chunk:
                    break
                f.write(chunk)
                done += len(chunk)
                bar.update(len(chunk))
                heartbeat()
                if callback is not None:
                    callback(done, total)
    return total, error


def _lock_is_stale(lock: Path) -> bool:
    """A lock is stale when untouched for LOCK_STALE_S, or its owner on this host is gone."""
    try:
        age = time.time() - lock.stat().st_mtime
        owner = lock.read_text().split()
    except (FileNotFoundError, OSError):
        return False
    if age > LOCK_STALE_S:
        return True
    if os.name == "posix" and len(owner) == 2 and owner[1] == socket.gethostname():
        try:
            os.kill(int(owner[0]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
    return False


@contextlib.contextmanager
def _file_lock(lock: Path) -> Iterator[Callable[[], None]]:
    """Hold ``lock`` (created with O_EXCL) and yield a heartbeat that keeps it fresh."""
    waited = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _lock_is_stale(lock):
                # Two waiters could both judge it stale; the window is tiny and the worst case
                # is two writers, which the size / hash checks then catch.
                log.warning("removing stale download lock %s", lock)
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            if not waited:
                log.info("waiting for another download holding %s", lock)
                waited = True
            time.sleep(_LOCK_POLL_S)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        break

    last = time.monotonic()

    def heartbeat() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= _LOCK_HEARTBEAT_S:
            with contextlib.suppress(OSError):
                os.utime(lock)
            last = now

    try:
        yield heartbeat
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
