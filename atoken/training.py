"""Training AToken on accelerate: the adversarial-free objective and the 4-stage curriculum.

One config (YAML or dict, see `TrainConfig` and ``configs/train/``) describes a stage: the
model (a preset, an official YAML, or a config dict, optionally started from a checkpoint with
``init_from`` + ``init_config``), the data sources (`atoken.data`), the loss and the optimiser.
`train_from_config` runs it on whatever accelerate sees: one CPU, one GPU, or several processes
(``accelerate launch`` / ``torchrun``; gloo on CPU, NCCL on GPU).

Objective (§3.5): ``0.2 * reconstruction + 1.0 * semantic + 1e-8 * KL``.

* Reconstruction: images use `atoken.losses.ImageReconstructionLoss` (L1 at native size, and on
  224x224 resizes an LPIPS-style term, a Gram term and a CLIP-style term, weights 1 / 10 / 1e3 /
  1) on frame 0 of the decoded tokens; videos use L1 over all frames; 3D uses L1 on the decoded
  voxel features (the first 768 channels), not on rendered Gaussians: the GS decoder is a
  separate, frozen module downstream of these features, and rendering on CPU would dominate
  the step. Modalities are mixed by their share of the batch's tokens.
* Semantic: the SigLIP sigmoid loss between pooled features and caption embeddings of a frozen
  text tower, for every captioned item; for images the paper's distillation (KL at T = 2 of a
  frozen teacher's image-text logits into ours) replaces it when a teacher is configured.
  ``logit_scale`` / ``logit_bias`` are trainable scalars and are written into the exported
  config. With data parallelism the sigmoid loss is computed per rank (no all-gather).
* KL of the diagonal posterior (continuous models); FSQ models (stage 4) quantise the posterior
  mean with a straight-through estimator and have no KL.

Optimiser: AdamW (0.9, 0.95), weight decay 0.1 on matrices only, linear warm-up then cosine
decay to ``min_lr``; the encoder's learning rate is scaled by ``encoder_lr_scale`` (default 0.1
when starting from a checkpoint, as the paper does for a pretrained encoder). An EMA of the
weights (decay ``min(ema_decay, (1 + t) / (10 + t))``, so short runs are not dominated by the
initial weights) is what gets exported.

Outputs in ``output_dir``: ``model.safetensors`` (EMA) and ``model_raw.safetensors`` (last
weights), both in the official key format with the config JSON in the metadata
(``atoken_config``), ``metrics.csv``, TensorBoard events under ``tb/``, and resumable states
under ``state/step-XXXXXXX/``.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from atoken import checkpoint as _ckpt
from atoken import data as data_mod
from atoken.checkpoint import CONFIG_KEY, ENCODER_FROM_KEY, read_checkpoint, save_checkpoint
from atoken.checkpoint import load as load_model
from atoken.config import ATokenConfig, TrunkConfig, resolve_config
from atoken.losses import (
    EFFNET_LAYOUT,
    OBJECTIVE_WEIGHTS,
    ConvFeatureNet,
    EffNetFeatureNet,
    ImageReconstructionLoss,
    PooledEmbedder,
    atoken_objective,
    distillation_loss,
    image_text_logits,
    kl_loss,
    l1_loss,
    resize_224,
    siglip_loss,
)
from atoken.model import ATokenModel, Encoded
from atoken.patchify import VOXEL_CHANNELS, crop_box, to_uint8, unpatchify
from atoken.sparse import SparseTensor
from atoken.text import TextTower

MIXED_PRECISION = ("no", "bf16", "fp16")

# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class TrainConfig:
    """One training stage. Nested sections are plain mappings (see ``configs/train/*.yaml``).

    ``data``: ``token_budget``, ``max_items`` and ``sources`` (each a mapping with ``type`` and
    ``weight``; types in `atoken.data.SOURCE_TYPES`).
    ``loss``: ``weights`` (reconstruction, semantic, kl), ``image`` (l1, lpips, gram,
    perceptual and mse weights and ``feature_net``: ``{layout, seed, path}``; layout
    ``effnet-lite0`` is the ImageNet-trained EfficientNet-Lite0), ``sample_posterior``.
    ``semantic``: ``text_tower`` (``"minilm"``, ``"siglip2"``, a folder, ``"random:<dim>"`` or
    None), ``image_mode`` (``"siglip"`` or ``"distill"``), ``teacher`` (``{type: conv, ...}`` or
    ``{type: import, target: "module:callable", kwargs}``), ``logit_scale`` / ``logit_bias``
    (initial values, log scale as in SigLIP), ``learn_logit``, ``trunk_grad_scale`` (factor on
    the semantic gradient entering the shared encoder trunk; 1 = the paper).
    ``pca_init``: ``{patches: N, sources: [i, ...]}`` starts a fresh model as per-patch PCA of
    N image patches drawn from the listed sources (default all; see `pca_init`); ignored with
    ``init_from``. ``fsq_init``: ``{tokens: N, std: s, seed: k}`` rotates and rescales the
    continuous latent of a pretrained start into the FSQ range before an FSQ stage (see
    `fsq_rotation_init`). ``lr_scales`` maps parameter-name prefixes to learning-rate factors.
    ``encoder_train_frames`` (with ``freeze_encoder``), e.g. ``[1, 2, 3]``: still train the
    encoder input layer's weights that read those frames of a token (`input_frame_mask`); the
    rest of the encoder stays bit-exact, and so do images and 3D, whose frames 1-3 are zeros.
    ``temporal_init``: ``[w1, w2, w3]`` (summing to 0) re-mixes a pretrained start's encoder
    input for frames 1-3 before training (`temporal_mix_init`); ignored without ``init_from``.
    """

    name: str = "run"
    output_dir: str = "runs/run"
    model: str | dict[str, Any] = "tiny-c"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    init_config: str | dict[str, Any] | None = None
    encoder_lr_scale: float | None = None
    lr_scales: dict[str, float] = field(default_factory=dict)
    freeze_encoder: bool = False
    encoder_train_frames: list[int] = field(default_factory=list)
    temporal_init: list[float] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    semantic: dict[str, Any] = field(default_factory=dict)
    steps: int = 100_000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 2000
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.9999
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    cpu: bool = False
    threads: int | None = None
    seed: int = 0
    log_every: int = 10
    save_every: int = 0
    keep_states: int = 2
    resume: str | bool | None = None
    export_dtype: str = "float32"
    record_sources: bool = False
    progress: bool = True
    init_seed: int | None = None
    pca_init: dict[str, Any] | None = None
    fsq_init: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}"
            )
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(
                f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.encoder_train_frames and not self.freeze_encoder:
            raise ValueError(
                "encoder_train_frames trains part of a frozen encoder; set freeze_encoder: true "
                f"(got frames {self.encoder_train_frames} with the whole encoder trained)"
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.export_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(
                f"export_dtype must be float32, float16 or bfloat16, got {self.export_dtype!r}"
            )
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if "token_budget" in self.data and int(self.data["token_budget"]) < 1:
            raise ValueError(f"data.token_budget must be >= 1, got {self.data['token_budget']}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known keys: {sorted(known)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (what ``config.yaml`` in the output folder holds)."""
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if "." in key:  # dotted override: "data.token_budget"
            head, rest = key.split(".", 1)
            out[head] = _merge(dict(out.get(head) or {}), {rest: value})
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_train_config(path_or_dict: str | Path | Mapping[str, Any], **overrides) -> TrainConfig:
    """A `TrainConfig` from a YAML file or a mapping, with (dotted) overrides applied.

    Relative paths inside a YAML file (data folders, ``init_from``) stay relative to the current
    directory; ``base_dir`` in the data section changes that.
    """
    if isinstance(path_or_dict, Mapping):
        raw = dict(path_or_dict)
    else:
        path = Path(path_or_dict)
        if not path.is_file():
            raise ValueError(f"training config not found: {str(path)!r}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"cannot parse {path}: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a training config must be a mapping")
    return TrainConfig.from_dict(_merge(raw, overrides))


# ---------------------------------------------------------------------------------------------
# Model construction


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


# ---------------------------------------------------------------------------------------------
# Text towers and teachers for tests and offline runs


class RandomTextTower(TextTower):
    """A deterministic bag-of-words text tower of any width (tests, offline smoke runs).

    Each lower-cased word maps to a fixed random vector (seeded by its bytes); a text is the
    normalised sum, so captions sharing words have similar embeddings.
    """

    def __init__(self, dim: int, seed: int = 0) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"dim must be >= 2, got {dim}")
        self.dim, self.seed, self.name = int(dim), int(seed), f"random:{dim}"

    @property
    def device(self) -> torch.device:
        """Always the CPU."""
        return torch.device("cpu")

    def _word(self, word: str) -> Tensor:
        h = int.from_bytes(word.encode("utf-8")[:16].ljust(16, b"\0"), "little") % (2**31)
        g = torch.Generator().manual_seed((h + self.seed * 7919) % (2**31))
        return torch.randn(self.dim, generator=g)

    def _embed(self, texts: list[str]) -> Tensor:
        out = []
        for t in texts:
            words = [w.strip(".,;:!?").lower() for w in t.split()] or [""]
            out.append(torch.stack([self._word(w) for w in words]).sum(0))
        return torch.stack(out)


def text_tower_from_spec(spec: str | TextTower | None) -> TextTower | None:
    """``None``, ``"random:<dim>"``, or anything `atoken.text.load_text_tower` accepts."""
    if spec is None or isinstance(spec, TextTower):
        return spec
    if str(spec).startswith("random:"):
        return RandomTextTower(int(str(spec).split(":", 1)[1]))
    from atoken.text import load_text_tower

    return load_text_tower(str(spec))


class ConvTeacher(nn.Module):
    """A frozen random conv image tower ``[B, 3, H, W] -> [B, dim]`` (stands in for SigLIP2's)."""

    def __init__(self, dim: int, seed: int = 0) -> None:
        super().__init__()
        self.features = PooledEmbedder(ConvFeatureNet((16, 32, 64), (1, 1, 1), seed=seed))
        gen = torch.Generator().manual_seed(seed + 1)
        self.register_buffer("head", torch.randn(16 + 32 + 64, dim, generator=gen) / 10.0)
        self.requires_grad_(False).eval()

    def forward(self, images: Tensor) -> Tensor:
        """L2-normalised embeddings."""
        f = self.features(images)
        f = (f - f.mean(1, keepdim=True)) / (f.std(1, keepdim=True) + 1e-6)
        return F.normalize(f @ self.head.to(f), dim=-1)


def build_teacher(spec: Mapping[str, Any] | None) -> nn.Module | None:
    """The image teacher of the distillation term, or None.

    ``{type: conv, dim, seed}``: `ConvTeacher`; ``{type: import, target: "pkg.mod:factory",
    kwargs: {...}}``: any callable returning a module ``[B, 3, 224, 224] in [-1, 1] -> [B, D]``
    (e.g. a wrapper around a locally stored SigLIP2 vision tower).
    """
    if not spec:
        return None
    kind = spec.get("type")
    if kind == "conv":
        return ConvTeacher(int(spec["dim"]), int(spec.get("seed", 0)))
    if kind == "import":
        import importlib

        target = str(spec.get("target", ""))
        if ":" not in target:
            raise ValueError(
                f"teacher target must look like 'package.module:callable', got {target!r}"
            )
        mod, attr = target.split(":", 1)
        factory = getattr(importlib.import_module(mod), attr)
        teacher = factory(**dict(spec.get("kwargs") or {}))
        if isinstance(teacher, nn.Module):
            teacher.requires_grad_(False).eval()
        return teacher
    raise ValueError(f"teacher type must be 'conv' or 'import', got {kind!r}")


# ---------------------------------------------------------------------------------------------
# Objective


class TrainModule(nn.Module):
    """What the optimiser (and DDP) sees: the autoencoder plus the SigLIP logit scalars."""

    def __init__(
        self,
        model: ATokenModel,
        logit_scale: float,
        logit_bias: float,
        learn_logit: bool,
        trunk_grad_scale: float = 1.0,
    ):
        super().__init__()
        self.model = model
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)), requires_grad=learn_logit)
        self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias)), requires_grad=learn_logit)
        if not 0.0 <= trunk_grad_scale <= 1.0:
            raise ValueError(f"trunk_grad_scale must be in [0, 1], got {trunk_grad_scale}")
        self.trunk_grad_scale = float(trunk_grad_scale)

    def forward(
        self,
        feats: Tensor,
        coords: Tensor,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Encode, take a posterior sample (or FSQ codes with straight-through), decode."""
        x = SparseTensor(feats, coords)
        if self.trunk_grad_scale == 1.0:
            enc = self.model.encode(x)
        else:
            # As ATokenModel.encode, but the pooling head's gradient reaches the shared trunk
            # scaled by trunk_grad_scale (the value is unchanged).
            hidden = self.model.encode_hidden(x)
            a = self.trunk_grad_scale
            to_head = hidden * a + hidden.detach() * (1.0 - a) if a > 0 else hidden.detach()
            mean, logvar = self.model.proj(hidden).float().chunk(2, dim=1)
            enc = Encoded(mean, logvar, self.model.pool(to_head, coords), hidden, coords)
        if self.model.quantizer is not None:
            latent, _ = self.model.quantizer(enc.mean, straight_through=True)
        elif sample:
            latent = enc.sample(generator)
        else:
            latent = enc.mean
        rec = self.model.decode(SparseTensor(latent.to(enc.hidden.dtype), coords))
        # The logit scalars leave through forward so DDP sees them used (their loss is outside).
        return {
            "rec": rec.feats,
            "mean": enc.mean,
            "logvar": enc.logvar,
            "pooled": enc.pooled,
            "logit_scale": self.logit_scale * 1.0,
            "logit_bias": self.logit_bias * 1.0,
        }


class Objective:
    """The stage's loss: per-modality reconstruction, semantic alignment and KL (§3.5)."""

    def __init__(self, loss: Mapping[str, Any], semantic: Mapping[str, Any], device: torch.device):
        weights = dict(loss.get("weights") or {})
        self.weights = (
            float(weights.get("reconstruction", OBJECTIVE_WEIGHTS[0])),
            float(weights.get("semantic", OBJECTIVE_WEIGHTS[1])),
            float(weights.get("kl", OBJECTIVE_WEIGHTS[2])),
        )
        image = dict(loss.get("image") or {})
        net_spec = dict(image.get("feature_net") or {})
        net = None
        terms = {
            k: float(image.get(k, d))
            for k, d in (
                ("l1", 1.0),
                ("lpips", 10.0),
                ("gram", 1e3),
                ("perceptual", 1.0),
                ("mse", 0.0),
            )
        }
        if any(terms[k] for k in ("lpips", "gram", "perceptual")):
            if net_spec.get("layout") == EFFNET_LAYOUT:  # ImageNet-trained (atoken.effnet)
                net = EffNetFeatureNet()
            elif net_spec.get("path"):
                net = ConvFeatureNet.from_safetensors(
                    net_spec["path"], layout=net_spec.get("layout")
                )
            elif net_spec.get("channels"):
                net = ConvFeatureNet(
                    net_spec["channels"],
                    net_spec.get("convs_per_stage") or [1] * len(net_spec["channels"]),
                    seed=int(net_spec.get("seed", 0)),
                )
            else:
                net = ConvFeatureNet.preset(
                    net_spec.get("layout", "small"), seed=int(net_spec.get("seed", 0))
                )
            net = net.to(device)
        self.resize = int(image.get("resize", 224))
        self.image_loss = ImageReconstructionLoss(
            lpips_net=net if terms["lpips"] else None,
            gram_net=net if terms["gram"] else None,
            embed_net=PooledEmbedder(net) if net is not None and terms["perceptual"] else None,
            l1_weight=terms["l1"],
            lpips_weight=terms["lpips"],
            gram_weight=terms["gram"],
            perceptual_weight=terms["perceptual"],
            mse_weight=terms["mse"],
        )
        self.sample_posterior = bool(loss.get("sample_posterior", True))
        self.tower = text_tower_from_spec(semantic.get("text_tower"))
        self.image_mode = semantic.get("image_mode", "siglip")
        if self.image_mode not in ("siglip", "distill"):
            raise ValueError(
                f"semantic.image_mode must be 'siglip' or 'distill', got {self.image_mode!r}"
            )
        self.teacher = build_teacher(semantic.get("teacher"))
        if self.image_mode == "distill" and self.teacher is None:
            raise ValueError(
                "semantic.image_mode 'distill' needs a semantic.teacher (an image tower, e.g. "
                "{type: import, target: 'pkg.mod:factory'}); or set image_mode: siglip"
            )
        if isinstance(self.teacher, nn.Module):
            self.teacher = self.teacher.to(device)
        self.teacher_logit_scale = float(semantic.get("teacher_logit_scale", math.log(100.0)))
        self.temperature = float(semantic.get("temperature", 2.0))

    def images_of(
        self, rec: Tensor, batch: data_mod.Batch, rows: list[int]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Frame 0 of the decoded and target tokens of the image items ``rows`` as ``[3, H, W]``."""
        out_r, out_t = [], []
        sl = batch.slices()
        for i in rows:
            c = batch.tokens.coords[sl[i]]
            out_r.append(unpatchify(rec[sl[i]], c)[0])
            out_t.append(unpatchify(batch.tokens.feats[sl[i]], c)[0])
        return out_r, out_t

    def __call__(
        self, out: dict[str, Tensor], batch: data_mod.Batch, quantized: bool
    ) -> dict[str, Tensor]:
        """All loss terms (unweighted) and the weighted ``total``."""
        rec = out["rec"].float()
        target = batch.tokens.feats
        sl = batch.slices()
        n_total = target.shape[0]
        terms: dict[str, Tensor] = {}
        rec_total = rec.new_zeros(())
        for kind in data_mod.KINDS:
            rows = [i for i, k in enumerate(batch.kinds) if k == kind]
            if not rows:
                continue
            n = sum(sl[i].stop - sl[i].start for i in rows)
            if kind == "image":
                r, t = self.images_of(rec, batch, rows)
                parts = self.image_loss(r, t)
                for name in self.image_loss.weights:  # every term, unweighted
                    terms[f"image_{name}"] = parts[name].detach()
                value = parts["total"]
            else:
                idx = torch.cat([torch.arange(sl[i].start, sl[i].stop) for i in rows]).to(
                    rec.device
                )
                width = VOXEL_CHANNELS if kind == "3d" else target.shape[1]
                value = l1_loss(rec[idx, :width], target[idx, :width].float())
                terms[f"{kind}_l1"] = value.detach()
            rec_total = rec_total + value * (n / n_total)
        semantic = self.semantic(out, batch, terms)
        kl = None if quantized else kl_loss(out["mean"], out["logvar"])
        total = atoken_objective(rec_total, semantic, kl, self.weights)
        terms.update({k: v for k, v in total.items()})
        return terms

    def semantic(
        self, out: dict[str, Tensor], batch: data_mod.Batch, terms: dict[str, Tensor]
    ) -> Tensor | None:
        """SigLIP over captioned items (+ teacher distillation for images in distill mode)."""
        pooled, scale, bias = out["pooled"], out["logit_scale"], out["logit_bias"]
        if self.tower is None:
            return None
        rows = [i for i, c in enumerate(batch.captions) if c]
        if not rows:
            return None
        if pooled.shape[1] != self.tower.dim:
            raise ValueError(
                f"pooled features are {pooled.shape[1]}-dim but the text tower {self.tower.name!r} "
                f"gives {self.tower.dim}-dim embeddings; use a tower of the encoder's width"
            )
        txt = self.tower.encode([batch.captions[i] for i in rows]).to(pooled.device)
        img = pooled[rows].float()
        total = pooled.new_zeros((), dtype=torch.float32)
        sig_rows = list(range(len(rows)))
        if self.image_mode == "distill":
            img_rows = [j for j, i in enumerate(rows) if batch.kinds[i] == "image"]
            sig_rows = [j for j in sig_rows if j not in img_rows]
            if img_rows:
                r, t = self.images_of(batch.tokens.feats, batch, [rows[j] for j in img_rows])
                with torch.no_grad():
                    small = torch.stack([resize_224(x, self.resize) for x in t])
                    teacher_emb = self.teacher(small).float()
                    t_logits = image_text_logits(
                        teacher_emb, txt[img_rows], self.teacher_logit_scale
                    )
                s_logits = image_text_logits(img[img_rows], txt[img_rows], scale)
                d = distillation_loss(s_logits, t_logits, self.temperature)
                terms["distill"] = d.detach()
                total = total + d
        if len(sig_rows) >= 1:
            s = siglip_loss(img[sig_rows], txt[sig_rows], scale, bias)
            terms["siglip"] = s.detach()
            total = total + s
        return total


# ---------------------------------------------------------------------------------------------
# EMA, schedule, parameter groups


class EMA:
    """Exponential moving average of parameters (float32 copies), with a warm-up of the decay."""

    def __init__(
        self, module: nn.Module, decay: float, masks: Mapping[str, Tensor] | None = None
    ) -> None:
        self.decay = float(decay)
        self.step = 0
        self.shadow = {k: p.detach().float().clone() for k, p in module.named_parameters()}
        # partly trained parameters: True where trained; the other entries are copied like
        # frozen parameters (names as in ``module.named_parameters()``)
        self.masks = dict(masks or {})

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Blend the current parameters in."""
        self.step += 1
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        for k, p in module.named_parameters():
            if p.requires_grad:
                self.shadow[k].mul_(d).add_(p.detach().float(), alpha=1 - d)
                if k in self.masks:
                    m = self.masks[k].to(p.device)
                    self.shadow[k].copy_(torch.where(m, self.shadow[k], p.detach().float()))
            else:  # frozen: keep it bit-exact (d * x + (1 - d) * x rounds)
                self.shadow[k].copy_(p.detach().float())

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged parameters into ``module``."""
        for k, p in module.named_parameters():
            p.copy_(self.shadow[k].to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        """Shadow weights and step."""
        return {"step": self.step, "decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict`."""
        self.step = int(state["step"])
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up from 0 to 1 over ``warmup`` steps, then cosine from 1 to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(
    module: TrainModule,
    lr: float,
    weight_decay: float,
    encoder_scale: float,
    freeze_encoder: bool,
    lr_scales: Mapping[str, float] | None = None,
    partly_trained: Collection[str] = (),
) -> list[dict[str, Any]]:
    """AdamW groups by learning-rate factor and decay (none on norms, biases, tables, logits).

    The encoder's factor is ``encoder_scale``; ``lr_scales`` maps parameter-name prefixes
    (e.g. ``"model.decoder.out_layer"``) to further factors (the longest match wins).
    ``partly_trained`` names encoder parameters that stay trainable in a frozen encoder (their
    gradient is masked by the caller), at factor 1 and without weight decay, which would move
    the masked-out entries.
    """
    scales = sorted((lr_scales or {}).items(), key=lambda kv: -len(kv[0]))
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        is_encoder = name.startswith("model.encoder.")
        partly = name in partly_trained
        if is_encoder and freeze_encoder and not partly:
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        factor = encoder_scale if is_encoder and not partly else 1.0
        factor *= next((float(f) for prefix, f in scales if name.startswith(prefix)), 1.0)
        no_decay = p.dim() < 2 or "position_embedding" in name or name.endswith("probe") or partly
        groups.setdefault((factor, no_decay), []).append(p)
    return [
        {"params": params, "lr": lr * factor, "weight_decay": 0.0 if no_decay else weight_decay}
        for (factor, no_decay), params in sorted(groups.items())
    ]


# ---------------------------------------------------------------------------------------------
# Exported checkpoints


def export_config(model: ATokenModel, module: TrainModule | None = None, **changes) -> ATokenConfig:
    """The model's config with the learned logit scale / bias written in."""
    cfg = model.config
    if module is not None:
        changes.setdefault("logit_scale", round(float(module.logit_scale.detach()), 6))
        changes.setdefault("logit_bias", round(float(module.logit_bias.detach()), 6))
    return replace(cfg, **changes) if changes else cfg


def save_model(
    model: ATokenModel,
    path: str | Path,
    config: ATokenConfig | None = None,
    dtype: str = "float32",
    metadata: Mapping[str, str] | None = None,
    encoder_from: str | None = None,
) -> Path:
    """Official-format safetensors with the config JSON (``atoken_config``) in the metadata.

    With ``encoder_from`` (a file name in the same folder, e.g. ``"atoken-tiny.safetensors"``)
    the ``encoder.*`` tensors are left out and recorded as shared with that file (metadata
    ``encoder_from``); `load_trained` puts them back.
    """
    cfg = config or model.config
    meta = {CONFIG_KEY: json.dumps(cfg.to_dict())}
    if cfg.text_tower:
        meta["text_tower"] = str(cfg.text_tower)
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    target = copy.deepcopy(model).to(getattr(torch, dtype))
    if encoder_from is None:
        return save_checkpoint(target, path, metadata=meta)
    from safetensors.torch import save_file

    meta[ENCODER_FROM_KEY] = str(encoder_from)
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in target.state_dict().items()
        if not k.startswith("encoder.")
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return path


def trained_config(path: str | Path) -> ATokenConfig:
    """The `ATokenConfig` stored in a checkpoint's metadata by `save_model`."""
    cfg = _ckpt.config_from_checkpoint(path)
    if not isinstance(cfg, ATokenConfig):
        raise ValueError(f"{path} has no {CONFIG_KEY!r} metadata; pass the config explicitly")
    return cfg


def load_trained(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
) -> ATokenModel:
    """Load a checkpoint written by `save_model` (config from its metadata, shared encoder merged)."""
    return load_model(path, trained_config(path), device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The trainer


@dataclass
class TrainResult:
    """Where a run wrote its outputs and how it went."""

    output_dir: Path
    checkpoint: Path
    raw_checkpoint: Path
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    history: list[dict[str, float]]
    sources_seen: list[str] = field(default_factory=list)


def _release_precision(mixed_precision: str) -> None:
    """Let a new stage in the same process use another precision than the previous one.

    accelerate keeps one process-wide state and refuses a second ``mixed_precision``; the
    process-group part (PartialState) is kept.
    """
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and str(current) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


# the columns of a run's metrics.csv
LOG_COLUMNS = (
    "step",
    "seconds",
    "lr",
    "total",
    "reconstruction",
    "semantic",
    "kl",
    "image_l1",
    "image_lpips",
    "image_gram",
    "image_perceptual",
    "image_mse",
    "video_l1",
    "3d_l1",
    "siglip",
    "distill",
    "logit_scale",
    "logit_bias",
    "tokens",
    "items",
    "tokens_per_s",
)


class Trainer:
    """Runs one stage with accelerate (see the module docstring)."""

    def __init__(self, cfg: TrainConfig) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        _release_precision(cfg.mixed_precision)
        self.accelerator = Accelerator(
            cpu=cfg.cpu,
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum,
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.out = Path(cfg.output_dir)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        torch.manual_seed(cfg.seed + 1000 * self.rank)
        self.generator = torch.Generator(device=acc.device).manual_seed(cfg.seed + 17 + self.rank)

        model, source_cfg = build_stage_model(cfg)
        pretrained = source_cfg is not None
        self.stream = self._build_stream()
        if cfg.pca_init and not pretrained:
            count = int(cfg.pca_init.get("patches", 20000))
            # Its own draws (the training stream is untouched), optionally from some sources only.
            probe = self._build_stream(seed_offset=1, only=cfg.pca_init.get("sources"))
            mean, basis = patch_pca(frame0_patches(probe, count), model.config.latent_channels)
            pca_init(model, mean, basis, float(cfg.pca_init.get("constant", 10.0)))
        if cfg.temporal_init and pretrained:
            temporal_mix_init(model, cfg.temporal_init)
        if cfg.fsq_init and pretrained and model.quantizer is not None:
            probe = self._build_stream(seed_offset=2)
            lat = stream_latents(model, probe, int(cfg.fsq_init.get("tokens", 20000)))
            fsq_rotation_init(
                model, lat, float(cfg.fsq_init.get("std", 0.75)), int(cfg.fsq_init.get("seed", 0))
            )
        if cfg.gradient_checkpointing:
            model.set_gradient_checkpointing(True)
        sem = dict(cfg.semantic)
        # Start the logit scalars from the config, else from the previous stage, else SigLIP's.
        scale0 = source_cfg.logit_scale if source_cfg is not None else math.log(10.0)
        bias0 = source_cfg.logit_bias if source_cfg is not None else -10.0
        self.module = TrainModule(
            model,
            float(sem.get("logit_scale", scale0)),
            float(sem.get("logit_bias", bias0)),
            bool(sem.get("learn_logit", True)),
            float(sem.get("trunk_grad_scale", 1.0)),
        )
        enc_scale = (
            cfg.encoder_lr_scale
            if cfg.encoder_lr_scale is not None
            else (0.1 if pretrained else 1.0)
        )
        masks = {}
        if cfg.encoder_train_frames:
            mask = input_frame_mask(model, cfg.encoder_train_frames)
            weight = model.encoder.input_layer.weight
            weight.register_hook(lambda g, m=mask: g * m.to(g.device, g.dtype))
            masks["model.encoder.input_layer.weight"] = mask
        self.optimizer = torch.optim.AdamW(
            param_groups(
                self.module,
                cfg.lr,
                cfg.weight_decay,
                enc_scale,
                cfg.freeze_encoder,
                cfg.lr_scales,
                partly_trained=masks,
            ),
            lr=cfg.lr,
            betas=cfg.betas,
            weight_decay=cfg.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr / cfg.lr),
        )
        self.ema = EMA(self.module, cfg.ema_decay, masks)
        self.module, self.optimizer = acc.prepare(self.module, self.optimizer)
        self.objective = Objective(cfg.loss, sem, acc.device)
        self.quantized = model.quantizer is not None
        self.batches = data_mod.TokenBudgetBatcher(
            self.stream, int(cfg.data.get("token_budget", 4096)), cfg.data.get("max_items")
        )
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.sources_seen: list[str] = []
        if cfg.resume:
            self.resume(cfg.resume)

    # -- data ----------------------------------------------------------------------------
    def _build_stream(
        self, seed_offset: int = 0, only: Sequence[int] | None = None
    ) -> data_mod.MixtureStream:
        if not hasattr(self, "_sources"):
            sources_cfg = list(self.cfg.data.get("sources") or [])
            if not sources_cfg:
                raise ValueError("data.sources is empty: list at least one source")
            base = self.cfg.data.get("base_dir")
            self._sources, self._weights = [], []
            for spec in sources_cfg:
                spec = dict(spec)
                self._weights.append(float(spec.pop("weight", 1.0)))
                self._sources.append(data_mod.build_source(spec, base))
        keep = range(len(self._sources)) if only is None else [int(i) for i in only]
        if not keep or max(keep) >= len(self._sources):
            raise ValueError(f"source indices {list(keep)} do not fit {len(self._sources)} sources")
        return data_mod.MixtureStream(
            [self._sources[i] for i in keep],
            [self._weights[i] for i in keep],
            seed=self.cfg.seed + 7919 * seed_offset,
            rank=self.rank,
        )

    # -- state ---------------------------------------------------------------------------
    @property
    def raw_module(self) -> TrainModule:
        """The TrainModule without DDP wrapping."""
        return self.accelerator.unwrap_model(self.module)

    def state_dir(self, step: int) -> Path:
        """Folder of the resumable state at ``step``."""
        return self.out / "state" / f"step-{step:07d}"

    def save_state(self) -> Path:
        """Write a resumable state (model, optimiser, schedule, EMA, data RNG of every rank)."""
        acc = self.accelerator
        d = self.state_dir(self.step)
        acc.wait_for_everyone()
        if acc.is_main_process:
            d.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "module": self.raw_module.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "ema": self.ema.state_dict(),
                    "step": self.step,
                    "torch_rng": torch.get_rng_state(),
                },
                d / "trainer.pt",
            )
        acc.wait_for_everyone()
        torch.save(
            {
                "stream": self.stream.state_dict(),
                "generator": self.generator.get_state(),
                # plain tensors and strings, so resuming needs no unpickling (weights_only)
                "pending": None if self.batches.pending is None else asdict(self.batches.pending),
            },
            d / f"data_rank{self.rank}.pt",
        )
        acc.wait_for_everyone()
        if acc.is_main_process:
            states = sorted((self.out / "state").glob("step-*"))
            for old in states[: max(0, len(states) - self.cfg.keep_states)]:
                for f in old.iterdir():
                    f.unlink()
                old.rmdir()
        return d

    def resume(self, where: str | bool) -> None:
        """Restore the latest state in ``output_dir/state`` (``True``/"auto") or a given folder."""
        if where is True or where == "auto":
            states = sorted((self.out / "state").glob("step-*"))
            if not states:
                return  # nothing to resume: a fresh start
            d = states[-1]
        else:
            d = Path(str(where))
        if not (d / "trainer.pt").is_file():
            raise ValueError(f"no resumable state in {str(d)!r} (expected trainer.pt)")
        blob = torch.load(d / "trainer.pt", map_location="cpu", weights_only=True)
        self.raw_module.load_state_dict(blob["module"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self.ema.load_state_dict(blob["ema"])
        self.step = int(blob["step"])
        torch.set_rng_state(blob["torch_rng"])
        f = d / f"data_rank{self.rank}.pt"
        if f.is_file():  # absent when resuming with more ranks than the run had
            state = torch.load(f, map_location="cpu", weights_only=True)
            self.stream.load_state_dict(state["stream"])
            self.generator.set_state(state["generator"])
            pending = state["pending"]
            self.batches.pending = None if pending is None else data_mod.Sample(**pending)

    # -- loop ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_batch(self, batch: data_mod.Batch, use_ema: bool = False) -> dict[str, float]:
        """Loss terms on a batch without updating anything (posterior mean, eval mode)."""
        module = self.raw_module
        if use_ema:
            module = copy.deepcopy(module)
            self.ema.copy_to(module)
        was_training = module.training
        module.eval()
        device = self.accelerator.device
        batch = data_mod.Batch(batch.tokens.to(device), batch.kinds, batch.captions, batch.sources)
        try:
            with self.accelerator.autocast():
                out = module(batch.tokens.feats, batch.tokens.coords, False)
                terms = self.objective(out, batch, self.quantized)
        finally:
            module.train(was_training)
        return {k: float(v) for k, v in terms.items()}

    def train_step(self, batch: data_mod.Batch) -> dict[str, float]:
        """One optimiser step (or one accumulation micro-step) on a batch."""
        acc = self.accelerator
        device = acc.device
        batch = data_mod.Batch(batch.tokens.to(device), batch.kinds, batch.captions, batch.sources)
        with acc.accumulate(self.module):
            with acc.autocast():
                out = self.module(
                    batch.tokens.feats,
                    batch.tokens.coords,
                    self.objective.sample_posterior,
                    self.generator,
                )
                terms = self.objective(out, batch, self.quantized)
            loss = terms["total"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {float(loss)} at step {self.step}")
            acc.backward(loss)
            if acc.sync_gradients and self.cfg.grad_clip:
                acc.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        row = {k: float(v.detach()) for k, v in terms.items()}
        row["tokens"] = float(len(batch.tokens))
        row["items"] = float(batch.size)
        return row

    def fit(self) -> TrainResult:
        """Run to ``steps`` optimiser steps, logging, saving states and exporting weights."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        writer = self._tensorboard() if acc.is_main_process else None
        csv_path = self.out / "metrics.csv"
        self._csv_columns: list[str] | None = None
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (cfg.progress and acc.is_main_process),
            desc=cfg.name,
            dynamic_ncols=True,
        )
        t0 = time.time()
        last = time.time()
        micro = 0
        try:
            while self.step < cfg.steps:
                batch = next(self.batches)
                if cfg.record_sources:
                    self.sources_seen += batch.sources
                row = self.train_step(batch)
                micro += 1
                if micro % cfg.grad_accum:
                    continue
                self.scheduler.step()
                self.ema.update(self.raw_module)
                self.step += 1
                now = time.time()
                row.update(
                    step=float(self.step),
                    lr=float(self.scheduler.get_last_lr()[-1]),
                    seconds=now - t0,
                    tokens_per_s=row["tokens"] / max(now - last, 1e-9),
                    logit_scale=float(self.raw_module.logit_scale.detach()),
                    logit_bias=float(self.raw_module.logit_bias.detach()),
                )
                last = now
                self.history.append(row)
                bar.update(1)
                if acc.is_main_process and (
                    self.step % cfg.log_every == 0 or self.step == cfg.steps
                ):
                    bar.set_postfix(loss=f"{row['total']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                    self._log(csv_path, writer, row)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_state()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        seconds = time.time() - t0
        ckpt, raw = self.export()
        if cfg.save_every:
            self.save_state()
        losses = [r["total"] for r in self.history] or [float("nan")]
        return TrainResult(
            self.out,
            ckpt,
            raw,
            self.step,
            seconds,
            losses[0],
            losses[-1],
            self.history,
            self.sources_seen,
        )

    def export(self) -> tuple[Path, Path]:
        """Write ``model.safetensors`` (EMA weights) and ``model_raw.safetensors``."""
        acc = self.accelerator
        acc.wait_for_everyone()
        ema_path, raw_path = self.out / "model.safetensors", self.out / "model_raw.safetensors"
        if acc.is_main_process:
            module = self.raw_module
            meta = {"step": str(self.step), "stage": self.cfg.name}
            cfg_raw = export_config(module.model, module)
            save_model(module.model, raw_path, cfg_raw, self.cfg.export_dtype, meta)
            ema_module = copy.deepcopy(module).float()
            self.ema.copy_to(ema_module)
            save_model(
                ema_module.model,
                ema_path,
                export_config(ema_module.model, ema_module),
                self.cfg.export_dtype,
                meta,
            )
        acc.wait_for_everyone()
        return ema_path, raw_path

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(log_dir=str(self.out / "tb"))

    def _log(self, csv_path: Path, writer, row: dict[str, float]) -> None:
        if self._csv_columns is None:  # once per run: a resumed run keeps its file's columns
            if csv_path.exists():
                with csv_path.open(newline="") as f:
                    self._csv_columns = next(csv.reader(f), None) or list(LOG_COLUMNS)
            else:
                self._csv_columns = list(LOG_COLUMNS)
                with csv_path.open("w", newline="") as f:
                    csv.writer(f).writerow(self._csv_columns)
        with csv_path.open("a", newline="") as f:
            csv.writer(f).writerow(
                ["" if k not in row else f"{row[k]:.6g}" for k in self._csv_columns]
            )
        if writer is not None:
            for k, v in row.items():
                if k not in ("step", "seconds"):
                    writer.add_scalar(f"train/{k}", v, int(row["step"]))


def train_from_config(path_or_dict: str | Path | Mapping[str, Any], **overrides) -> TrainResult:
    """Run one training stage from a YAML path or a mapping; keyword overrides win (dotted ok).

    Runs in this process, on whatever accelerate sees (use ``accelerate launch`` / ``torchrun``
    for several processes or machines, or `train_multiprocess` for several local CPU processes).
    """
    cfg = load_train_config(path_or_dict, **overrides)
    return Trainer(cfg).fit()


def set_local_rank_env(rank: int, world: int, port: int) -> None:
    """The environment torch.distributed / accelerate read, for process ``rank`` of ``world``
    on this machine (rendezvous on 127.0.0.1:``port``)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )


def _spawned(rank: int, world: int, port: int, cfg: dict[str, Any], result_path: str) -> None:
    set_local_rank_env(rank, world, port)
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.get("threads") or 1))
    result = Trainer(load_train_config(cfg)).fit()
    if rank == 0:  # paths as strings: the parent reads it back with weights_only=True
        out = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
        torch.save(out, result_path)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train_multiprocess(
    path_or_dict: str | Path | Mapping[str, Any], num_processes: int = 2, **overrides
) -> TrainResult:
    """Data-parallel training in ``num_processes`` local CPU processes (gloo), no launcher needed.

    Each process runs ``threads`` threads (default 1), so 2 processes use 2 cores without
    OpenMP oversubscription. Returns rank 0's result.
    """
    import socket
    import tempfile

    import torch.multiprocessing as mp

    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    cfg = load_train_config(path_or_dict, **overrides)
    if num_processes == 1:
        return Trainer(cfg).fit()
    raw = cfg.to_dict()
    raw["cpu"] = True
    raw["threads"] = raw.get("threads") or 1
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "result.pt")
        mp.spawn(_spawned, args=(num_processes, port, raw, path), nprocs=num_processes, join=True)
        out = torch.load(path, weights_only=True)
    for key in ("output_dir", "checkpoint", "raw_checkpoint"):
        out[key] = Path(out[key])
    return TrainResult(**out)


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def reconstruct_arrays(
    model: ATokenModel, items: Sequence[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(target, reconstruction) uint8 pairs ``[T, H, W, 3]`` of images / videos (centre crops)."""
    from atoken.patchify import detokenize, prepare_clip, tokenize

    out = []
    for item in items:
        x = data_mod._float_pixels(item)
        kind = "image" if x.dim() == 3 else "video"
        tok = tokenize([x]).to(model.device, model.dtype)
        rec, _ = model.reconstruct(tok)
        r = detokenize(SparseTensor(rec.feats.float().cpu(), rec.coords.cpu()), kind)[0]
        clip = prepare_clip(x)
        t = clip[:1] if kind == "image" else clip[: r.shape[0]]
        out.append(
            (
                to_uint8(t),
                to_uint8(r.permute(0, 2, 3, 1)),
            )
        )
    return out


def patch_vectors(image: np.ndarray) -> np.ndarray:
    """float64 ``[h, w, 768]`` 16x16x3 patches (0..255) of the centre crop to multiples of 16.

    The crop is the model's input crop (`crop_box`); the per-patch PCA baselines work on these.
    """
    a = data_mod.as_rgb_u8(image)
    top, left, ch, cw = crop_box(a.shape[0], a.shape[1])
    h, w = ch // 16, cw // 16
    a = a[top : top + ch, left : left + cw].astype(np.float64)
    return a.reshape(h, 16, w, 16, 3).transpose(0, 2, 1, 3, 4).reshape(h, w, 768)


def pca_reconstruct(
    images: Sequence[np.ndarray], components: int = 48, fit_on: Sequence[np.ndarray] | None = None
) -> list[np.ndarray]:
    """Per-patch PCA baseline: 16x16x3 patches -> ``components`` numbers -> patches.

    The basis (and mean patch) is fitted on the patches of ``fit_on`` (default: ``images``
    themselves, an oracle fit); images are centre-cropped to multiples of 16 like the model's
    input. Returns uint8 ``[H', W', 3]`` reconstructions.
    """
    grids = [patch_vectors(a) for a in images]
    fit_grids = grids if fit_on is None else [patch_vectors(a) for a in fit_on]
    fit = np.concatenate([g.reshape(-1, 768) for g in fit_grids])
    if not 1 <= components <= 768:
        raise ValueError(f"components must be in 1..768, got {components}")
    mu = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - mu, full_matrices=False)
    basis = vt[:components]
    out = []
    for g in grids:
        h, w = g.shape[:2]
        r = (g - mu) @ basis.T @ basis + mu
        img = r.reshape(h, w, 16, 16, 3).transpose(0, 2, 1, 3, 4).reshape(16 * h, 16 * w, 3)
        out.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
    return out


def read_metrics(output_dir: str | Path) -> list[dict[str, float]]:
    """Rows of a run's ``metrics.csv`` as floats (empty cells skipped)."""
    path = Path(output_dir) / "metrics.csv"
    if not path.is_file():
        raise ValueError(f"no metrics.csv in {str(output_dir)!r}")
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


@torch.no_grad()
def evaluate_world(
    model: ATokenModel,
    text_tower: TextTower | str,
    kind: str = "image",
    *,
    split: str = "held_out",
    count: int = 64,
    seed: int = 0,
    size: int = 96,
    frames: int = 16,
    max_voxels: int | None = 1024,
) -> dict[str, float]:
    """Zero-shot accuracy on generated scenes (`atoken.world`), by default held-out pairs.

    Each scene is scored against every colour + shape label of its modality (64 for images and
    videos, 40 for 3D; template-ensembled prompts as in `atoken.zeroshot`). Returns the exact
    label accuracy, the colour and shape accuracies of the predicted label, the chance level
    and, for videos, the accuracy of picking the motion among the 7 captions that differ only
    in their motion. 3D scenes keep at most ``max_voxels`` voxels (random subset).
    """
    from atoken import world
    from atoken.zeroshot import label_embeddings

    tower = text_tower_from_spec(text_tower)
    if tower is None:
        raise ValueError("evaluate_world needs a text tower")
    rng = np.random.default_rng(seed)
    specs = [world.sample_spec(rng, kind, split) for _ in range(count)]
    labels = world.label_set(kind)
    emb = label_embeddings(labels, tower, modality=kind).float()
    model.eval()
    feats = []
    for spec in specs:
        if kind == "image":
            s = data_mod.image_sample(world.render_image(spec, size))
        elif kind == "video":
            s = data_mod.video_sample(world.render_video(spec, size, frames))
        else:
            f, c = world.render_voxels(spec)
            s = data_mod.voxel_sample(
                f, c, max_tokens=max_voxels, rng=np.random.default_rng(spec.seed)
            )
        batch = data_mod.collate([s])
        x = batch.tokens.to(model.device, model.dtype)
        feats.append(F.normalize(model.encode(x).pooled.float(), dim=-1).cpu())
    pooled = torch.cat(feats)
    pred = (pooled @ emb.T.cpu()).argmax(1).tolist()
    truth = [f"{s.colour} {s.shape}" for s in specs]
    out = {
        "count": float(count),
        "labels": float(len(labels)),
        "chance": 1.0 / len(labels),
        "accuracy": float(np.mean([labels[p] == t for p, t in zip(pred, truth)])),
        "colour_accuracy": float(
            np.mean([labels[p].split()[0] == s.colour for p, s in zip(pred, specs)])
        ),
        "shape_accuracy": float(
            np.mean([labels[p].split()[-1] == s.shape for p, s in zip(pred, specs)])
        ),
    }
    if kind == "video":
        hits = []
        for f, s in zip(pooled, specs):
            options = [f"{s.colour} {s.shape} {m}" for m in world.MOTIONS]
            e = label_embeddings(options, tower, modality="video").float().cpu()
            hits.append(world.MOTIONS[int((e @ f).argmax())] == s.motion)
        out["motion_accuracy"] = float(np.mean(hits))
        out["motion_chance"] = 1.0 / len(world.MOTIONS)
    return out
