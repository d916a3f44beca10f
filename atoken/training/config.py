"""A training stage's config: `TrainConfig`, read from YAML or a dict with overrides."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """One training stage. Nested sections are plain mappings (see ``configs/train/*.yaml``).

    ``data``: ``token_budget``, ``max_items`` and ``sources`` (each a mapping with ``type`` and
    ``weight``; types in `atoken.training.data.SOURCE_TYPES`).
    ``loss``: ``weights`` (reconstruction, semantic, kl), ``image`` (l1, lpips, gram,
    perceptual and mse weights and ``feature_net``: ``{layout, seed, path}``; layout
    ``effnet-lite0`` is the ImageNet-trained EfficientNet-Lite0; ``feature_size``: 224 (the
    paper's square copies) or ``native``), ``sample_posterior``.
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
    return TrainConfig.from_dict(_merge(read_config(path_or_dict, "training"), overrides))


def read_config(path_or_dict: str | Path | Mapping[str, Any], what: str) -> dict[str, Any]:
    """The mapping of a YAML config file (or a copy of a given mapping), with clear errors."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    path = Path(path_or_dict)
    if not path.is_file():
        raise ValueError(f"{what} config not found: {str(path)!r}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"cannot parse {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a {what} config must be a mapping")
    return raw
