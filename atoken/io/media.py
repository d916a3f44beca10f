"""Reading and writing images and videos with limits and clear errors.

Images go through Pillow (EXIF orientation applied, alpha composited on white, decompression
bombs refused); videos through the ffmpeg binary that ``imageio-ffmpeg`` ships, streamed frame
by frame so that long videos never sit in memory whole.
"""

from __future__ import annotations

import io
import logging
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from atoken.core.patchify import crop_box

log = logging.getLogger("atoken.io.media")

# The one table of file extensions (lower case) for every reader, lister and upload control.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".gif", ".avi", ".mkv", ".m4v"})
MESH_FORMATS = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")  # preferred first in a zip
MESH_EXTENSIONS = frozenset({*MESH_FORMATS, ".zip"})  # a mesh file or a zip holding one
VOXEL_EXTENSIONS = frozenset({".safetensors", ".npz"})  # packed 3D voxels (feats, coords)

MAX_IMAGE_PIXELS = 64_000_000  # refuse larger images before decoding them
MAX_IMAGE_SIDE = 16_384


class MediaError(ValueError):
    """An input file is unreadable or exceeds a limit; the message says which and why."""


def kind_of(path: str | Path) -> str:
    """ "image", "video" or "mesh" from the file extension."""
    ext = Path(path).suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    if ext in MESH_EXTENSIONS:
        return "mesh"
    raise MediaError(
        f"unsupported file type {ext!r}: images {sorted(IMAGE_EXTENSIONS)}, videos "
        f"{sorted(VIDEO_EXTENSIONS)}, meshes {sorted(MESH_EXTENSIONS)}"
    )


def _to_rgb(img: Image.Image) -> np.ndarray:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def read_image(source, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An image file, bytes, PIL image or array -> uint8 ``[H, W, 3]``."""
    if isinstance(source, np.ndarray):
        return image_array(source)
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    name = str(source) if not isinstance(source, bytes) else "<bytes>"
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as e:
        raise MediaError(f"cannot open {name}: {e.strerror or e}") from e
    with fp:
        try:
            img = Image.open(fp)
            w, h = img.size
            if w * h > max_pixels or max(w, h) > MAX_IMAGE_SIDE:
                raise MediaError(
                    f"image is {w}x{h} = {w * h / 1e6:.1f} MP; the limit is {max_pixels / 1e6:.0f} MP "
                    f"and {MAX_IMAGE_SIDE} px per side"
                )
            img.load()
        except MediaError:
            raise
        except UnidentifiedImageError as e:
            raise MediaError(f"{Path(name).name} is not an image file atoken can read") from e
        except Image.DecompressionBombError as e:  # raised by Image.open, before the size check
            raise MediaError(
                f"{Path(name).name} is too large to decode; the limit is {max_pixels / 1e6:.0f} MP"
            ) from e
        except (OSError, SyntaxError, ValueError) as e:
            raise MediaError(f"{Path(name).name} is damaged or truncated: {e}") from e
        return _to_rgb(img)


def image_array(arr: np.ndarray) -> np.ndarray:
    """Validate/convert an in-memory image to uint8 ``[H, W, 3]``."""
    a = np.asarray(arr)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise MediaError(f"expected an image [H, W, 3], got shape {a.shape}")
    if a.shape[2] == 4:
        return _to_rgb(Image.fromarray(a.astype(np.uint8), "RGBA"))
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and a.max() <= 1.0 + 1e-6:
            a = a * 255.0
        a = np.clip(np.round(a), 0, 255).astype(np.uint8)
    if a.size == 0:
        raise MediaError("the image is empty")
    return np.ascontiguousarray(a)


def resize_max_side(img: np.ndarray, max_side: int | None) -> np.ndarray:
    """Downscale (Lanczos) so the longer side is at most ``max_side``; never upscale."""
    if not max_side or max(img.shape[:2]) <= max_side:
        return img
    h, w = img.shape[:2]
    s = max_side / max(h, w)
    size = (max(16, round(w * s)), max(16, round(h * s)))
    return np.array(Image.fromarray(img).resize(size, Image.LANCZOS))


def crop_to_grid(img: np.ndarray, patch: int = 16) -> np.ndarray:
    """Official centre crop to a multiple of ``patch`` (what the model sees; `crop_box`)."""
    try:
        top, left, nh, nw = crop_box(img.shape[-3], img.shape[-2], patch)
    except ValueError as e:
        raise MediaError(str(e)) from None
    return img[..., top : top + nh, left : left + nw, :]


def prepare_image(source, *, max_side: int | None = None, min_side: int = 16) -> np.ndarray:
    """Read, optionally downscale, and crop an image to the 16-px grid: uint8 ``[H', W', 3]``."""
    img = resize_max_side(read_image(source), max_side)
    if min(img.shape[:2]) < min_side:
        raise MediaError(f"image {img.shape[1]}x{img.shape[0]} is smaller than {min_side} px")
    return crop_to_grid(img)


@dataclass
class VideoInfo:
    """What ffmpeg reports about a video."""

    width: int
    height: int
    fps: float
    num_frames: int
    duration: float
    counted: bool = False  # num_frames counted in the container, not estimated as fps x duration


NOT_A_VIDEO = "is not a video file atoken can read (damaged, truncated or an unknown format)"
MAX_COUNT_SECONDS = 20.0  # a frame-count pass slower than this refuses the file
MAX_HEADER_FPS = 1000.0  # header frame rates above this are not believed
DEFAULT_FPS = 25.0  # when neither the header nor a count gives a frame rate


def _ffmpeg_reader(path: str, size: tuple[int, int] | None = None, max_frames: int | None = None):
    """imageio-ffmpeg's raw RGB frame generator (metadata first) over the first video stream.

    ``passthrough`` hands over every decoded frame exactly once: the default for a raw pipe
    resamples to the header's constant rate, which turns a variable-rate GIF of 100 frames
    into 1084. ``max_frames`` makes ffmpeg itself stop decoding after that many frames.
    """
    import imageio_ffmpeg

    output_params = ["-map", "0:v:0", "-fps_mode", "passthrough"]
    if size is not None:
        output_params += ["-vf", f"scale={size[0]}:{size[1]}:flags=lanczos"]
    if max_frames is not None:
        output_params += ["-frames:v", str(max_frames)]
    return imageio_ffmpeg.read_frames(path, pix_fmt="rgb24", output_params=output_params)


def _read_header(path: Path) -> dict:
    """imageio-ffmpeg's metadata of a video file (size after rotation, header fps, duration)."""
    if not path.is_file():
        raise MediaError(f"video not found: {path}")
    if path.stat().st_size == 0:
        raise MediaError(f"{path.name} is empty")
    reader = _ffmpeg_reader(str(path), max_frames=1)  # ffmpeg exits sooner, not decoding on
    try:
        return next(reader)
    except (OSError, RuntimeError, StopIteration, AttributeError, IndexError) as e:
        # the last two: imageio-ffmpeg's header parser on a file without a video stream
        raise MediaError(f"{path.name} {NOT_A_VIDEO}") from e
    finally:
        reader.close()


def count_video_frames(
    path: str | Path, *, max_seconds: float = MAX_COUNT_SECONDS
) -> tuple[int, float]:
    """Frames in the first video stream and the timestamp of its last one, in seconds.

    One pass over the container's packets, copied to the null muxer without decoding (about
    20 ms for 10 s of 1080p H.264), so a header that lies about the frame rate or duration
    cannot hide frames. Each packet is one frame in mp4, mov, webm, mkv, avi and GIF; a
    damaged file can count a frame or two more than decode, never fewer. The timestamp is
    that of the last packet (a frame or two short of the end, depending on the container),
    0.0 when the stream has none.
    """
    import imageio_ffmpeg

    path = Path(path)
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path)]
    cmd += ["-map", "0:v:0", "-c", "copy", "-f", "null", "-progress", "pipe:1", "-nostats", "-"]
    try:
        run = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=max_seconds,
        )
    except subprocess.TimeoutExpired as e:  # run() has killed ffmpeg
        raise MediaError(
            f"{path.name}: counting its frames took more than {max_seconds:g} s; the limit is "
            f"{max_seconds:g} s (the video is too long or damaged)"
        ) from e
    except OSError as e:
        raise MediaError(f"{path.name}: its frames could not be counted ({e.strerror})") from e
    if run.returncode != 0:
        if "matches no streams" in run.stderr:
            raise MediaError(f"{path.name} has no video frames")
        log.info("%s: frame count failed: %s", path.name, _short(run.stderr))
        raise MediaError(f"{path.name} {NOT_A_VIDEO}")
    # -progress writes blocks of key=value lines; the last block is the final tally
    progress = dict(line.split("=", 1) for line in run.stdout.splitlines() if "=" in line)
    if not progress.get("frame", "").strip().isdigit():
        raise MediaError(f"{path.name}: its frames could not be counted")
    us = progress.get("out_time_us", "").strip()
    seconds = int(us) / 1e6 if us.lstrip("-").isdigit() and int(us) > 0 else 0.0
    return int(progress["frame"]), seconds


def _frame_rate(header_fps: float, num_frames: int, last_time: float, duration: float) -> float:
    """The header's frame rate when the counted frames agree with it, else frames / duration.

    ``last_time`` (the last frame's timestamp) should be about ``(num_frames - k) / fps``, with
    ``k`` 0 to 2 by container; a header rate that misses by more is a lie or a variable rate.
    """
    plausible = 0 < header_fps <= MAX_HEADER_FPS
    if plausible and (
        last_time <= 0 or abs(header_fps * last_time - num_frames) <= max(3, 0.05 * num_frames)
    ):
        return header_fps
    if duration > 0:
        return num_frames / duration
    return header_fps if plausible else DEFAULT_FPS


def probe_video(
    path: str | Path, *, count: bool = True, max_count_seconds: float = MAX_COUNT_SECONDS
) -> VideoInfo:
    """Size, frame rate, frame count and duration of a video.

    With ``count`` (the default) the frames are counted in one pass over the packets
    (:func:`count_video_frames`; refused after ``max_count_seconds``): use this before
    enforcing limits. ``count=False`` reads only the header and estimates fps x duration,
    which a header can get wildly wrong (a 1000 fps clip reads as 25 fps); it counts anyway
    when the header has no duration.
    """
    path = Path(path)
    meta = _read_header(path)
    w, h = meta.get("size") or (0, 0)
    if not w or not h:
        raise MediaError(f"{path.name} has no video frames")
    header_fps = float(meta.get("fps") or 0.0)
    header_duration = float(meta.get("duration") or 0.0)
    if not count and header_duration > 0:
        fps = header_fps if 0 < header_fps <= MAX_HEADER_FPS else DEFAULT_FPS
        n = max(1, round(header_duration * fps))
        return VideoInfo(int(w), int(h), fps, n, header_duration, counted=False)
    n, last_time = count_video_frames(path, max_seconds=max_count_seconds)
    if n == 0:
        raise MediaError(f"{path.name} has no video frames")
    # the header's duration can be the container's (a longer audio track); the count's is
    # the video's own: the longer one is the one limits should see
    duration = max(header_duration, last_time)
    fps = _frame_rate(header_fps, n, last_time, duration)
    return VideoInfo(int(w), int(h), fps, n, duration or n / fps, counted=True)


def _short(e: BaseException | str) -> str:
    text = str(e).strip().splitlines()
    return text[-1][:200] if text else type(e).__name__


def scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """Even (w, h) with the longer side <= max_side (None when no scaling is needed)."""
    if not max_side or max(width, height) <= max_side:
        return None
    s = max_side / max(width, height)
    return max(16, int(round(width * s / 2)) * 2), max(16, int(round(height * s / 2)) * 2)


def iter_video_frames(
    path: str | Path,
    *,
    stride: int = 1,
    max_side: int | None = None,
    max_frames: int | None = None,
    max_read: int | None = None,
) -> Iterator[np.ndarray]:
    """Stream uint8 ``[H, W, 3]`` frames (every ``stride``-th, scaled to ``max_side``).

    Stops quietly once ``max_frames`` frames are kept. ``max_read`` is a hard limit on the
    frames decoded from the file, counted before the stride and whatever the header says:
    past it the stream raises :class:`MediaError` instead (after yielding what the first
    ``max_read`` frames gave). ffmpeg is told to stop at what is needed, at most one frame
    past ``max_read`` (the one that shows the limit is exceeded), and is stopped whenever the
    iteration ends.
    """
    if stride < 1:
        raise MediaError(f"frame stride must be >= 1, got {stride}")
    if max_read is not None and max_read < 1:
        raise MediaError(f"max_read must be >= 1, got {max_read}")
    name = Path(path).name
    meta = _read_header(Path(path))
    size = scaled_size(*meta["size"], max_side)
    w, h = size or meta["size"]
    stop = None if max_read is None else max_read + 1  # one more shows the limit is passed
    if max_frames:
        needed = (max_frames - 1) * stride + 1
        stop = needed if stop is None else min(stop, needed)
    reader = _ffmpeg_reader(str(path), size, max_frames=stop)
    try:
        next(reader)  # metadata
        kept = 0
        for i, buf in enumerate(reader):
            if max_read is not None and i >= max_read:
                raise MediaError(
                    f"{name} has more than {max_read} frames; the limit is {max_read} frames "
                    "decoded per video (raise the stride or set a lower frame limit)"
                )
            if i % stride:
                continue
            frame = np.frombuffer(buf, np.uint8)
            if frame.size != w * h * 3:
                raise MediaError(f"{name}: frame {i} has an unexpected size")
            yield frame.reshape(h, w, 3)
            kept += 1
            if max_frames is not None and kept >= max_frames:
                break
    except (OSError, RuntimeError) as e:
        log.info("%s: decoding failed: %s", name, _short(e))
        raise MediaError(
            f"{name}: decoding failed partway (the file is damaged or truncated)"
        ) from e
    finally:
        reader.close()


def count_frames(path: str | Path) -> int:
    """Number of frames of a video file, counted in the file (not estimated from the header)."""
    return probe_video(path, count=True).num_frames


def read_frames(path: str | Path, start: int, count: int, stride: int = 1) -> np.ndarray:
    """Frames ``start, start + stride, ...`` (``count`` of them) -> uint8 ``[T, H, W, 3]``.

    Decoding stops after the last wanted frame, so a clip costs what it needs, not the video;
    a video too short for the clip repeats its last frame.
    """
    if count < 1 or stride < 1 or start < 0:
        raise ValueError(
            f"need count >= 1, stride >= 1, start >= 0; got {count}, {stride}, {start}"
        )
    last = start + (count - 1) * stride
    frames = [
        f
        for i, f in enumerate(iter_video_frames(path, max_frames=last + 1))
        if i >= start and (i - start) % stride == 0
    ]
    if not frames:
        raise MediaError(f"{Path(path).name}: no frames at {start}..{last}")
    while len(frames) < count:  # short videos: repeat the last frame
        frames.append(frames[-1])
    return np.stack(frames)


def read_video(path: str | Path, **kwargs) -> np.ndarray:
    """All (selected) frames as uint8 ``[T, H, W, 3]``; prefer :func:`iter_video_frames`."""
    frames = list(iter_video_frames(path, **kwargs))
    if not frames:
        raise MediaError(f"{Path(path).name} has no video frames")
    return np.stack(frames)


class VideoWriter:
    """H.264 mp4 writer (yuv420p, even sizes) fed one uint8 frame at a time."""

    def __init__(self, path: str | Path, fps: float, quality: int = 8):
        self.path = Path(path)
        self.fps = fps
        self.quality = quality
        self._gen = None
        self._size = None

    def write(self, frame: np.ndarray) -> None:
        """Append a uint8 ``[H, W, 3]`` frame (padded to even size if needed)."""
        import imageio_ffmpeg

        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        h, w = frame.shape[:2]
        if h % 2 or w % 2:
            frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self._gen is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._size = frame.shape[1], frame.shape[0]
            self._gen = imageio_ffmpeg.write_frames(
                str(self.path),
                self._size,
                fps=self.fps,
                quality=self.quality,
                macro_block_size=2,
                pix_fmt_out="yuv420p",
            )
            self._gen.send(None)
        elif (frame.shape[1], frame.shape[0]) != self._size:
            raise ValueError(f"frame size {frame.shape[1]}x{frame.shape[0]} != {self._size}")
        self._gen.send(frame)

    def close(self) -> None:
        """Finish the file."""
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str | Path, frames, fps: float) -> Path:
    """Write uint8 frames to an mp4."""
    with VideoWriter(path, fps) as w:
        for f in frames:
            w.write(f)
    return Path(path)


def write_image(path: str | Path, img: np.ndarray) -> Path:
    """Write a uint8 image (PNG unless the extension says otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(img, np.uint8)).save(path)
    return path


def side_by_side(a: np.ndarray, b: np.ndarray, gap: int = 4) -> np.ndarray:
    """Two equal-height uint8 images next to each other with a white gap."""
    h = max(a.shape[0], b.shape[0])
    pad = lambda x: np.pad(x, ((0, h - x.shape[0]), (0, 0), (0, 0)))  # noqa: E731
    sep = np.full((h, gap, 3), 255, np.uint8)
    return np.concatenate([pad(a), sep, pad(b)], axis=1)
