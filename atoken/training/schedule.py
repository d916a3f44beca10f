"""Optimiser pieces: the weight EMA, the learning-rate schedule and parameter groups."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from atoken.training.objective import TrainModule


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
