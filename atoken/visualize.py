"""Pictures of latents: PCA of token latents to RGB, per-channel maps, token grids.

How to read a PCA image: each 16x16 patch of the input became one latent token; the three
directions along which the tokens of this item vary most are mapped to red, green and blue.
Patches with similar colours have similar latents, so regions the model "sees" as alike share a
hue, and edges between hues show where the latent changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class PCABasis:
    """A fitted 3-component PCA of latents with robust colour ranges."""

    mean: Tensor  # [L]
    components: Tensor  # [3, L]
    lo: Tensor  # [3]
    hi: Tensor  # [3]
    explained: Tensor  # [3] fraction of variance per component


def fit_pca(latent: Tensor, k: int = 3) -> PCABasis:
    """Fit the top-``k`` principal directions of ``latent [N, L]`` (k <= L, padded with zeros)."""
    x = latent.detach().float().cpu()
    mean = x.mean(0)
    xc = x - mean
    if x.shape[0] < 2:
        comps = torch.eye(x.shape[1])[:k]
        var = torch.zeros(x.shape[1])
    else:
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        comps, var = vh[:k], s**2
    if comps.shape[0] < k:
        comps = torch.cat([comps, torch.zeros(k - comps.shape[0], x.shape[1])])
    # fix the sign so that the largest-magnitude loading is positive (stable colours)
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True))).squeeze(1)
    comps = comps * torch.where(signs == 0, 1.0, signs)[:, None]
    proj = xc @ comps.T
    lo = torch.quantile(proj, 0.01, dim=0) if proj.shape[0] > 1 else proj.min(0).values
    hi = torch.quantile(proj, 0.99, dim=0) if proj.shape[0] > 1 else proj.max(0).values
    total = var.sum().clamp_min(1e-12)
    explained = torch.zeros(k)
    explained[: min(k, var.numel())] = (var[:k] / total)[: min(k, var.numel())]
    return PCABasis(mean, comps, lo, hi, explained)


def latent_to_rgb(latent: Tensor, basis: PCABasis) -> np.ndarray:
    """Latents ``[N, L]`` -> uint8 colours ``[N, 3]`` through a fitted basis."""
    proj = (latent.detach().float().cpu() - basis.mean) @ basis.components.T
    span = (basis.hi - basis.lo).clamp_min(1e-6)
    rgb = ((proj - basis.lo) / span).clamp(0, 1)
    return (rgb.numpy() * 255).round().astype(np.uint8)


def token_grid(values: np.ndarray, coords: Tensor, *, upscale: int = 16) -> np.ndarray:
    """Per-token values ``[N, C]`` laid out at their (t, x, y) -> ``[T, H*up, W*up, C]``."""
    c = coords.cpu().long()
    t, x, y = c[:, 1] - c[:, 1].min(), c[:, 2], c[:, 3]
    grid = np.zeros(
        (int(t.max()) + 1, int(x.max()) + 1, int(y.max()) + 1, values.shape[1]), dtype=values.dtype
    )
    grid[t.numpy(), x.numpy(), y.numpy()] = values
    if upscale > 1:
        grid = grid.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return grid


def pca_image(
    latent: Tensor, coords: Tensor, basis: PCABasis | None = None, upscale: int = 16
) -> np.ndarray:
    """PCA-to-RGB picture of one item's latents: uint8 ``[T, H, W, 3]`` (T latent frames)."""
    basis = basis or fit_pca(latent)
    return token_grid(latent_to_rgb(latent, basis), coords, upscale=upscale)


def channel_maps(
    latent: Tensor, coords: Tensor, channels: list[int] | None = None, upscale: int = 8
) -> np.ndarray:
    """Per-channel grey maps of the first latent frame, tiled: uint8 ``[rows*h, cols*w]``."""
    lat = latent.detach().float().cpu()
    channels = list(range(lat.shape[1])) if channels is None else channels
    vals = lat[:, channels]
    lo, hi = vals.min(0).values, vals.max(0).values
    norm = ((vals - lo) / (hi - lo).clamp_min(1e-6) * 255).round().to(torch.uint8).numpy()
    grid = token_grid(norm, coords, upscale=upscale)[0]  # [h, w, C]
    cols = int(np.ceil(np.sqrt(len(channels))))
    rows = int(np.ceil(len(channels) / cols))
    h, w = grid.shape[:2]
    out = np.full((rows * (h + 2), cols * (w + 2)), 255, np.uint8)
    for i in range(len(channels)):
        r, q = divmod(i, cols)
        out[r * (h + 2) : r * (h + 2) + h, q * (w + 2) : q * (w + 2) + w] = grid[:, :, i]
    return out
