"""Evaluation metrics: PSNR, SSIM, EfficientNet-Lite0 perceptual and Frechet distances, error
heatmaps, bit budgets.

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

from atoken.pipelines.effnet import load_effnet, preprocess

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


# Up to this side the separable Gaussian runs as two banded float64 matrix products (4-5x
# faster than conv2d on CPU, same values to 1e-13); beyond it their O(n) cost per pixel loses.
_BANDED_MAX_SIDE = 1024


def _valid_filter_matrix(n: int, g: Tensor) -> Tensor:
    """``[n - len(g) + 1, n]`` band matrix M with ``(M @ v)[i] = sum_k g[k] v[i + k]``."""
    rows = torch.arange(n - g.numel() + 1)
    m = torch.zeros(rows.numel(), n, dtype=g.dtype)
    for k in range(g.numel()):
        m[rows, rows + k] = g[k]
    return m


def _ssim_bchw(a: Tensor, b: Tensor, data_range: float) -> Tensor:
    """Mean SSIM of each ``[B, C, H, W]`` item, averaged over channels -> ``[B]``."""
    bsz, c, h, w = a.shape
    if min(h, w) < SSIM_WIN:
        raise ValueError(f"ssim needs images of at least {SSIM_WIN}x{SSIM_WIN}, got {h}x{w}")
    g = _gaussian_window()
    if max(h, w) <= _BANDED_MAX_SIDE:
        mv, mh = _valid_filter_matrix(h, g), _valid_filter_matrix(w, g).T

        def blur(t: Tensor) -> Tensor:  # valid separable filtering of [B*C, H, W]
            return mv @ t @ mh

        a1, b1 = a.reshape(bsz * c, h, w), b.reshape(bsz * c, h, w)
    else:
        kh, kw = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)

        def blur(t: Tensor) -> Tensor:  # valid separable filtering of [B*C, 1, H, W]
            return F.conv2d(F.conv2d(t, kh), kw)

        a1, b1 = a.reshape(bsz * c, 1, h, w), b.reshape(bsz * c, 1, h, w)
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
# Frechet distance of Gaussian fits (the features are the caller's choice)
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
# Distances on EfficientNet-Lite0 features (atoken.pipelines.effnet; ImageNet-trained)
# ---------------------------------------------------------------------------------------------

# Last block of the stages at strides 2, 4, 8, 16 and 32 (16, 24, 40, 112, 320 channels).
PERCEPTUAL_TAPS = (0, 2, 4, 10, 15)
# Block whose spatial positions the Frechet distance fits: stride 16, 112 channels.
FRECHET_TAP = 10
MIN_SIDE = 32  # the stride-32 layer needs at least one position
_FRAME_CHUNK = 4


def _frames_u8(x: ArrayLike) -> np.ndarray | Tensor:
    """uint8 frames ``[T, H, W, 3]`` of an image or video (numpy channel-last, tensors
    channel-first as in the module conventions)."""
    if isinstance(x, Tensor):
        if x.dtype != torch.uint8 or x.dim() not in (3, 4) or x.shape[-3] != 3:
            raise ValueError(
                f"expected a uint8 tensor [3, H, W] or [T, 3, H, W], got {x.dtype} {tuple(x.shape)}"
            )
        t = x.detach().cpu()
        return (t[None] if t.dim() == 3 else t).permute(0, 2, 3, 1)
    a = np.asarray(x)
    if a.dtype != np.uint8 or a.ndim not in (3, 4) or a.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB [H, W, 3] or [T, H, W, 3], got {a.dtype} {a.shape}")
    return a[None] if a.ndim == 3 else a


@torch.no_grad()
def effnet_taps(x: ArrayLike, device: torch.device | str = "cpu") -> list[Tensor]:
    """EfficientNet-Lite0 features of every frame at `PERCEPTUAL_TAPS`: float32 CPU tensors
    ``[T, C_l, H_l, W_l]``, one per tap (the network runs at the input's own resolution)."""
    frames = _frames_u8(x)
    if min(frames.shape[1:3]) < MIN_SIDE:
        raise ValueError(
            f"perceptual metrics need images of at least {MIN_SIDE}x{MIN_SIDE}, got "
            f"{frames.shape[2]}x{frames.shape[1]}"
        )
    net = load_effnet(device)
    chunks = [
        net.features(preprocess(frames[i : i + _FRAME_CHUNK], device), PERCEPTUAL_TAPS)
        for i in range(0, frames.shape[0], _FRAME_CHUNK)
    ]
    return [torch.cat([c[j] for c in chunks]).float().cpu() for j in range(len(PERCEPTUAL_TAPS))]


def _unit_channels(f: Tensor) -> Tensor:
    return f / (f.double().square().sum(dim=1, keepdim=True).sqrt().float() + 1e-10)


def perceptual_distance_from_taps(taps_x: list[Tensor], taps_y: list[Tensor]) -> list[float]:
    """Per-frame `perceptual_distance` of two `effnet_taps` results."""
    if len(taps_x) != len(taps_y) or any(a.shape != b.shape for a, b in zip(taps_x, taps_y)):
        raise ValueError("perceptual distance: the two feature sets differ in shape")
    per_layer = [
        (_unit_channels(a) - _unit_channels(b)).double().square().sum(dim=1).mean(dim=(1, 2))
        for a, b in zip(taps_x, taps_y)
    ]
    return torch.stack(per_layer).mean(dim=0).tolist()


def perceptual_distance_per_frame(
    x: ArrayLike, y: ArrayLike, device: torch.device | str = "cpu"
) -> list[float]:
    """`perceptual_distance` of each frame of two uint8 videos (or one image: one value)."""
    if tuple(x.shape) != tuple(y.shape):
        raise ValueError(
            f"perceptual distance: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}"
        )
    return perceptual_distance_from_taps(effnet_taps(x, device), effnet_taps(y, device))


def perceptual_distance(x: ArrayLike, y: ArrayLike, device: torch.device | str = "cpu") -> float:
    """EfficientNet-Lite0 feature distance of two uint8 RGB images (LPIPS-style, unweighted).

    At each of the five `PERCEPTUAL_TAPS` (the last block of the stride-2, 4, 8, 16 and 32
    stages), each position's channel vector is scaled to unit length, the squared Euclidean
    distance between the two images' vectors is averaged over positions, and the five layer
    values are averaged. Every layer term lies in [0, 4] (``2 - 2 cos``), so the distance does
    too; 0 means identical features. Unlike LPIPS there are no learned per-channel weights
    (none ship offline), so values are not comparable with published LPIPS numbers. Videos
    ``[T, H, W, 3]`` give the mean over frames.
    """
    return float(np.mean(perceptual_distance_per_frame(x, y, device)))


def frechet_positions(taps: list[Tensor]) -> Tensor:
    """The `FRECHET_TAP` features of `effnet_taps` as samples: ``[T * H_l * W_l, 112]``."""
    f = taps[PERCEPTUAL_TAPS.index(FRECHET_TAP)]
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])


def frechet_feature_distance(
    xs: Sequence[ArrayLike], ys: Sequence[ArrayLike], device: torch.device | str = "cpu"
) -> float:
    """Frechet distance between EfficientNet-Lite0 feature positions of two image sets.

    Each image (or video frame) contributes every spatial position of block `FRECHET_TAP`
    (stride 16, 112 channels) as one sample, so a single 512x512 image already gives 1024
    samples for a 112-dimensional Gaussian fit: the distance compares the distributions of
    local image statistics (texture, edges, colour), not of whole-image classes as FID does,
    and it is meaningful for a handful of images. It is not an rFID: the network, layer and
    sample unit all differ. Units: squared activations of that layer; 0 for identical sets.
    """
    if len(xs) == 0 or len(ys) == 0:
        raise ValueError("frechet_feature_distance needs at least one image on each side")
    fa = torch.cat([frechet_positions(effnet_taps(x, device)) for x in xs])
    fb = torch.cat([frechet_positions(effnet_taps(y, device)) for y in ys])
    return max(0.0, frechet_distance_from_features(fa, fb))  # round-off can dip below 0


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
