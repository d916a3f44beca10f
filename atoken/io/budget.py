"""Work budgets: how many tokens, pixels, frames and faces one request may cost.

Everything here is decided from cheap header reads before any decoding or model work: the image
size from its header, the video's frame count from its container, a mesh's faces and vertices
from a streaming count. The app applies a budget to every visitor request and the command line
applies the same default (``--no-budget`` lifts it on purpose). The defaults keep one request
of the app's CPU path within about 30 s and 1.5 GB with the bundled model (1024 x 1024 image:
4096 tokens in ~4 s; 256 frames at 256 px: 4096 tokens); a GPU gets four times the tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from atoken.io.media import MAX_IMAGE_SIDE, MediaError

PATCH = 16  # pixels per token side (images and video frames)
TEMPORAL_PATCH = 4  # video frames per token


@dataclass(frozen=True)
class Budget:
    """Limits on one request's work, each checked before the expensive part starts."""

    max_tokens: int = 4096  # latent tokens of one image (1024 x 1024)
    max_pixels: int = 40_000_000  # pixels decoded from one image file
    max_video_tokens: int = 16_384  # latent tokens of one video, all chunks together
    max_frames: int = 256  # video frames given to the model
    max_read_frames: int = 2048  # video frames decoded from the file (before the stride)
    max_faces: int = 1_000_000  # mesh triangles (counted before parsing)
    max_vertices: int = 3_000_000  # 3 per face: an STL has no shared vertices

    def __post_init__(self):
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"budget {name} must be a positive int, got {value!r}")

    @classmethod
    def for_device(cls, device: str) -> Budget:
        """The default budget for a device: four times the tokens and frames on a GPU."""
        base = cls()
        if not str(device).startswith("cuda"):
            return base
        return replace(
            base,
            max_tokens=4 * base.max_tokens,
            max_video_tokens=4 * base.max_video_tokens,
            max_frames=4 * base.max_frames,
            max_read_frames=4 * base.max_read_frames,
        )


def image_header_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file from its header alone (no pixel is decoded)."""
    name = Path(path).name
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
    except FileNotFoundError as e:
        raise MediaError(f"{name}: no such file") from e
    except UnidentifiedImageError as e:
        raise MediaError(f"{name} is not an image file atoken can read") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"{name} is damaged or truncated") from e
    if orientation in (5, 6, 7, 8):  # EXIF: rotated by 90 degrees when shown
        w, h = h, w
    return w, h


def tokens_for(width: int, height: int) -> int:
    """Latent tokens of one image or one 4-frame video patch at this size."""
    return (height // PATCH) * (width // PATCH)


def scaled(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """The size after downscaling so the longer side is at most ``max_side`` (never upscale)."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    s = max_side / max(width, height)
    return max(PATCH, round(width * s)), max(PATCH, round(height * s))


def side_for_tokens(width: int, height: int, max_tokens: int) -> int:
    """The largest max side (a multiple of 16) whose downscaled image has <= ``max_tokens``."""
    side = max(width, height) // PATCH * PATCH
    # start near the answer: tokens scale with the area
    ratio = math.sqrt(max_tokens / max(1, tokens_for(width, height)))
    side = min(side, max(PATCH, int(side * ratio) // PATCH * PATCH + PATCH))
    while side > PATCH and tokens_for(*scaled(width, height, side)) > max_tokens:
        side -= PATCH
    return side


@dataclass(frozen=True)
class ImagePlan:
    """What one image request will cost, decided from the header."""

    width: int  # of the file
    height: int
    max_side: int | None  # what to pass to ``prepare_image`` (may be lower than asked)
    tokens: int
    note: str = ""  # set when "keep" was downscaled to fit the budget


def plan_image(path: str | Path, max_side: int | None, budget: Budget) -> ImagePlan:
    """Check an image file against a budget from its header; downscale "keep" to fit.

    Raises MediaError naming the limit when the file is too large to decode, or when an
    explicit ``max_side`` costs more tokens than the budget allows.
    """
    w, h = image_header_size(path)
    name = Path(path).name
    if w * h > budget.max_pixels or max(w, h) > MAX_IMAGE_SIDE:
        raise MediaError(
            f"{name} is too large: {w}x{h} = {w * h / 1e6:.1f} megapixels; the limit is "
            f"{budget.max_pixels / 1e6:.0f} megapixels and {MAX_IMAGE_SIDE} px per side"
        )
    if min(w, h) < PATCH:
        raise MediaError(f"{name} is {w}x{h}; images need at least {PATCH} px per side")
    tokens = tokens_for(*scaled(w, h, max_side))
    if tokens <= budget.max_tokens:
        return ImagePlan(w, h, max_side, tokens)
    if max_side:
        raise MediaError(
            f"a max side of {max_side} px makes {tokens} tokens from this {w}x{h} image; the "
            f"limit is {budget.max_tokens} tokens (max side "
            f"{side_for_tokens(w, h, budget.max_tokens)} px)"
        )
    side = side_for_tokens(w, h, budget.max_tokens)
    tokens = tokens_for(*scaled(w, h, side))
    note = (
        f"kept size would be {w}x{h} = {tokens_for(w, h)} tokens, over the limit of "
        f"{budget.max_tokens}: downscaled to a max side of {side} px ({tokens} tokens)"
    )
    return ImagePlan(w, h, side, tokens, note)


def check_video_budget(
    num_frames: int,
    width: int,
    height: int,
    budget: Budget,
    *,
    stride: int = 1,
    max_side: int | None = None,
    max_frames: int | None = None,
) -> int:
    """Tokens a video request will cost; MediaError naming the limit when over budget.

    ``num_frames`` is the container's real frame count (see ``probe_video``).
    """
    kept = math.ceil(num_frames / max(1, stride))
    if max_frames:
        kept = min(kept, max_frames)
    read = min(num_frames, kept * stride)
    if read > budget.max_read_frames:
        raise MediaError(
            f"the video has {num_frames} frames and {read} would be decoded; the limit is "
            f"{budget.max_read_frames} decoded frames (set max frames, or a smaller stride "
            "with fewer frames)"
        )
    if kept > budget.max_frames:
        raise MediaError(
            f"{kept} frames would go to the model; the limit is {budget.max_frames} frames "
            "(set max frames or raise the stride)"
        )
    w, h = scaled(width, height, max_side)
    tokens = math.ceil(kept / TEMPORAL_PATCH) * tokens_for(w, h)
    if tokens > budget.max_video_tokens:
        raise MediaError(
            f"{kept} frames at {w}x{h} make {tokens} tokens; the limit is "
            f"{budget.max_video_tokens} tokens per video (lower the max side or the frames)"
        )
    return tokens
