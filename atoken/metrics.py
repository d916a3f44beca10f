"""Evaluation metrics: PSNR, SSIM, Frechet distance (rFID-style), error heatmaps, bit budgets.

Input conventions (all metrics return Python floats and compute in float64 on the CPU):

* numpy arrays are channel-last: ``[H, W]``, ``[H, W, C]``, or ``[T, H, W, C]`` for videos;
  uint8 arrays have ``data_range`` 255 by default.
* torch tensors are channel-first: ``[H, W]``, ``[C, H, W]`` or ``[B, C, H, W]``.
* Float inputs need an explicit ``data_range``: 2.0 for ``[-1, 1]``, 1.0 for ``[0, 1]``,
  255.0 for float pixels in ``[0, 255]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ArrayLike = np.ndarray | Tensor

SSIM_WIN = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _to_double(x: ArrayLike) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.asarray(x, dtype=np.float64))
    raise ValueError(f"expected a numpy array or a torch tensor, got {type(x).__name__}")


def _np64(a: ArrayLike | Sequence[float] | float) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def _data_range(x: ArrayLike, y: ArrayLike, data_range: float | None) -> float:
    if data_range is not None:
        if not data_range > 0:
            raise ValueError(f"data_range must be > 0, got {data_range}")
        return float(data_range)
    if all(isinstance(a, np.ndarray) and a.dtype == np.uint8 for a in (x, y)) or all(
        isinstance(a, Tensor) and a.dtype == torch.uint8 for a in (x, y)
    ):
        return 255.0
    raise ValueError(
        "data_range is required for non-uint8 inputs (2.0 for [-1, 1], 1.0 for [0, 1])"
    )


def _pair(x: ArrayLike, y: ArrayLike, what: str) -> tuple[Tensor, Tensor]:
    if tuple(x.shape) != tuple(y.shape):
        raise ValueError(f"{what}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if isinstance(x, np.ndarray) != isinstance(y, np.ndarray):
        raise ValueError(f"{what}: pass two numpy arrays or two tensors, not a mix")
    return _to_double(x), _to_double(y)


def _as_bchw(t: Tensor, channel_last: bool) -> Tensor:
    """Bring an image (batch) to ``[B, C, H, W]`` following the layout conventions above."""
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t.permute(2, 0, 1)[None] if channel_last else t[None]
    if t.dim() == 4:
        return t.permute(0, 3, 1, 2) if channel_last else t
    raise ValueError(f"expected an image with 2 to 4 dimensions, got shape {tuple(t.shape)}")


# ---------------------------------------------------------------------------------------------
# PSNR and SSIM
# ---------------------------------------------------------------------------------------------


def psnr(x: ArrayLike, y: ArrayLike, data_range: float | None = None) -> float:
    """``10 log10(data_range^2 / MSE)`` over all elements; ``inf`` for identical inputs."""
    r = _data_range(x, y, data_range)
    a, b = _pair(x, y, "psnr")
    if a.numel() == 0:
        raise ValueError("psnr of empty inputs")
    mse = float((a - b).square().mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(r * r / mse)


def _gaussian_window(win: int = SSIM_WIN, sigma: float = SSIM_SIGMA) -> Tensor:
    r = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _ssim_bchw(a: Tensor, b: Tensor, data_range: float) -> Tensor:
    """Mean SSIM of each ``[B, C, H, W]`` item, averaged over channels -> ``[B]``."""
    bsz, c, h, w = a.shape
    if min(h, w) < SSIM_WIN:
        raise ValueError(f"ssim needs images of at least {SSIM_WIN}x{SSIM_WIN}, got {h}x{w}")
    g = _gaussian_window()
    kh, kw = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)

    def blur(t: Tensor) -> Tensor:  # valid separable filtering of [B*C, 1, H, W]
        return F.conv2d(F.conv2d(t, kh), kw)

    a1 = a.reshape(bsz * c, 1, h, w)
    b1 = b.reshape(bsz * c, 1, h, w)
    mu_a, mu_b = blur(a1), blur(b1)
    var_a = blur(a1 * a1) - mu_a.square()
    var_b = blur(b1 * b1) - mu_b.square()
    cov = blur(a1 * b1) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2)
    )
    return s.reshape(bsz, -1).mean(dim=1)


def ssim(x: ArrayLike, y: ArrayLike, data_range: float | None = None) -> float:
    """Mean SSIM (Wang et al. 2004): Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03.

    Equals ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=...)``: the SSIM map is taken where the window fits
    inside the image (skimage's border crop), averaged over space and channels; a batch
    returns the mean over items. Unlike Wang's MATLAB code there is no automatic downsampling.
    """
    r = _data_range(x, y, data_range)
    a, b = _pair(x, y, "ssim")
    channel_last = isinstance(x, np.ndarray)
    return float(_ssim_bchw(_as_bchw(a, channel_last), _as_bchw(b, channel_last), r).mean())


def _per_frame(metric, x: ArrayLike, y: ArrayLike, data_range: float | None, frame_axis: int):
    r = _data_range(x, y, data_range)
    if tuple(x.shape) != tuple(y.shape):
        raise ValueError(f"per-frame metric: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if not -x.ndim <= frame_axis < x.ndim:
        raise ValueError(f"frame_axis {frame_axis} out of range for shape {tuple(x.shape)}")
    n = x.shape[frame_axis]
    if isinstance(x, np.ndarray):
        return [metric(np.take(x, i, frame_axis), np.take(y, i, frame_axis), r) for i in range(n)]
    return [metric(x.select(frame_axis, i), y.select(frame_axis, i), r) for i in range(n)]


def psnr_per_frame(
    x: ArrayLike, y: ArrayLike, data_range: float | None = None, frame_axis: int = 0
) -> list[float]:
    """PSNR of each video frame (numpy ``[T, H, W, C]``, tensors ``[T, C, H, W]`` by default)."""
    return _per_frame(psnr, x, y, data_range, frame_axis)


def ssim_per_frame(
    x: ArrayLike, y: ArrayLike, data_range: float | None = None, frame_axis: int = 0
) -> list[float]:
    """SSIM of each video frame (same layouts as `psnr_per_frame`)."""
    return _per_frame(ssim, x, y, data_range, frame_axis)


# ---------------------------------------------------------------------------------------------
# Frechet distance (rFID-style; the feature extractor is the caller's choice)
# ---------------------------------------------------------------------------------------------


def feature_statistics(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of features ``[N, D]``."""
    f = _np64(feats)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_statistics needs [N, D] with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance of two Gaussians: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    ``tr((S1 S2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``), with tiny negative
    eigenvalues from round-off clipped to 0. This stays real and stable for singular
    covariances (fewer samples than dimensions), where ``scipy.linalg.sqrtm`` may not.
    """
    m1, m2 = np.atleast_1d(_np64(mu1)), np.atleast_1d(_np64(mu2))
    s1, s2 = np.atleast_2d(_np64(sigma1)), np.atleast_2d(_np64(sigma2))
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: shapes {m1.shape}, {s1.shape}, {m2.shape}, {s2.shape} do not fit "
            "mu [D] and sigma [D, D]"
        )
    if not all(np.isfinite(a).all() for a in (m1, m2, s1, s2)):
        raise ValueError("frechet_distance: inputs contain NaN or inf")
    root1 = _psd_sqrt(s1)
    inner = root1 @ s2 @ root1
    eig = np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(eig).sum())


def frechet_distance_from_features(feats1: ArrayLike, feats2: ArrayLike) -> float:
    """`frechet_distance` between the Gaussian fits of two feature sets ``[N1, D]``, ``[N2, D]``."""
    return frechet_distance(*feature_statistics(feats1), *feature_statistics(feats2))


# ---------------------------------------------------------------------------------------------
# Error heatmap for the app
# ---------------------------------------------------------------------------------------------

# Dark-to-bright anchors (black, purple, red, orange, pale yellow): luminance rises monotonically,
# so brighter always means larger error, also in greyscale.
_HEAT_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)


def _colormap(v: np.ndarray) -> np.ndarray:
    pos = np.clip(v, 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    i = np.minimum(np.floor(pos).astype(np.int64), len(_HEAT_ANCHORS) - 2)
    frac = (pos - i)[..., None]
    rgb = _HEAT_ANCHORS[i] * (1 - frac) + _HEAT_ANCHORS[i + 1] * frac
    return np.round(rgb).astype(np.uint8)


def error_heatmap(
    x: ArrayLike, y: ArrayLike, data_range: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """Per-pixel absolute error (mean over channels) as a uint8 RGB ``[H, W, 3]`` heatmap.

    Args:
        x, y: one image, numpy ``[H, W(, C)]`` or tensor ``[(C,) H, W]``.
        vmax: error (in input units) mapped to the brightest colour; defaults to a fixed
            ``data_range / 4`` so maps are comparable across images (larger errors saturate).
    """
    r = _data_range(x, y, data_range)
    a, b = _pair(x, y, "error_heatmap")
    if a.dim() not in (2, 3):
        raise ValueError(f"error_heatmap needs a single image, got shape {tuple(a.shape)}")
    err = _as_bchw((a - b).abs(), isinstance(x, np.ndarray))[0].mean(dim=0).numpy()  # [H, W]
    top = r / 4 if vmax is None else float(vmax)
    if not top > 0:
        raise ValueError(f"vmax must be > 0, got {vmax}")
    return _colormap(err / top)


# ---------------------------------------------------------------------------------------------
# Bit budgets
# ---------------------------------------------------------------------------------------------

_DTYPE_BITS = {"float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}


def input_bits(shape: Sequence[int], bits_per_value: int = 8) -> int:
    """Bits of a raw input of ``shape`` (e.g. ``(T, H, W, 3)``) at ``bits_per_value`` (uint8: 8)."""
    if not shape or min(shape) < 1 or bits_per_value < 1:
        raise ValueError(f"input_bits needs a non-empty positive shape, got {tuple(shape)}")
    return math.prod(int(s) for s in shape) * int(bits_per_value)


def latent_bits(
    num_tokens: int,
    latent_channels: int | None = None,
    dtype: str | torch.dtype = "float16",
    codebook_size: int | None = None,
    num_codebooks: int = 1,
) -> float:
    """Bits of a latent: continuous ``tokens * channels * bits(dtype)``, or discrete
    ``tokens * num_codebooks * log2(codebook_size)`` when ``codebook_size`` is given
    (So/D FSQ: 8 codebooks of 4096, i.e. 96 bits per token).
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if codebook_size is not None:
        if codebook_size < 2 or num_codebooks < 1:
            raise ValueError(
                f"need codebook_size >= 2 and num_codebooks >= 1, got {codebook_size}, "
                f"{num_codebooks}"
            )
        return num_tokens * num_codebooks * math.log2(codebook_size)
    if latent_channels is None or latent_channels < 1:
        raise ValueError("latent_channels (>= 1) is required for a continuous latent")
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_BITS:
        raise ValueError(f"unknown latent dtype {dtype!r}; choose from {list(_DTYPE_BITS)}")
    return float(num_tokens * latent_channels * _DTYPE_BITS[name])


def compression_ratio(
    input_shape: Sequence[int],
    num_tokens: int,
    latent_channels: int | None = None,
    dtype: str | torch.dtype = "float16",
    codebook_size: int | None = None,
    num_codebooks: int = 1,
    input_bits_per_value: int = 8,
) -> float:
    """Raw-input bits over latent bits (see `input_bits` and `latent_bits`)."""
    lb = latent_bits(num_tokens, latent_channels, dtype, codebook_size, num_codebooks)
    if lb <= 0:
        raise ValueError("the latent has zero bits")
    return input_bits(input_shape, input_bits_per_value) / lb
