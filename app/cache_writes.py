"""Gradio writes images it converts from arrays (``gr.Image``, ``gr.Gallery``, ``gr.ImageSlider``
outputs) and bytes (video, audio) into its cache under a folder named by the content's hash, by
truncating and rewriting the file in place. Two visitors who get the same picture (the same
example reconstructed by the same model) share that path: while one of them is downloading it,
the other's rewrite truncates it, and the download fails ("Too little data for declared
Content-Length", seen under the load benchmark). The folder name is the content's hash, so a file
that is already there holds exactly these bytes: it is only touched (``delete_cache`` ages by
time); a new file is written under a temporary name and renamed into place, so a reader never
sees it part-written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gradio import processing_utils as pu


def write_once(path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` unless the same number of bytes is already there (the caller
    names the folder by the content's hash), never exposing a partly written file."""
    try:
        if path.stat().st_size == len(data):
            os.utime(path)
            return
    except FileNotFoundError:
        pass
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def save_pil_to_cache(img, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    data = pu.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / pu.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    path = (folder / f"{name}.{format}").resolve()
    write_once(path, data)
    return str(path)


def save_bytes_to_cache(data: bytes, file_name: str, cache_dir: str) -> str:
    folder = Path(cache_dir) / pu.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    if not Path(file_name).suffix:
        file_name += pu.detect_audio_format(data)
    path = (folder / Path(file_name).name).resolve()
    write_once(path, data)
    return str(path)


def install() -> None:
    """Route Gradio's cache writes through :func:`write_once` (idempotent). Gradio's own callers,
    including ``save_img_array_to_cache``, look these up on the module at call time."""
    pu.save_pil_to_cache = save_pil_to_cache
    pu.save_bytes_to_cache = save_bytes_to_cache
