"""ATokenModel: encode sparse tokens to a KL/FSQ latent and a pooled feature, decode back (§2)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from atoken.core.config import ATokenConfig, TrunkConfig
from atoken.core.quantizers import FSQ
from atoken.core.sparse import SparseTensor, check_contiguous_batches
from atoken.core.transformer import (
    AttentionPoolingHead,
    Block,
    Context,
    KVCache,
    LayerNorm32,
    PoolState,
    PositionTable2D,
    RMSNorm32,
    pool_finish,
    pool_update,
    rope_for,
)


@dataclass
class Encoded:
    """Encoder outputs; rows follow the input rows.

    ``mean``/``logvar`` ``[N, L]`` float32 (the diagonal Gaussian posterior), ``pooled [B, C]``
    (L2-normalised attention-pooled feature), ``hidden [N, C]`` (encoder output after its final
    norm), ``coords [N, 5]``.
    """

    mean: Tensor
    logvar: Tensor
    pooled: Tensor
    hidden: Tensor
    coords: Tensor

    @property
    def std(self) -> Tensor:
        """Posterior standard deviation ``exp(logvar / 2)``."""
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """``mean + temperature * std * eps`` with float32 noise from ``generator``."""
        noise = torch.randn(
            self.mean.shape, generator=generator, dtype=torch.float32, device=self.mean.device
        )
        return self.mean + temperature * self.std * noise

    def latent(self, *, sample: bool = False, seed: int | None = None, temperature: float = 1.0):
        """Posterior mean (default, deterministic) or a seeded sample, as a SparseTensor."""
        if not sample:
            return SparseTensor(self.mean, self.coords)
        gen = torch.Generator(device=self.mean.device)
        gen.manual_seed(0 if seed is None else int(seed))
        return SparseTensor(self.sample(gen, temperature), self.coords)


def temporal_chunks(t: Tensor, size: int) -> Iterator[tuple[int, int, Tensor]]:
    """(chunk index, start, rows) of consecutive blocks of ``size`` latent frames from min t."""
    if t.numel() == 0:
        return
    t0, t1 = int(t.min()), int(t.max())
    for j, start in enumerate(range(t0, t1 + 1, size)):
        rows = (t >= start) & (t < start + size)
        if bool(rows.any()):
            yield j, start, rows


def item_seqlens(coords: Tensor, batch_size: int) -> list[int]:
    """Rows per batch item (zeros included) for contiguous coords."""
    return torch.bincount(coords[:, 0].long(), minlength=batch_size).tolist()


class Trunk(nn.Module):
    """Shared part of encoder and decoder: input layer, resized position table, blocks."""

    def __init__(self, cfg: TrunkConfig, in_channels: int):
        super().__init__()
        self.cfg = cfg
        self.pos_embedder = PositionTable2D(cfg.channels)
        self.input_layer = nn.Linear(in_channels, cfg.channels, bias=cfg.use_bias)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.gradient_checkpointing = False

    def run_blocks(self, feats: Tensor, coords: Tensor, seqlens: list[int], **cache) -> Tensor:
        """Input layer + position table + blocks on one temporal chunk (t already re-based)."""
        h = self.input_layer(feats.to(self.input_layer.weight.dtype))
        h = h + self.pos_embedder(coords, seqlens)
        ctx = Context(seqlens=seqlens, angles=rope_for(coords, self.cfg.head_dim), **cache)
        for i, block in enumerate(self.blocks):
            ctx.layer = i
            if self.gradient_checkpointing and self.training:
                h = checkpoint(block, h, ctx, use_reentrant=False)
            else:
                h = block(h, ctx)
        return h


class Encoder(Trunk):
    """Encoder trunk + final LayerNorm + attention-pooling head."""

    def __init__(self, cfg: TrunkConfig, in_channels: int):
        super().__init__(cfg, in_channels)
        self.post_layernorm = LayerNorm32(cfg.channels, eps=1e-6)
        self.head = AttentionPoolingHead(cfg.channels, cfg.num_heads, cfg.mlp_channels)


class Decoder(Trunk):
    """Decoder trunk + final RMSNorm + output layer (no bias)."""

    def __init__(self, cfg: TrunkConfig, latent_channels: int, out_channels: int):
        super().__init__(cfg, latent_channels)
        self.out_norm = RMSNorm32(cfg.channels) if cfg.use_rms_norm else LayerNorm32(cfg.channels)
        self.out_layer = nn.Linear(cfg.channels, out_channels, bias=cfg.use_bias)


class ATokenModel(nn.Module):
    """The AToken autoencoder with official parameter names (``encoder.*``, ``proj``, ``decoder.*``)."""

    def __init__(self, config: ATokenConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder, config.in_channels)
        self.proj = nn.Linear(config.encoder.channels, 2 * config.latent_channels, bias=False)
        self.decoder = Decoder(config.decoder, config.latent_channels, config.out_channels)
        self.quantizer = (
            FSQ(config.quantizer_levels, config.quantizer_num_codebooks)
            if config.use_quantizer
            else None
        )

    # -- properties -----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights."""
        return self.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.proj.weight.device

    @property
    def logit_scale(self) -> float:
        """Zero-shot logit scale (log space; the released constant is 4.8438)."""
        return self.config.logit_scale

    @property
    def logit_bias(self) -> float:
        """Zero-shot logit bias (-15.5625 for the release)."""
        return self.config.logit_bias

    @property
    def is_discrete(self) -> bool:
        """True for FSQ models (So/D)."""
        return self.quantizer is not None

    @property
    def patch_t(self) -> int:
        """Frames per token."""
        return self.config.patch_size[0]

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in the backward pass (training memory saver)."""
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    # -- encoder --------------------------------------------------------------------------
    def _check(self, x: SparseTensor) -> None:
        if x.coords.shape[1] != 5:
            raise ValueError(
                f"tokens need coords [N, 5] (b, t, x, y, z), got {tuple(x.coords.shape)}"
            )
        check_contiguous_batches(x.coords)
        if x.coords.shape[0] and (int(x.coords.min()) < 0 or int(x.coords.max()) > 4095):
            raise ValueError("coordinates must lie in [0, 4095] (the official 12-bit packing)")

    def encode_hidden(self, x: SparseTensor) -> Tensor:
        """Encoder output after its final norm, ``[N, C]``, chunked over time as officially."""
        if x.feats.shape[1] != self.config.in_channels:
            raise ValueError(
                f"model expects {self.config.in_channels}-wide tokens, got {x.feats.shape[1]}"
            )
        self._check(x)
        size = self.config.frames_batch_size // self.patch_t
        batch = x.batch_size
        out = None
        for _, start, rows in temporal_chunks(x.coords[:, 1], size):
            c = x.coords[rows].clone()
            c[:, 1] -= start
            h = self.encoder.run_blocks(x.feats[rows], c, item_seqlens(c, batch))
            h = self.encoder.post_layernorm(h)
            if out is None:
                out = h.new_empty(x.feats.shape[0], h.shape[1])
            out[rows] = h
        assert out is not None, "no tokens to encode"
        return out

    def encode(self, x: SparseTensor, *, pool: bool = True) -> Encoded:
        """Tokens -> posterior (mean, logvar), pooled feature and hidden states.

        ``pool=False`` skips the pooling head (``pooled`` is then empty ``[0, C]``); streaming
        callers fold ``hidden`` into :meth:`pool_update` chunk by chunk instead.
        """
        if len(x) == 0:
            raise ValueError("cannot encode an empty token set")
        x = x.to(self.device)
        hidden = self.encode_hidden(x)
        pooled = self.pool(hidden, x.coords) if pool else hidden.new_zeros(0, hidden.shape[1])
        z = self.proj(hidden).float()
        mean, logvar = z.chunk(2, dim=1)
        return Encoded(mean, logvar, pooled, hidden, x.coords)

    def pool_update(self, state: PoolState | None, hidden: Tensor) -> PoolState:
        """Fold one chunk's hidden states of a single item into a streaming pooled feature."""
        return pool_update(self.encoder.head, state, hidden)

    def pool_finish(self, state: PoolState) -> Tensor:
        """The L2-normalised pooled feature ``[1, C]`` of a streamed item (exact)."""
        return F.normalize(pool_finish(self.encoder.head, state, self.dtype), dim=-1, eps=1e-12)

    def pool(self, hidden: Tensor, coords: Tensor) -> Tensor:
        """L2-normalised attention-pooled feature per batch item ``[B, C]``."""
        feat, _ = self.encoder.head(hidden, item_seqlens(coords, int(coords[:, 0].max()) + 1))
        return F.normalize(feat, dim=-1, eps=1e-12)

    # -- quantizer ------------------------------------------------------------------------
    def quantize(self, mean: Tensor) -> tuple[Tensor, Tensor]:
        """FSQ codes ``[N, 48]`` (values {-1, -.5, 0, .5}) and indices ``[N, 8]`` of the mean."""
        if self.quantizer is None:
            raise ValueError(f"model {self.config.name or ''} has no quantizer (use an FSQ preset)")
        return self.quantizer(mean[:, : self.quantizer.dim])

    def dequantize(self, indices: Tensor) -> Tensor:
        """FSQ indices ``[N, 8]`` -> codes ``[N, 48]``."""
        if self.quantizer is None:
            raise ValueError("model has no quantizer")
        return self.quantizer.dequantize(indices)

    def latent_for_decoding(
        self,
        enc: Encoded,
        *,
        sample: bool = False,
        seed: int | None = None,
        temperature: float = 1.0,
    ) -> SparseTensor:
        """What the decoder should see: FSQ codes of the mean for So/D, else mean or a sample."""
        if self.quantizer is not None:
            codes, _ = self.quantize(enc.mean)
            return SparseTensor(codes, enc.coords)
        return enc.latent(sample=sample, seed=seed, temperature=temperature)

    # -- decoder --------------------------------------------------------------------------
    def decode(
        self,
        latent: SparseTensor,
        chunk_stride: int | None = None,
        kv_cache: int | None = None,
    ) -> SparseTensor:
        """Latent tokens -> patch tokens ``[N, 3072]``; rows in the order of the input rows.

        ``chunk_stride`` and ``kv_cache`` are in video frames like the official constants
        (defaults 16 and 0: independent 4-latent-frame chunks). With ``kv_cache > 0`` each chunk
        after the first also attends to the previous chunk's last ``kv_cache`` frames.
        """
        if latent.feats.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"decoder expects {self.config.latent_channels} latent channels, got "
                f"{latent.feats.shape[1]}"
            )
        latent = latent.to(self.device)
        self._check(latent)
        stride_frames = self.config.frames_stride if chunk_stride is None else chunk_stride
        cache_frames = self.config.kv_cache_size if kv_cache is None else kv_cache
        if stride_frames <= 0 or stride_frames % self.patch_t or cache_frames % self.patch_t:
            raise ValueError(
                f"chunk_stride ({stride_frames}) and kv_cache ({cache_frames}) must be multiples "
                f"of {self.patch_t} frames, stride > 0"
            )
        stride, k = stride_frames // self.patch_t, cache_frames // self.patch_t
        if k > stride:
            raise ValueError(
                f"kv_cache ({cache_frames}) cannot exceed chunk_stride ({stride_frames})"
            )
        coords, batch = latent.coords, latent.batch_size
        out, cache = None, None
        for j, start, rows in temporal_chunks(coords[:, 1], stride):
            c = coords[rows].clone()
            c[:, 1] -= start - (k if j > 0 and k > 0 else 0)
            seqlens = item_seqlens(c, batch)
            extra = {}
            if cache is not None:
                extra["cache_in"] = cache
                extra["cache_angles"] = rope_for(cache.coords, self.config.decoder.head_dim)
            new_cache = None
            if k > 0:
                store = coords[rows, 1] >= start + stride - k
                new_cache = KVCache()
                extra["cache_out"], extra["cache_rows"] = new_cache, store
            h = self.decoder.run_blocks(latent.feats[rows], c, seqlens, **extra)
            h = self.decoder.out_layer(self.decoder.out_norm(h))
            if out is None:
                out = h.new_empty(latent.feats.shape[0], h.shape[1])
            out[rows] = h
            if new_cache is not None:
                cc = coords[rows][store].clone()
                cc[:, 1] -= start + stride - k  # the cached frames sit at t = 0..k-1
                new_cache.coords = cc
                new_cache.seqlens = item_seqlens(cc, batch) if len(cc) else [0] * batch
            cache = new_cache
        assert out is not None, "no tokens to decode"
        return SparseTensor(out, coords)

    # -- convenience ----------------------------------------------------------------------
    def reconstruct(
        self,
        x: SparseTensor,
        *,
        sample: bool = False,
        seed: int | None = None,
        chunk_stride: int | None = None,
        kv_cache: int | None = None,
    ) -> tuple[SparseTensor, Encoded]:
        """Encode, take the posterior mean (or FSQ codes; a seeded sample if asked), decode."""
        enc = self.encode(x)
        rec = self.decode(
            self.latent_for_decoding(enc, sample=sample, seed=seed),
            chunk_stride=chunk_stride,
            kv_cache=kv_cache,
        )
        return rec, enc

    def forward(self, x: SparseTensor) -> SparseTensor:
        """Deterministic reconstruction of tokens."""
        return self.reconstruct(x)[0]
