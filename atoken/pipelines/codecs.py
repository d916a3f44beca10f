"""Standard image codecs (JPEG, WebP, AVIF through Pillow) at a bit budget, for comparing the
tokens with them at the same size.

`encode_at_budget` searches the codec's integer quality for the largest one whose file fits
the budget (sizes grow with quality; the search brackets and interpolates on log size, then
bisects); `rate_distortion` sweeps a few qualities for a plot; `compare_codecs` does both for
one image with a shared cache of encodings. Bits are the whole file (headers included), bpp is
bits over the image's pixels. Codecs Pillow was built without are reported by
`missing_codecs`, never silently dropped.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from atoken.pipelines.metrics import effnet_taps, perceptual_distance_from_taps, psnr, ssim

CODECS = ("jpeg", "webp", "avif")
LABELS = {"jpeg": "JPEG", "webp": "WebP", "avif": "AVIF"}  # names as people write them
# Pillow format name, quality range, fixed options. JPEG: optimised Huffman tables, 4:2:0
# (Pillow's default). WebP: method 4 (Pillow's default effort). AVIF: speed 8 of 0 (slowest) to
# 10; at 512 px speed 6 costs ~3-4x the time for ~0.1-0.3 dB.
_FORMATS: dict[str, tuple[str, int, int, dict[str, Any]]] = {
    "jpeg": ("JPEG", 1, 95, {"optimize": True}),
    "webp": ("WEBP", 0, 100, {"method": 4}),
    "avif": ("AVIF", 0, 100, {"speed": 8}),
}
_FEATURES = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}
DEFAULT_QUALITIES = (10, 30, 50, 70, 90)


def missing_codecs(codecs: Sequence[str] = CODECS) -> dict[str, str]:
    """``{codec: reason}`` for requested codecs this Pillow cannot encode (empty when all can)."""
    from PIL import __version__, features

    out = {}
    for name in codecs:
        if name not in _FORMATS:
            raise ValueError(f"unknown codec {name!r}; choose from {list(_FORMATS)}")
        if not features.check(_FEATURES[name]):
            out[name] = f"Pillow {__version__} was built without {name.upper()} support"
    return out


@dataclass
class CodecPoint:
    """One encoding: codec, quality, file bits, bpp and quality metrics of its decoded image.

    ``perceptual`` is None where it was not computed; ``fits`` says whether ``bits`` is within
    the budget asked for (False when even the lowest quality is larger).
    """

    codec: str
    quality: int
    bits: int
    bpp: float
    psnr: float
    ssim: float | None = None
    perceptual: float | None = None
    fits: bool = True
    decoded: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (the decoded image left out)."""
        keys = ("codec", "quality", "bits", "bpp", "psnr", "ssim", "perceptual", "fits")
        return {k: getattr(self, k) for k in keys}


def _check_image(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"codecs take one uint8 RGB image [H, W, 3], got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


def encode_image(image: np.ndarray, codec: str, quality: int) -> tuple[bytes, np.ndarray]:
    """The file bytes of ``image`` at ``quality`` and its decoded uint8 RGB ``[H, W, 3]``."""
    from PIL import Image

    missing = missing_codecs([codec])
    if missing:
        raise ValueError(missing[codec])
    fmt, lo, hi, options = _FORMATS[codec]
    if not lo <= int(quality) <= hi:
        raise ValueError(f"{codec} quality must be in {lo}..{hi}, got {quality}")
    buf = io.BytesIO()
    Image.fromarray(_check_image(image)).save(buf, fmt, quality=int(quality), **options)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        decoded = np.asarray(im.convert("RGB"))
    return data, decoded


class _Encoder:
    """Encodings of one image by one codec, cached by quality."""

    def __init__(self, image: np.ndarray, codec: str):
        self.image, self.codec = image, codec
        _, self.lo, self.hi, _ = _FORMATS[codec]
        self.cache: dict[int, tuple[int, np.ndarray]] = {}

    def __call__(self, quality: int) -> tuple[int, np.ndarray]:
        if quality not in self.cache:
            data, decoded = encode_image(self.image, self.codec, quality)
            self.cache[quality] = (8 * len(data), decoded)
        return self.cache[quality]

    def bits(self, quality: int) -> int:
        return self(quality)[0]

    def search(self, budget_bits: float) -> tuple[int, bool]:
        """(largest quality whose bits <= budget, True) or (lowest quality, False)."""
        fit = [q for q, (b, _) in self.cache.items() if b <= budget_bits]
        over = [q for q, (b, _) in self.cache.items() if b > budget_bits]
        lo = max(fit) if fit else None
        hi = min(over) if over else None
        if lo is None:
            if self.bits(self.lo) > budget_bits:
                return self.lo, False
            lo = self.lo
        if hi is None:
            if self.bits(self.hi) <= budget_bits:
                return self.hi, True
            hi = self.hi
        guess = True
        while hi - lo > 1:
            q = (lo + hi) // 2
            b_lo, b_hi = self.bits(lo), self.bits(hi)
            if guess and b_hi > b_lo:
                # interpolate on log bits, then probe the neighbour on the far side: a good
                # guess settles the bracket in two encodes; otherwise bisect next time
                t = (math.log(budget_bits) - math.log(b_lo)) / (math.log(b_hi) - math.log(b_lo))
                q = min(hi - 1, max(lo + 1, round(lo + t * (hi - lo))))
            width = hi - lo
            lo, hi = (q, hi) if self.bits(q) <= budget_bits else (lo, q)
            if guess and hi - lo > 1:
                r = lo + 1 if lo == q else hi - 1
                lo, hi = (r, hi) if self.bits(r) <= budget_bits else (lo, r)
            guess = not guess or hi - lo <= width // 4
        return lo, True


def _point(
    enc: _Encoder,
    quality: int,
    *,
    fits: bool = True,
    with_ssim: bool = True,
    reference_taps: list[Tensor] | None = None,
    device: str | torch.device = "cpu",
) -> CodecPoint:
    bits, decoded = enc(quality)
    image = enc.image
    perceptual = None
    if reference_taps is not None:
        taps = effnet_taps(decoded, device)
        perceptual = perceptual_distance_from_taps(reference_taps, taps)[0]
    return CodecPoint(
        codec=enc.codec,
        quality=quality,
        bits=bits,
        bpp=bits / (image.shape[0] * image.shape[1]),
        psnr=psnr(image, decoded),
        ssim=ssim(image, decoded) if with_ssim else None,
        perceptual=perceptual,
        fits=fits,
        decoded=decoded,
    )


def encode_at_budget(
    image: np.ndarray,
    codec: str,
    budget_bits: float,
    *,
    perceptual: bool = True,
    device: str | torch.device = "cpu",
) -> CodecPoint:
    """``image`` by ``codec`` at the largest quality whose file has at most ``budget_bits``.

    When even the lowest quality is larger, that encoding comes back with ``fits=False``.
    """
    if not budget_bits > 0:
        raise ValueError(f"budget_bits must be > 0, got {budget_bits}")
    enc = _Encoder(_check_image(image), codec)
    quality, fits = enc.search(float(budget_bits))
    ref = effnet_taps(enc.image, device) if perceptual else None
    return _point(enc, quality, fits=fits, reference_taps=ref, device=device)


def rate_distortion(
    image: np.ndarray,
    codecs: Sequence[str] = CODECS,
    qualities: Sequence[int] = DEFAULT_QUALITIES,
    *,
    with_ssim: bool = False,
) -> dict[str, list[CodecPoint]]:
    """``{codec: points}`` over ``qualities`` (clipped to each codec's range), by rising bpp.

    PSNR always; SSIM with ``with_ssim`` (~0.3 s per point at 512 px on one CPU thread).
    Codecs in `missing_codecs` are skipped; ask that function to say so.
    """
    img = _check_image(image)
    out = {}
    for name in codecs:
        if name in missing_codecs([name]):
            continue
        enc = _Encoder(img, name)
        qs = sorted({min(enc.hi, max(enc.lo, int(q))) for q in qualities})
        out[name] = sorted((_point(enc, q, with_ssim=with_ssim) for q in qs), key=lambda p: p.bits)
    return out


@dataclass
class CodecComparison:
    """Codecs at one bit budget and their rate-distortion curves, for one image."""

    budget_bits: float
    pixels: int
    at_budget: dict[str, CodecPoint]
    curves: dict[str, list[CodecPoint]]
    missing: dict[str, str]

    @property
    def budget_bpp(self) -> float:
        """The budget in bits per pixel."""
        return self.budget_bits / self.pixels

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{codec: {bpp, psnr, ssim, perceptual, quality, fits}}`` at the budget."""
        keys = ("bpp", "psnr", "ssim", "perceptual", "quality", "fits")
        return {n: {k: getattr(p, k) for k in keys} for n, p in self.at_budget.items()}


def compare_codecs(
    image: np.ndarray,
    budget_bits: float,
    codecs: Sequence[str] = CODECS,
    *,
    qualities: Sequence[int] | None = DEFAULT_QUALITIES,
    perceptual: bool = True,
    reference_taps: list[Tensor] | None = None,
    device: str | torch.device = "cpu",
) -> CodecComparison:
    """Each available codec at ``budget_bits`` (PSNR, SSIM, perceptual distance, bpp), plus
    PSNR-over-bpp curves at ``qualities`` (None: no curves). Encodings are shared between the
    curve and the budget search, so the curve costs little extra. ``reference_taps``:
    ``effnet_taps(image)`` when the caller has them already (saves one network pass).
    """
    img = _check_image(image)
    if not budget_bits > 0:
        raise ValueError(f"budget_bits must be > 0, got {budget_bits}")
    missing = missing_codecs(codecs)
    ref = None
    if perceptual:
        ref = reference_taps if reference_taps is not None else effnet_taps(img, device)

    def one(name: str) -> tuple[list[CodecPoint], CodecPoint]:
        enc = _Encoder(img, name)
        curve = []
        if qualities:
            qs = sorted({min(enc.hi, max(enc.lo, int(q))) for q in qualities})
            curve = sorted((_point(enc, q, with_ssim=False) for q in qs), key=lambda p: p.bits)
        quality, fits = enc.search(float(budget_bits))
        return curve, _point(enc, quality, fits=fits)

    names = [n for n in codecs if n not in missing]
    # one thread per codec: Pillow's encoders and decoders release the GIL while they work
    with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        results = dict(zip(names, pool.map(one, names)))
    at_budget = {n: point for n, (_, point) in results.items()}
    curves = {n: curve for n, (curve, _) in results.items() if qualities}
    if ref is not None and at_budget:
        # one network pass over the codecs' decodes together (cheaper than one pass each)
        points = list(at_budget.values())
        taps = effnet_taps(np.stack([p.decoded for p in points]), device)
        ref_all = [t.expand(len(points), *t.shape[1:]) for t in ref]
        for p, d in zip(points, perceptual_distance_from_taps(ref_all, taps)):
            p.perceptual = d
    return CodecComparison(
        float(budget_bits), img.shape[0] * img.shape[1], at_budget, curves, missing
    )
