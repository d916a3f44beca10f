"""The 3D Gaussian decoder: voxel features -> 32 Gaussians per voxel (§5, official ``decoder_gs``).

Parameter names follow the official ``SLatGaussianDecoder``: ``input_layer``, ``blocks.i``,
``out_layer`` and the persistent buffer ``offset_perturbation``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atoken.core.cameras import radical_inverse
from atoken.core.config import GSDecoderConfig, TrunkConfig
from atoken.core.gaussians import Gaussians, activate_opacity, activate_rotation, activate_scaling
from atoken.core.sparse import SparseTensor, check_contiguous_batches
from atoken.core.transformer import Block, Context


def absolute_position_embedding(coords_xyz: Tensor, channels: int) -> Tensor:
    """Sinusoidal code of integer voxel positions ``[N, 3]`` -> ``[N, channels]`` (float32).

    Per axis ``[sin(p f_k), cos(p f_k)]`` with ``f_k = 10000^(-k / F)``, ``F = channels // 6``;
    axes concatenated x, y, z and zero-padded to ``channels``.
    """
    nfreq = channels // 3 // 2
    freqs = 1.0 / 10000 ** (
        torch.arange(nfreq, dtype=torch.float32, device=coords_xyz.device) / nfreq
    )
    p = coords_xyz.float()[:, :, None] * freqs  # [N, 3, F]
    emb = torch.cat([torch.sin(p), torch.cos(p)], -1).reshape(coords_xyz.shape[0], -1)
    return F.pad(emb, (0, channels - emb.shape[1]))


def hammersley_perturbation(num_gaussians: int, voxel_size: float = 1.5) -> Tensor:
    """The official ``offset_perturbation``: atanh((2h - 1) / voxel_size) of 3-D Hammersley points."""
    pts = torch.tensor(
        [
            [i / num_gaussians, radical_inverse(2, i), radical_inverse(3, i)]
            for i in range(num_gaussians)
        ],
        dtype=torch.float32,
    )
    return torch.atanh((pts * 2 - 1) / voxel_size)


def window_segments(coords: Tensor, window: int, shift: int) -> tuple[Tensor, list[int]]:
    """Order of rows grouped by shifted window ``(b, (x+s)//w, (y+s)//w, (z+s)//w)`` and sizes."""
    c = coords.long()
    w = (c[:, 1:] + shift) // window
    key = c[:, 0]
    for axis in range(3):
        key = key * (int(w[:, axis].max()) + 1) + w[:, axis]
    order = torch.argsort(key, stable=True)
    _, counts = torch.unique_consecutive(key[order], return_counts=True)
    return order, counts.tolist()


class GaussianDecoder(nn.Module):
    """Shifted-window transformer over occupied voxels with a Gaussian head."""

    def __init__(self, config: GSDecoderConfig):
        super().__init__()
        self.config = config
        trunk = TrunkConfig(
            config.channels,
            config.num_blocks,
            config.num_heads,
            config.mlp_channels,
            use_bias=False,
            use_rms_norm=True,
            qk_rms_norm=False,
        )
        self.input_layer = nn.Linear(config.latent_channels, config.channels, bias=False)
        self.blocks = nn.ModuleList(Block(trunk, rope=False) for _ in range(config.num_blocks))
        self.out_layer = nn.Linear(config.channels, config.out_channels)
        self.register_buffer(
            "offset_perturbation",
            hammersley_perturbation(config.num_gaussians, config.voxel_size),
            persistent=True,
        )

    def forward_features(self, x: SparseTensor, trace: dict | None = None) -> Tensor:
        """Raw head output ``[N, 14 * num_gaussians]`` for voxels with coords ``(b, x, y, z)``."""
        if x.coords.shape[1] != 4:
            raise ValueError(
                f"the GS decoder takes coords (b, x, y, z), got {tuple(x.coords.shape)}"
            )
        check_contiguous_batches(x.coords)
        dtype = self.input_layer.weight.dtype
        h = self.input_layer(x.feats.to(dtype))
        pe = absolute_position_embedding(x.coords[:, 1:], self.config.channels).to(dtype)
        h = h + pe
        if trace is not None:
            trace.update({"input_layer": h - pe, "pos_embed": pe, "block0_input": h})
        ws = self.config.window_size
        for i, block in enumerate(self.blocks):
            order, sizes = window_segments(x.coords, ws, ws // 2 if i % 2 else 0)
            # Official quirk: when every window holds exactly `window_size` tokens, flash-attn's
            # fixed-length kernel runs, which has no softcap.
            softcap = None if all(n == ws for n in sizes) else self.config.softcap
            inv = torch.empty_like(order)
            inv[order] = torch.arange(order.numel(), device=order.device)
            h = block(h[order], Context(seqlens=sizes), softcap)[inv]
            if trace is not None:
                trace[f"block{i}_output"] = h
        h = F.layer_norm(h, (h.shape[1],), eps=1e-5)
        if trace is not None:
            trace["after_final_layer_norm"] = h
        return self.out_layer(h)

    def to_gaussians(self, raw: Tensor, coords: Tensor) -> list[Gaussians]:
        """Head output -> one :class:`Gaussians` per batch item (official ``to_representation``)."""
        cfg, g = self.config, self.config.num_gaussians
        raw = raw.float()
        n = raw.shape[0]
        parts = raw.split([3 * g, 3 * g, 3 * g, 4 * g, g], dim=1)
        lr = cfg.lr
        pert = self.offset_perturbation.to(raw.dtype)
        centre = (coords[:, 1:].float() + 0.5) / cfg.resolution  # [N, 3]
        off = parts[0].reshape(n, g, 3) * lr["_xyz"]
        if cfg.perturb_offset:
            off = off + pert
        xyz = centre[:, None] + torch.tanh(off) / cfg.resolution * 0.5 * cfg.voxel_size
        feats_dc = parts[1].reshape(n, g, 1, 3) * lr["_features_dc"]
        scaling = parts[2].reshape(n, g, 3) * lr["_scaling"]
        rotation = parts[3].reshape(n, g, 4) * lr["_rotation"]
        opacity = parts[4].reshape(n, g, 1) * lr["_opacity"]
        out = []
        batch = coords[:, 0]
        for b in range(int(batch.max()) + 1 if n else 0):
            m = batch == b
            rot = rotation[m].reshape(-1, 4)
            out.append(
                Gaussians(
                    xyz=xyz[m].reshape(-1, 3) - 0.5,
                    features_dc=feats_dc[m].reshape(-1, 1, 3),
                    scaling=activate_scaling(
                        scaling[m].reshape(-1, 3), cfg.scaling_bias, cfg.filter_3d
                    ),
                    rotation=activate_rotation(rot),
                    opacity=activate_opacity(opacity[m].reshape(-1, 1), cfg.opacity_bias),
                    raw_rotation=rot + rot.new_tensor([1.0, 0.0, 0.0, 0.0]),
                )
            )
        return out

    def forward(self, x: SparseTensor) -> list[Gaussians]:
        """Voxel features ``[N, 768]`` + coords ``(b, x, y, z)`` -> Gaussians per batch item."""
        if len(x) == 0:
            raise ValueError("the GS decoder got no voxels")
        x = x.to(self.input_layer.weight.device)
        return self.to_gaussians(self.forward_features(x), x.coords)
