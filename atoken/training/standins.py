"""Stand-ins for offline runs and tests: a bag-of-words text tower and a random conv teacher."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atoken.text.towers import TextTower
from atoken.training.losses import (
    ConvFeatureNet,
    PooledEmbedder,
)


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
    """``None``, ``"random:<dim>"``, or anything `atoken.text.towers.load_text_tower` accepts."""
    if spec is None or isinstance(spec, TextTower):
        return spec
    if str(spec).startswith("random:"):
        return RandomTextTower(int(str(spec).split(":", 1)[1]))
    from atoken.text.towers import load_text_tower

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
