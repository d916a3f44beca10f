"""Transformer pieces of the AToken trunk: norms, attention, blocks, position table, pooling head.

Module and parameter names equal the official state_dict names, so checkpoints load as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atoken.core.attention import attention
from atoken.core.config import TrunkConfig
from atoken.core.rope import apply_rope, rope_angles


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (official ``LayerNorm32``)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class RMSNorm32(nn.Module):
    """RMSNorm in float32 with the official rounding to the input dtype before the weight."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (y.float() * self.weight.float()).to(x.dtype)


class MultiHeadRMSNorm(nn.Module):
    """Per-head qk norm: ``normalize(x) * gamma[head] * sqrt(head_dim)`` in float32."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(heads, head_dim))

    def forward(self, x: Tensor) -> Tensor:  # [N, H, D]
        y = F.normalize(x.float(), dim=-1) * self.gamma.float() * math.sqrt(x.shape[-1])
        return y.to(x.dtype)


class FeedForward(nn.Module):
    """Linear -> GELU (tanh) -> Linear, stored as ``mlp.mlp.0`` / ``mlp.mlp.2``."""

    def __init__(self, channels: int, hidden: int, bias: bool):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden, bias=bias),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden, channels, bias=bias),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


@dataclass
class KVCache:
    """Keys (after qk-norm, before RoPE) and values of the previous chunk's last frames."""

    keys: list[Tensor] = field(default_factory=list)  # per layer [M, H, D]
    values: list[Tensor] = field(default_factory=list)
    positions: Tensor | None = None  # [M, 4] (t, x, y, z), t re-based to 0..K-1
    seqlens: list[int] = field(default_factory=list)  # rows per batch item


@dataclass
class Context:
    """What every block of one forward pass needs: segments, RoPE angles, optional KV cache."""

    seqlens: list[int]
    angles: Tensor | None = None  # [N, D/2]
    cache_in: KVCache | None = None  # keys/values to prepend
    cache_out: KVCache | None = None  # where to store this pass's keys/values
    cache_rows: Tensor | None = None  # rows of this pass to store (bool [N])
    cache_angles: Tensor | None = None  # angles of cache_in keys
    layer: int = 0


class SelfAttention(nn.Module):
    """Multi-head self-attention with optional qk norm and 4D RoPE (official ``SparseMultiHeadAttention``)."""

    def __init__(self, channels: int, heads: int, bias: bool, qk_rms_norm: bool, rope: bool):
        super().__init__()
        self.heads = heads
        self.head_dim = channels // heads
        self.use_rope = rope
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=bias)
        self.to_out = nn.Linear(channels, channels, bias=bias)
        self.qk_rms_norm = qk_rms_norm
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(heads, self.head_dim)
            self.k_rms_norm = MultiHeadRMSNorm(heads, self.head_dim)

    def forward(self, x: Tensor, ctx: Context, softcap: float | None = None) -> Tensor:
        n = x.shape[0]
        qkv = self.to_qkv(x).view(n, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(1)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        seqlens_k = None
        if ctx.cache_out is not None and ctx.cache_rows is not None:
            ctx.cache_out.keys.append(k[ctx.cache_rows])
            ctx.cache_out.values.append(v[ctx.cache_rows])
        if self.use_rope and ctx.angles is not None:
            q = apply_rope(q, ctx.angles)
            k = apply_rope(k, ctx.angles)
        if ctx.cache_in is not None and ctx.cache_in.keys:
            ck = ctx.cache_in.keys[ctx.layer]
            if self.use_rope:
                ck = apply_rope(ck, ctx.cache_angles)
            k, v, seqlens_k = _prepend_per_item(
                ck, ctx.cache_in.values[ctx.layer], ctx.cache_in.seqlens, k, v, ctx.seqlens
            )
        o = attention(q, k, v, ctx.seqlens, seqlens_k=seqlens_k, softcap=softcap)
        return self.to_out(o.reshape(n, -1))


def _prepend_per_item(ck, cv, cache_lens, k, v, seqlens):
    """Keys/values per batch item as [cached rows of item b; current rows of item b]."""
    ks, vs, lens = [], [], []
    ci = i = 0
    for b, n in enumerate(seqlens):
        m = cache_lens[b] if b < len(cache_lens) else 0
        ks += [ck[ci : ci + m], k[i : i + n]]
        vs += [cv[ci : ci + m], v[i : i + n]]
        lens.append(m + n)
        ci, i = ci + m, i + n
    return torch.cat(ks), torch.cat(vs), lens


class Block(nn.Module):
    """Pre-norm transformer block: ``x += attn(norm1(x)); x += mlp(norm2(x))``."""

    def __init__(self, cfg: TrunkConfig, rope: bool = True):
        super().__init__()
        norm = (
            (lambda: RMSNorm32(cfg.channels))
            if cfg.use_rms_norm
            else (lambda: LayerNorm32(cfg.channels, eps=1e-6, bias=cfg.use_bias))
        )
        self.norm1 = norm()
        self.attn = SelfAttention(cfg.channels, cfg.num_heads, cfg.use_bias, cfg.qk_rms_norm, rope)
        self.norm2 = norm()
        self.mlp = FeedForward(cfg.channels, cfg.mlp_channels, cfg.use_bias)

    def forward(self, x: Tensor, ctx: Context, softcap: float | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), ctx, softcap)
        return x + self.mlp(self.norm2(x))


class PositionTable2D(nn.Module):
    """Learned 16x16 table, resized per item to (max x + 1, max y + 1) and gathered at (x, y)."""

    def __init__(self, channels: int, grid: int = 16):
        super().__init__()
        self.grid = grid
        self.position_embedding = nn.Embedding(grid * grid, channels)

    def forward(self, coords: Tensor, seqlens: list[int]) -> Tensor:
        """Embeddings ``[N, C]`` for coords ``[N, 5]`` (b, t, x, y, z) of contiguous items."""
        w = self.position_embedding.weight
        table = w.float().reshape(self.grid, self.grid, -1).permute(2, 0, 1)[None]
        out = torch.empty(coords.shape[0], w.shape[1], dtype=w.dtype, device=w.device)
        start = 0
        for n in seqlens:
            if n == 0:
                continue
            c = coords[start : start + n]
            xs, ys = c[:, 2].long(), c[:, 3].long()
            h, wd = int(xs.max()) + 1, int(ys.max()) + 1
            resized = F.interpolate(
                table, size=(h, wd), mode="bilinear", align_corners=False, antialias=True
            )[0]  # [C, h, w]
            out[start : start + n] = resized[:, xs, ys].T.to(w.dtype)
            start += n
        return out


class AttentionPoolingHead(nn.Module):
    """SigLIP-style MAP head: one probe query attends over an item's tokens, then LN + MLP."""

    def __init__(self, channels: int, heads: int, mlp_channels: int):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.randn(channels))
        self.attention = nn.Module()
        self.attention.to_q = nn.Linear(channels, channels)
        self.attention.to_kv = nn.Linear(channels, 2 * channels)
        self.attention.to_out = nn.Linear(channels, channels)
        self.layernorm = LayerNorm32(channels, eps=1e-6)
        self.mlp = FeedForward(channels, mlp_channels, bias=True)

    def forward(self, x: Tensor, seqlens: list[int]) -> tuple[Tensor, Tensor]:
        """Pooled features ``[B, C]`` (unnormalised) and the attention output after ``to_out``."""
        b, c = len(seqlens), x.shape[1]
        d = c // self.heads
        q = self.attention.to_q(self.probe.to(x.dtype)[None].expand(b, c)).view(b, self.heads, d)
        kv = self.attention.to_kv(x).view(x.shape[0], 2, self.heads, d)
        o = attention(q, kv[:, 0], kv[:, 1], [1] * b, seqlens_k=seqlens)
        h = self.attention.to_out(o.reshape(b, c))
        return h + self.mlp(self.layernorm(h)), h


@dataclass
class PoolState:
    """Running online-softmax sums of the pooling head over one item's tokens (streaming)."""

    max: Tensor  # [H]
    denom: Tensor  # [H]
    acc: Tensor  # [H, D]


def pool_update(head: AttentionPoolingHead, state: PoolState | None, x: Tensor) -> PoolState:
    """Fold tokens ``x [n, C]`` of one item into the streaming pooling state (exact, float32)."""
    c = x.shape[1]
    d = c // head.heads
    q = head.attention.to_q(head.probe.to(x.dtype)).view(head.heads, d).float()
    kv = head.attention.to_kv(x).view(x.shape[0], 2, head.heads, d).float()
    s = torch.einsum("hd,nhd->hn", q, kv[:, 0]) / math.sqrt(d)  # [H, n]
    m_new = s.max(-1).values
    if state is not None:
        m_new = torch.maximum(m_new, state.max)
    p = torch.exp(s - m_new[:, None])
    acc = torch.einsum("hn,nhd->hd", p, kv[:, 1])
    denom = p.sum(-1)
    if state is not None:
        r = torch.exp(state.max - m_new)
        acc = acc + state.acc * r[:, None]
        denom = denom + state.denom * r
    return PoolState(m_new, denom, acc)


def pool_finish(head: AttentionPoolingHead, state: PoolState, dtype: torch.dtype) -> Tensor:
    """Unnormalised pooled feature ``[1, C]`` from a streaming state."""
    o = (state.acc / state.denom[:, None]).reshape(1, -1).to(dtype)
    h = head.attention.to_out(o)
    return h + head.mlp(head.layernorm(h))


def chunk_positions(coords: Tensor) -> Tensor:
    """RoPE positions (t, x, y, z) ``[N, 4]`` from coords ``[N, 5]``."""
    return coords[:, 1:5]


def rope_for(coords: Tensor, head_dim: int) -> Tensor:
    """RoPE angles for coords ``[N, 5]``."""
    return rope_angles(chunk_positions(coords), head_dim)
