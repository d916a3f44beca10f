"""How many bits the tokens of an image take, for comparisons with codecs at the same size.

* FSQ (So/D, atoken-tiny-d): exact. Each token stores ``num_codebooks`` indices, i.e.
  ``num_codebooks * sum(log2(levels))`` bits (8 x 6 codes of 4 levels = 96 bits per token).
* Continuous (So/C, atoken-tiny): the stored latent is ``tokens * channels * 16`` bits in
  float16, far more than it needs. The honest budget is an entropy estimate: the latent is
  rounded to a uniform step, the largest one whose decoded image stays within
  ``max_psnr_drop`` (0.1 dB) of the unrounded decode's PSNR, and the rounded values are
  charged the code length an ideal arithmetic coder would spend under a per-channel model
  fitted to them (the better of a discretised Gaussian and Laplace per channel, each token
  independent: no spatial context), plus the model parameters as float16 and the step. This is
  an achievable rate, not a plug-in histogram entropy (which, with a few thousand samples and
  fine steps, would understate the cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from atoken.core.model import ATokenModel
from atoken.core.patchify import detokenize, to_uint8
from atoken.core.sparse import SparseTensor
from atoken.pipelines.metrics import latent_bits, psnr

MAX_PSNR_DROP = 0.1  # dB
_SIDE_BITS_PER_CHANNEL = 2 * 16 + 1  # two float16 parameters and the Gaussian/Laplace choice
_STEP_BITS = 32
_MIN_PROB = 2.0**-40
_MAX_DECODES = 6


@dataclass(frozen=True)
class TokenRate:
    """Bits of one image's tokens.

    ``bits`` is the budget to compare codecs at: exact for FSQ, the entropy estimate for a
    continuous latent. ``stored_bits``: what a token file holds (FSQ indices, or the latent in
    ``precision``). ``step`` and ``psnr_drop`` (dB, decoded at that step) describe the estimate.
    """

    kind: str  # "fsq" or "continuous"
    num_tokens: int
    pixels: int
    bits: float
    stored_bits: float
    precision: str
    entropy_bits: float | None = None
    step: float | None = None
    psnr_drop: float | None = None

    @property
    def bpp(self) -> float:
        """``bits`` per pixel."""
        return self.bits / self.pixels

    @property
    def stored_bpp(self) -> float:
        """``stored_bits`` per pixel."""
        return self.stored_bits / self.pixels

    def explanation(self) -> str:
        """One sentence saying how the bits were counted."""
        if self.kind == "fsq":
            return (
                f"{self.num_tokens} tokens x {self.bits / self.num_tokens:.0f} bits of FSQ codes "
                f"= {self.bpp:.3f} bits per pixel, exactly what the token file stores."
            )
        return (
            f"Continuous latent: {self.stored_bpp:.2f} bpp stored as {self.precision}; "
            f"rounded to a step of {self.step:.3g} (decoded PSNR {-self.psnr_drop:+.2f} dB) and "
            f"entropy-coded with a per-channel model it needs about {self.bpp:.3f} bpp, the "
            "budget the codecs get."
        )

    def to_dict(self) -> dict[str, float | int | str | None]:
        """JSON-ready fields plus bpp values."""
        return {
            "kind": self.kind,
            "num_tokens": self.num_tokens,
            "bits": self.bits,
            "bpp": self.bpp,
            "stored_bits": self.stored_bits,
            "stored_bpp": self.stored_bpp,
            "precision": self.precision,
            "entropy_bits": self.entropy_bits,
            "step": self.step,
            "psnr_drop": self.psnr_drop,
        }


def fsq_bits(num_tokens: int, levels: tuple[int, ...], num_codebooks: int) -> float:
    """``tokens * num_codebooks * sum(log2(levels))``: 96 bits per token for 8 x 4^6."""
    if num_tokens < 0 or num_codebooks < 1 or not levels or min(levels) < 2:
        raise ValueError(
            f"need tokens >= 0, codebooks >= 1 and levels >= 2, got {num_tokens}, "
            f"{num_codebooks}, {levels}"
        )
    return num_tokens * num_codebooks * sum(math.log2(level) for level in levels)


def _gaussian_cdf(x: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    return torch.special.ndtr((x - mu) / sigma)


def _laplace_cdf(x: Tensor, mu: Tensor, b: Tensor) -> Tensor:
    u = (x - mu) / b
    return torch.where(u < 0, 0.5 * torch.exp(u.clamp(max=0)), 1 - 0.5 * torch.exp(-u.clamp(min=0)))


def model_code_length(z: Tensor, step: float) -> float:
    """Bits to code ``round(z / step)`` (``z`` ``[N, C]``) under per-channel fitted models.

    Per channel: the ideal arithmetic-coding length ``-sum log2 P(bin)`` of the rounded values
    under a Gaussian (mean, std) and a Laplace (median, mean absolute deviation), both
    discretised to the step's bins; the cheaper one is charged, plus `_SIDE_BITS_PER_CHANNEL`.
    """
    if not step > 0:
        raise ValueError(f"step must be > 0, got {step}")
    zq = torch.round(z.double() / step) * step  # [N, C]
    lo, hi = zq - step / 2, zq + step / 2
    mu, sigma = zq.mean(0), zq.std(0, correction=0).clamp_min(step / 4)
    med = zq.median(0).values
    b = (zq - med).abs().mean(0).clamp_min(step / 4)

    def bin_bits(cdf, centre: Tensor, scale: Tensor) -> Tensor:  # [C]
        # the two forms are equal; the larger one avoids cancellation in either tail
        p = torch.maximum(
            cdf(hi, centre, scale) - cdf(lo, centre, scale),
            cdf(2 * centre - lo, centre, scale) - cdf(2 * centre - hi, centre, scale),
        )
        return -torch.log2(p.clamp_min(_MIN_PROB)).sum(0)

    best = torch.minimum(bin_bits(_gaussian_cdf, mu, sigma), bin_bits(_laplace_cdf, med, b))
    return float(best.sum()) + _STEP_BITS + z.shape[1] * _SIDE_BITS_PER_CHANNEL


@torch.no_grad()
def _decode_u8(model: ATokenModel, feats: Tensor, coords: Tensor) -> np.ndarray:
    rec = model.decode(SparseTensor(feats.to(model.dtype), coords))
    frames = detokenize(SparseTensor(rec.feats.float().cpu(), rec.coords.cpu()), ["image"])[0]
    return to_uint8(frames.permute(0, 2, 3, 1))[0]


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def entropy_step(
    model: ATokenModel,
    latent: SparseTensor,
    original: np.ndarray,
    reconstruction: np.ndarray,
    max_psnr_drop: float = MAX_PSNR_DROP,
) -> tuple[float, float]:
    """(step, PSNR drop in dB): a large rounding step that costs at most ``max_psnr_drop``.

    The decoded error grows about as ``step^2``: one trial decode at 5% of the latent's std
    predicts the step that spends the allowed extra error; it is checked by decoding and
    shrunk by sqrt(2) until it passes (at most `_MAX_DECODES` decodes in all).
    """
    z = latent.feats.float()
    ref_mse = _mse(original, reconstruction)
    allowed = max(ref_mse, 1e-3) * (10 ** (max_psnr_drop / 10) - 1)
    ref_psnr = psnr(original, reconstruction)

    def drop(step: float) -> tuple[float, float]:
        out = _decode_u8(model, torch.round(z / step) * step, latent.coords)
        return ref_psnr - psnr(original, out), _mse(original, out) - ref_mse

    step = 0.05 * float(z.std()) or 1e-3
    best: tuple[float, float] | None = None
    for _ in range(_MAX_DECODES):
        d, excess = drop(step)
        if d <= max_psnr_drop:
            best = (step, d) if best is None or step > best[0] else best
            if excess <= allowed / 4:  # far inside: aim at the allowance (or grow 4x)
                grow = 4.0 if excess <= 0 else min(4.0, 0.9 * math.sqrt(allowed / excess))
                step *= max(grow, 1.25)
                continue
            break
        if best is not None:
            break
        step *= min(0.9 * math.sqrt(allowed / excess), 1 / math.sqrt(2))
    if best is None:
        raise ValueError(f"no rounding step kept the PSNR within {max_psnr_drop} dB")
    return best


def token_rate(
    model: ATokenModel,
    latent: SparseTensor,
    original: np.ndarray,
    reconstruction: np.ndarray | None = None,
    *,
    fsq: bool | None = None,
    precision: str = "float16",
    max_psnr_drop: float = MAX_PSNR_DROP,
) -> TokenRate:
    """Bits of one image's tokens (see the module docstring for the two kinds).

    Args:
        latent: what the decoder saw (``ImageResult.latent``), one image.
        original: the uint8 ``[H, W, 3]`` model input (the crop); ``reconstruction`` its decode
            from ``latent`` (decoded here when None).
        fsq: count FSQ codes; default ``model.is_discrete`` (pass ``result.indices is not
            None`` when a mode other than ``auto`` chose the latent).
    """
    n = latent.feats.shape[0]
    pixels = int(original.shape[0] * original.shape[1])
    if latent.batch_size != 1:
        raise ValueError(f"token_rate takes one image's latent, got {latent.batch_size} items")
    is_fsq = model.is_discrete if fsq is None else fsq
    if is_fsq:
        cfg = model.config
        bits = fsq_bits(n, cfg.quantizer_levels, cfg.quantizer_num_codebooks)
        return TokenRate("fsq", n, pixels, bits, bits, "fsq indices")
    stored = latent_bits(n, latent.feats.shape[1], precision)
    if reconstruction is None:
        reconstruction = _decode_u8(model, latent.feats, latent.coords)
    step, d = entropy_step(model, latent, original, reconstruction, max_psnr_drop)
    entropy = model_code_length(latent.feats.float().cpu(), step)
    return TokenRate("continuous", n, pixels, entropy, stored, precision, entropy, step, d)
