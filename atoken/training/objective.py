"""The training objective (§3.5) on a batch: reconstruction, semantic and KL terms by modality."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from atoken.core.model import ATokenModel, Encoded
from atoken.core.patchify import VOXEL_CHANNELS, unpatchify
from atoken.core.sparse import SparseTensor
from atoken.training import data as data_mod
from atoken.training.losses import (
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
from atoken.training.standins import build_teacher, text_tower_from_spec


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


def _feature_size(value: Any) -> int | None:
    """``loss.image.feature_size``: a side in pixels, or ``native`` for each image's own size."""
    if value is None or str(value).strip().lower() == "native":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"loss.image.feature_size must be a side in pixels or 'native', got {value!r}"
        ) from None


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
            if (
                net_spec.get("layout") == EFFNET_LAYOUT
            ):  # ImageNet-trained (atoken.pipelines.effnet)
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
            feature_size=_feature_size(image.get("feature_size", 224)),
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
