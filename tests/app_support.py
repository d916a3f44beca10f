"""Shared by the app tests: one app instance per test process on 127.0.0.1, and bad uploads.

The app runs the untrained ``random-tiny`` model so the tests check the app's plumbing, not
reconstruction quality, and stay fast; ``ATOKEN_TEST_MODEL`` picks another (the screenshot
script sets ``atoken-tiny``, the bundled checkpoint).
"""

from __future__ import annotations

import atexit
import io
import os
import socket
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"
MESHES = ROOT / "assets" / "meshes"
VIDEO = ROOT / "assets" / "video"
OUTPUT = ROOT / "test-output"
_APP: dict = {}


def small_limits():
    """Tight limits and a small work budget so the limit checks can be exercised cheaply."""
    from app.handlers import Limits
    from atoken.io.budget import Budget
    from atoken.pipelines.reconstruct import VideoLimits

    budget = Budget(
        max_tokens=1024,
        max_pixels=40_000_000,
        max_video_tokens=4096,
        max_frames=64,
        max_read_frames=512,
        max_faces=200_000,
        max_vertices=600_000,
    )
    video = VideoLimits(max_frames=64, max_side=640, max_duration=20.0, max_read_frames=512)
    return Limits(image_bytes=4 * 2**20, video=video, budget=budget)


def launch_app(manager):
    """The app of ``manager`` with the test limits and the trust boundary, on a free port:
    ``(url, demo)``; the caller closes the demo."""
    from app.layout import build_demo
    from app.uploads import launch_options

    demo = build_demo(manager, small_limits())
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        show_error=True,
        **launch_options("20mb", max_body_bytes=8 * 2**20, blocks=demo),
    )
    return f"http://127.0.0.1:{port}/", demo


def app_server() -> dict:
    """Start (once) and return ``{"url", "demo", "manager"}`` of the app on a free port."""
    if "url" not in _APP:
        from app.models import ModelManager

        manager = ModelManager(os.environ.get("ATOKEN_TEST_MODEL", "random-tiny"))
        url, demo = launch_app(manager)
        atexit.register(demo.close)
        _APP.update(url=url, demo=demo, manager=manager)
    from app import handlers

    handlers.configure(_APP["manager"], small_limits())  # in case a test reconfigured them
    return _APP


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- bad uploads ----------------------------------------------------------------------------


def text_as_png(folder: Path) -> Path:
    """A text file renamed .png."""
    path = folder / "notes.png"
    path.write_text("this is not an image, only some text\n" * 20)
    return path


def truncated_jpeg(folder: Path) -> Path:
    """The first half of a real JPEG."""
    buf = io.BytesIO()
    img = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    path = folder / "truncated.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def huge_png(folder: Path, side: int = 20_000) -> Path:
    """A valid 1-bit ``side`` x ``side`` PNG (all black): 400 MP in about 50 kB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path = folder / "huge.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def video_without_frames(folder: Path) -> Path:
    """An mp4 holding only an audio track."""
    import imageio_ffmpeg

    path = folder / "no_frames.mp4"
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-y",
        "-loglevel",
        "error",
        "-f",
        "lavfi",
        "-i",
        "anullsrc=r=8000:cl=mono",
        "-t",
        "0.5",
        "-c:a",
        "aac",
        str(path),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return path


def long_video(folder: Path, seconds: float = 30.0) -> Path:
    """A tiny but long (low frame rate) mp4, beyond the test limit on duration."""
    from atoken.io.media import write_video

    frames = [np.full((32, 32, 3), i * 8 % 255, np.uint8) for i in range(int(seconds))]
    return write_video(folder / "long.mp4", frames, fps=1.0)


def broken_glb(folder: Path) -> Path:
    """A .glb with a valid magic number and garbage after it."""
    path = folder / "broken.glb"
    path.write_bytes(b"glTF\x02\x00\x00\x00" + b"\x00" * 12 + b"garbage" * 10)
    return path


def thin_rod(folder: Path) -> Path:
    """A thin cylinder: about 256 occupied voxels, so a 3D reconstruction takes seconds on CPU."""
    import trimesh

    path = folder / "rod.ply"
    trimesh.creation.cylinder(radius=0.012, height=1.0, sections=8).export(path)
    return path
