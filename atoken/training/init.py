"""Building a stage's model: configs, weight init recipes (PCA, FSQ rotation, temporal
mixing), and weight transfer from the previous stage's checkpoint."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from atoken.core import checkpoint as _ckpt
from atoken.core.checkpoint import read_checkpoint
from atoken.core.config import ATokenConfig, TrunkConfig, resolve_config
from atoken.core.model import ATokenModel
from atoken.core.patchify import VOXEL_CHANNELS
from atoken.training import data as data_mod
from atoken.training.config import TrainConfig


def model_config(
    spec: str | Path | Mapping[str, Any] | ATokenConfig, overrides: Mapping[str, Any] | None = None
) -> ATokenConfig:
    """An `ATokenConfig` from a preset / YAML / dict, with top-level or trunk overrides."""
    if isinstance(spec, Mapping):
        cfg = ATokenConfig.from_dict(dict(spec))
    else:
        cfg = resolve_config(spec)
        if not isinstance(cfg, ATokenConfig):
            raise ValueError(f"{spec!r} is not an autoencoder config")
    if overrides:
        kw: dict[str, Any] = {}
        for key, value in overrides.items():
            if key in ("encoder", "decoder"):
                kw[key] = (
                    replace(getattr(cfg, key), **dict(value))
                    if isinstance(value, Mapping)
                    else TrunkConfig(**value)
                )
            elif key in ("patch_size", "quantizer_levels"):
                kw[key] = tuple(value)
            else:
                kw[key] = value
        cfg = replace(cfg, **kw)
    return cfg


@torch.no_grad()
def init_weights(model: ATokenModel, seed: int = 0) -> None:
    """ViT-style initialisation (the modules' defaults suit inference, not training).

    Linear weights truncated-normal(0.02), biases 0, residual output projections scaled by
    ``1 / sqrt(2 * depth)``, position tables and the pooling probe normal(0.02), norms 1.
    """
    gen = torch.Generator().manual_seed(int(seed))

    def normal_(t: Tensor, std: float) -> None:
        t.copy_((torch.randn(t.shape, generator=gen) * std).clamp_(-2 * std, 2 * std).to(t))

    for name, p in model.named_parameters():
        if name.endswith("position_embedding.weight") or name.endswith("probe") or p.dim() >= 2:
            normal_(p, 0.02)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)
    for trunk in (model.encoder, model.decoder):
        scale = 1.0 / math.sqrt(2 * max(1, len(trunk.blocks)))
        for block in trunk.blocks:
            block.attn.to_out.weight.mul_(scale)
            block.mlp.mlp[2].weight.mul_(scale)


def patch_pca(patches: Tensor, components: int) -> tuple[Tensor, Tensor]:
    """Mean ``[768]`` and the top principal directions ``[components, 768]`` of ``[M, 768]``."""
    if patches.dim() != 2 or patches.shape[0] < components:
        raise ValueError(
            f"patch_pca needs [M, D] with M >= {components} patches, got {tuple(patches.shape)}"
        )
    x = patches.double()
    mu = x.mean(0)
    _, _, vt = torch.linalg.svd(x - mu, full_matrices=False)
    return mu.float(), vt[:components].float()


def _alternating(n: int) -> Tensor:
    return torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(n)])


@torch.no_grad()
def pca_init(
    model: ATokenModel, mean: Tensor, basis: Tensor, constant: float = 10.0, logvar: float = -10.0
) -> None:
    """Start the autoencoder as per-patch PCA of frame 0 (a data-dependent initialisation).

    The encoder's input layer writes the ``L`` PCA coefficients of the first frame's patch into
    channels ``0..L-1`` and a constant +-``constant`` pattern into the others (its bias); that
    pattern dominates the LayerNorm statistics, so the final LayerNorm and ``proj`` pass the
    coefficients through almost linearly (relative error ~ |a|^2 / (C K^2), ~1e-3). The
    decoder mirrors it: identity input layer, the constant pattern in its position table (a
    constant table stays constant when resized), and an output layer holding the PCA basis and
    mean for every frame. Residual branches start at zero, so every block is the identity
    until trained; `init_weights` should run first for the remaining parameters.
    """
    latent = model.config.latent_channels
    enc_c, dec_c = model.config.encoder.channels, model.config.decoder.channels
    pix = VOXEL_CHANNELS
    if basis.shape != (latent, pix) or mean.shape != (pix,):
        raise ValueError(
            f"pca_init needs mean [{pix}] and basis [{latent}, {pix}], got {tuple(mean.shape)} and "
            f"{tuple(basis.shape)}"
        )
    if min(enc_c, dec_c) < latent + 2:
        raise ValueError(
            f"pca_init needs trunk widths > latent + 1 ({latent + 1}), got {enc_c}/{dec_c}"
        )
    frames = model.config.in_channels // pix
    # Encoder: coefficients in channels [0, L), constant pattern elsewhere.
    enc = model.encoder
    s = _alternating(enc_c - latent)
    w, b = enc.input_layer.weight, enc.input_layer.bias
    w[:latent] = 0.0
    w[:latent, :pix] = basis
    if b is None:
        raise ValueError(
            "pca_init needs an encoder input layer with a bias (official encoder flags)"
        )
    b[:latent] = -(basis @ mean)
    b[latent:] = constant * s
    enc.pos_embedder.position_embedding.weight[:, :latent] = 0.0
    sigma = constant * math.sqrt((enc_c - latent) / enc_c)  # LayerNorm's std of that input
    r = constant / sigma
    p = model.proj.weight
    p.zero_()
    # LayerNorm also subtracts the channel mean m = sum(a) / C; with u = a - m, sum(u) =
    # (C - L) m, so a = (I + 1 1^T / (C - L)) u undoes it exactly.
    undo_mean = torch.eye(latent) + torch.full((latent, latent), 1.0 / (enc_c - latent))
    p[:latent, :latent] = undo_mean * sigma
    p[latent:, latent:] = (logvar * s / ((enc_c - latent) * r))[None, :].expand(latent, -1)
    # Decoder: identity in, constant table, PCA basis out.
    dec = model.decoder
    sd = _alternating(dec_c - latent)
    dec.input_layer.weight.zero_()
    dec.input_layer.weight[:latent, :latent] = torch.eye(latent)
    table = dec.pos_embedder.position_embedding.weight
    table[:, :latent] = 0.0
    table[:, latent:] = constant * sd
    rho = constant * math.sqrt((dec_c - latent) / dec_c)  # RMSNorm's rms of that input
    rd = constant / rho
    out = dec.out_layer.weight
    out.zero_()
    for f in range(frames):
        rows = slice(f * pix, (f + 1) * pix)
        out[rows, :latent] = basis.T * rho
        out[rows, latent:] = mean[:, None] * sd[None, :] / ((dec_c - latent) * rd)
    for trunk in (enc, dec):
        for block in trunk.blocks:
            block.attn.to_out.weight.zero_()
            block.mlp.mlp[2].weight.zero_()
            if block.attn.to_out.bias is not None:
                block.attn.to_out.bias.zero_()
                block.mlp.mlp[2].bias.zero_()


@torch.no_grad()
def stream_latents(model: ATokenModel, stream: Iterator, count: int) -> Tensor:
    """``[count, latent]`` posterior means of the tokens of samples drawn from a stream."""
    got, n = [], 0
    while n < count:
        batch = data_mod.collate([next(stream)])
        mean = model.encode(batch.tokens, pool=False).mean.float()
        got.append(mean)
        n += mean.shape[0]
    return torch.cat(got)[:count]


@torch.no_grad()
def fsq_rotation_init(
    model: ATokenModel, latents: Tensor, std: float = 0.75, seed: int = 0
) -> float:
    """Fit a continuous model's latent into the FSQ range before training its FSQ stage.

    FSQ gives every latent channel the same few levels (4 for AToken), but a continuous latent
    holds very different variances per channel (a PCA-started one most of all: the mean colour
    of a patch has most of the energy). Quantising that directly leaves the large channels with
    4 levels and the small ones with nothing to quantise. We rotate the latent by a random
    orthogonal matrix ``R`` (energy spread evenly over the channels, the classic transform-
    coding remedy) and scale it to ``std`` per channel: ``proj``'s mean rows become
    ``A W`` with ``A = R std / sigma``; the decoder's input layer becomes ``D A^-1 diag(k)``
    with ``k`` (1.5 for 4 levels) the inverse slope at 0 of FSQ's code before rounding
    (``(tanh(z + shift) * half_l - offset) / half_width``), so the model still reconstructs
    about as before, now through the codes. ``latents`` are posterior means of typical data; returns ``sigma`` (their RMS).
    """
    if model.quantizer is None:
        raise ValueError("fsq_rotation_init needs a model with a quantizer")
    dim = model.quantizer.dim
    if latents.ndim != 2 or latents.shape[1] < dim or latents.shape[0] < 1:
        raise ValueError(f"latents must be [N>=1, >={dim}], got {tuple(latents.shape)}")
    lat = latents[:, :dim].double()
    sigma = float(lat.pow(2).mean().sqrt())
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"latents have no energy (rms {sigma})")
    g = torch.Generator().manual_seed(int(seed))
    rot, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    a = rot * (std / sigma)
    a_inv = rot.T * (sigma / std)
    w = model.proj.weight
    w[:dim] = (a @ w[:dim].double()).to(w.dtype)
    # inverse slope at 0 of the code before rounding, per channel: the quantizer's own
    # straight-through gradient (the derivative of bound(z) / half_width)
    with torch.enable_grad():
        z0 = torch.zeros(1, dim, requires_grad=True)
        codes, _ = model.quantizer(z0, straight_through=True)
        (slope,) = torch.autograd.grad(codes.sum(), z0)
    k = 1.0 / slope[0].double()
    d = model.decoder.input_layer.weight
    d[:, :dim] = (d[:, :dim].double() @ (a_inv * k[:, None])).to(d.dtype)
    return sigma


@torch.no_grad()
def temporal_mix_init(model: ATokenModel, weights: Sequence[float]) -> None:
    """Let a video token enter the encoder as the picture ``x0 + sum_k w_k x_k`` (k = 1..3).

    Adds ``w_k`` times the input layer's frame-0 columns to its frame-k columns (what those
    columns held is kept). A PCA-started encoder (`pca_init`) reads almost only frame 0, so its
    decoder repeats frame 0 four times (issue 16). Images and 3D (zeros in frames 1-3) encode
    exactly as before; with ``sum(w) = 0`` the frame-0 part of a still video's input is its
    frame, and a moving patch enters as one picture between its frames, e.g.
    ``x0 - 0.75 x1 + 0.25 x2 + 0.5 x3``, near the patch's mean when the motion is slow.
    """
    weight = model.encoder.input_layer.weight
    count = weight.shape[1] // VOXEL_CHANNELS
    if len(weights) != count - 1 or abs(sum(weights)) > 1e-6:
        raise ValueError(
            f"temporal_init needs {count - 1} weights (frames 1..{count - 1}) summing to 0, "
            f"got {list(weights)}"
        )
    frame0 = weight[:, :VOXEL_CHANNELS].clone()
    for k, w in enumerate(weights, start=1):
        weight[:, k * VOXEL_CHANNELS : (k + 1) * VOXEL_CHANNELS] += float(w) * frame0


def input_frame_mask(model: ATokenModel, frames: Sequence[int]) -> Tensor:
    """Bool ``[C, in_channels]``: the encoder input layer's weights that read ``frames``.

    Token features are ordered (pt, ph, pw, c) (`atoken.patchify.patchify`), so frame ``f`` of
    a token is columns ``f * 768 .. (f + 1) * 768``. Images and 3D assets carry zeros in frames
    1-3, so those columns never change their encoding.
    """
    weight = model.encoder.input_layer.weight
    count = weight.shape[1] // VOXEL_CHANNELS
    bad = [f for f in frames if not 0 <= int(f) < count]
    if bad or not frames:
        raise ValueError(f"frames must be a non-empty list in [0, {count}), got {list(frames)}")
    cols = torch.zeros(count, VOXEL_CHANNELS, dtype=torch.bool)
    cols[[int(f) for f in frames]] = True
    return cols.reshape(1, -1).expand(weight.shape[0], -1).clone()


def frame0_patches(stream: Iterator, count: int) -> Tensor:
    """``[count, 768]`` frame-0 patches (pixels in [-1, 1]) of image samples from a stream."""
    got, n, tries = [], 0, 0
    while n < count:
        s = next(stream)
        tries += 1
        if tries > 100 * max(1, count):
            raise ValueError("the data stream yields no image samples for the PCA initialisation")
        if s.kind != "image":
            continue
        got.append(s.feats[:, :VOXEL_CHANNELS])
        n += s.feats.shape[0]
    return torch.cat(got)[:count]


@torch.no_grad()
def transfer_weights(src: Mapping[str, Tensor], model: ATokenModel) -> list[str]:
    """Copy a state dict into ``model``, growing or shrinking the latent width if needed.

    Every key must exist in both. Shapes must match except the latent-width tensors
    (``proj.weight`` ``[2L, C]``: mean rows and logvar rows copied separately, and
    ``decoder.input_layer.weight`` ``[C, L]``), where the overlapping channels are copied and
    new channels keep their (small) initial values: the stage 1 -> 2 step (latent 32 -> 48).
    Returns the keys that were resized.
    """
    dst = model.state_dict()
    missing, unexpected = sorted(set(dst) - set(src)), sorted(set(src) - set(dst))
    if missing or unexpected:
        raise ValueError(
            f"init weights do not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    resized = []
    for key, target in dst.items():
        value = src[key].to(target.dtype)
        if value.shape == target.shape:
            target.copy_(value)
            continue
        if key == "proj.weight" and value.shape[1] == target.shape[1]:
            ls, ld = value.shape[0] // 2, target.shape[0] // 2
            k = min(ls, ld)
            target[:k] = value[:k]
            target[ld : ld + k] = value[ls : ls + k]
        elif key == "decoder.input_layer.weight" and value.shape[0] == target.shape[0]:
            k = min(value.shape[1], target.shape[1])
            target[:, :k] = value[:, :k]
        else:
            raise ValueError(
                f"{key}: shape {tuple(value.shape)} cannot be transferred to {tuple(target.shape)}"
            )
        resized.append(key)
    return resized


def build_stage_model(cfg: TrainConfig) -> tuple[ATokenModel, ATokenConfig | None]:
    """The model of a stage and the config of the checkpoint it starts from (None if fresh)."""
    mcfg = model_config(cfg.model, cfg.model_overrides)
    model = ATokenModel(mcfg)
    init_weights(model, cfg.seed if cfg.init_seed is None else cfg.init_seed)
    if cfg.init_from is None:
        return model, None
    path = Path(cfg.init_from)
    if cfg.init_config is not None:
        src_cfg = model_config(cfg.init_config)
    elif isinstance(cfg_in_file := _ckpt.config_from_checkpoint(path), ATokenConfig):
        src_cfg = cfg_in_file  # written by save_model: the previous stage
    else:
        src_cfg = model_config(cfg.model)
    transfer_weights(read_checkpoint(path), model)
    return model, src_cfg
