"""Exported checkpoints: the EMA weights in the official key format with the config inside."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from atoken.core import checkpoint as _ckpt
from atoken.core.checkpoint import CONFIG_KEY, ENCODER_FROM_KEY, save_checkpoint
from atoken.core.checkpoint import load as load_model
from atoken.core.config import ATokenConfig
from atoken.core.model import ATokenModel
from atoken.training.objective import TrainModule


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
