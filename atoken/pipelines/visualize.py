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


# -- latent view for the app (figures and teaching text) -------------------------------------

HOW_TO_READ = """\
**How to read the latent view**

* **PCA colours**: every 16x16 patch of the input became one latent token (a short vector of
  numbers). The three directions in which this item's tokens differ most are painted red, green
  and blue. Patches with similar colours have similar latents: the model "sees" them as alike.
  Sharp colour changes mark where the latent changes, often at object edges.
* **Channel maps**: one small grey picture per latent channel, bright = high value. Some channels
  follow brightness or colour, others edges or texture.
* **Value histograms**: how the numbers of each channel are spread. A continuous (KL) latent looks
  roughly bell-shaped around 0; a discrete (FSQ) latent only takes the four values -1, -0.5, 0, 0.5.
* **Code usage** (FSQ models): each token is 8 codes, one per group, out of 4096 possible values
  per group. Many distinct codes and a high perplexity mean the vocabulary is used richly.
* **Pooled feature**: one vector for the whole item, the attention-pooled summary that zero-shot
  classification compares with text embeddings.
"""


def value_histogram_figure(latent: Tensor, *, max_channels: int = 8, bins: int = 60):
    """Plotly histograms of the latent values: all channels together plus the first few."""
    import plotly.graph_objects as go

    x = latent.detach().float().cpu().numpy()
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"need a latent [N, L] with N > 0, got shape {x.shape}")
    fig = go.Figure()
    fig.add_trace(go.Histogram(x=x.reshape(-1), nbinsx=bins, name="all channels", opacity=0.6))
    for c in range(min(max_channels, x.shape[1])):
        fig.add_trace(
            go.Histogram(
                x=x[:, c], nbinsx=bins, name=f"channel {c}", opacity=0.5, visible="legendonly"
            )
        )
    fig.update_layout(
        barmode="overlay",
        xaxis_title="latent value",
        yaxis_title="count",
        title=f"latent values ({x.shape[0]} tokens x {x.shape[1]} channels)",
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
    )
    return fig


def code_usage(indices: Tensor, codebook_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct codes used and perplexity per FSQ group of ``indices [N, G]``."""
    idx = torch.as_tensor(indices).detach().cpu().long()
    if idx.dim() != 2 or idx.shape[0] == 0:
        raise ValueError(f"need indices [N, G] with N > 0, got {tuple(idx.shape)}")
    if int(idx.min()) < 0 or int(idx.max()) >= codebook_size:
        raise ValueError(f"indices must lie in [0, {codebook_size})")
    distinct, perplexity = [], []
    for g in range(idx.shape[1]):
        counts = torch.bincount(idx[:, g], minlength=codebook_size).double()
        p = counts[counts > 0] / counts.sum()
        distinct.append(int((counts > 0).sum()))
        perplexity.append(float(torch.exp(-(p * p.log()).sum())))
    return np.array(distinct), np.array(perplexity)


def code_usage_figure(indices: Tensor, codebook_size: int):
    """Plotly bars of the distinct FSQ codes used per group, with the perplexity."""
    import plotly.graph_objects as go

    distinct, perplexity = code_usage(indices, codebook_size)
    groups = [f"group {g}" for g in range(len(distinct))]
    fig = go.Figure(
        [
            go.Bar(x=groups, y=distinct, name="distinct codes"),
            go.Scatter(x=groups, y=perplexity, name="perplexity", mode="lines+markers"),
        ]
    )
    n = int(torch.as_tensor(indices).shape[0])
    fig.update_layout(
        title=f"FSQ code usage: {n} tokens, {codebook_size} codes per group",
        yaxis_title="codes",
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
    )
    return fig


def pooled_figure(pooled: Tensor):
    """Plotly bar chart of one item's pooled feature ``[C]`` or ``[1, C]``."""
    import plotly.graph_objects as go

    v = pooled.detach().float().cpu().reshape(-1).numpy()
    if v.size == 0:
        raise ValueError("the pooled feature is empty")
    fig = go.Figure(go.Bar(x=np.arange(v.size), y=v, marker_line_width=0))
    fig.update_layout(
        title=f"pooled feature ({v.size} dims, L2 norm {np.linalg.norm(v):.3f})",
        xaxis_title="dimension",
        yaxis_title="value",
        bargap=0,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
    )
    return fig


def pca_scatter_figure(latent: Tensor, basis: PCABasis | None = None, *, max_points: int = 4096):
    """Interactive 3D scatter of the tokens in PCA space, each dot in its PCA colour."""
    import plotly.graph_objects as go

    basis = basis or fit_pca(latent)
    x = latent.detach().float().cpu()
    if x.shape[0] > max_points:
        x = x[torch.linspace(0, x.shape[0] - 1, max_points).long()]
    proj = ((x - basis.mean) @ basis.components.T).numpy()
    rgb = latent_to_rgb(x, basis)
    colours = [f"rgb({r},{g},{b})" for r, g, b in rgb]
    ex = [f"PC{i + 1} {float(e):.0%}" for i, e in enumerate(basis.explained)]
    fig = go.Figure(
        go.Scatter3d(
            x=proj[:, 0],
            y=proj[:, 1],
            z=proj[:, 2],
            mode="markers",
            marker={"size": 3, "color": colours},
        )
    )
    fig.update_layout(
        title="tokens in PCA space (colour = PCA RGB)",
        # the camera stands back from plotly's default so the axis titles stay inside the box
        scene={
            "xaxis_title": ex[0],
            "yaxis_title": ex[1],
            "zaxis_title": ex[2],
            "camera": {"eye": {"x": 1.6, "y": 1.6, "z": 1.1}},
        },
        margin={"l": 0, "r": 0, "t": 40, "b": 0},
    )
    return fig


def note_figure(text: str, title: str = ""):
    """An empty plotly figure that says why there is nothing to plot (keeps the layout still)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_annotation(
        text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font={"size": 14}
    )
    fig.update_layout(
        title=title,
        xaxis={"visible": False},
        yaxis={"visible": False},
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
    )
    return fig


def psnr_figure(psnr_per_frame: list[float]):
    """Plotly line of per-frame PSNR (dB); infinite values (identical frames) are clipped to 100."""
    import plotly.graph_objects as go

    if not psnr_per_frame:
        raise ValueError("no frames to plot")
    y = [min(float(v), 100.0) for v in psnr_per_frame]
    fig = go.Figure(go.Scatter(x=list(range(len(y))), y=y, mode="lines+markers", name="PSNR"))
    fig.update_layout(
        title=f"per-frame PSNR (mean {np.mean(y):.2f} dB)",
        xaxis_title="frame",
        yaxis_title="PSNR (dB)",
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
    )
    return fig


_CODEC_COLOURS = {"jpeg": "#1f77b4", "webp": "#2ca02c", "avif": "#9467bd"}


def rate_distortion_figure(
    curves: dict[str, list[tuple[float, float]]],
    at_budget: dict[str, tuple[float, float]],
    tokens: dict[str, tuple[float, float]],
):
    """Plotly PSNR over bits per pixel: a line per codec, its point at the tokens' budget
    (open circle), and the tokenizer's point(s) (stars).

    Args:
        curves: ``{codec label: [(bpp, psnr dB), ...]}`` over a range of qualities (JPEG,
            WebP and AVIF get fixed colours).
        at_budget: ``{codec: (bpp, psnr)}`` of each codec at the tokens' bits.
        tokens: ``{label: (bpp, psnr)}``, e.g. the entropy estimate (filled star) and the
            stored size (open stars).
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, pts in curves.items():
        pts = sorted([*pts, *([at_budget[name]] if name in at_budget else [])])
        colour = _CODEC_COLOURS.get(name.lower())
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in pts],
                y=[min(p[1], 100.0) for p in pts],
                mode="lines+markers",
                name=name,
                line={"color": colour},
            )
        )
    for name, (bpp, db) in at_budget.items():
        fig.add_trace(
            go.Scatter(
                x=[bpp],
                y=[min(db, 100.0)],
                mode="markers",
                name=f"{name} at the tokens' bits",
                marker={
                    "size": 13,
                    "symbol": "circle-open",
                    "line": {"width": 2},
                    "color": _CODEC_COLOURS.get(name.lower()),
                },
            )
        )
    for i, (label, (bpp, db)) in enumerate(tokens.items()):
        fig.add_trace(
            go.Scatter(
                x=[bpp],
                y=[min(db, 100.0)],
                mode="markers",
                name=label,
                marker={"size": 15, "symbol": "star-open" if i else "star", "color": "#d62728"},
            )
        )
    fig.update_layout(
        title="PSNR over bits per pixel (this image)",
        xaxis_title="bits per pixel",
        yaxis_title="PSNR (dB)",
        xaxis={"type": "log"},
        legend={"orientation": "h", "y": -0.25},
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
    )
    return fig
