"""Variable-length attention through one entry point, with swappable backends.

Rows of ``q`` (and of ``k``/``v``) are grouped into contiguous segments (batch items, or windows
of the Gaussian decoder); a row only attends to rows of its own segment. Backends:

- ``"naive"``: a readable per-segment reference in float32.
- ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention``; one call for a
  single segment, a padded batch with a key mask for many similar segments, a loop otherwise.
- ``"compiled"``: the padded form under ``torch.compile(dynamic=True)``. Sequence length and
  segment count are symbolic, so a new image size does not recompile once the two shapes of the
  warm-up have been seen (measured in ``benchmarks/bench_core.py``).
- ``"flash"``: flash-attn's varlen kernel (CUDA, fp16/bf16), imported only when selected.
- ``"bucketed"``: self-attention over many uneven segments, padded in buckets of similar
  length; the Gaussian decoder's training uses it (fast backward on CPU).

Pick a backend per call (``backend=``) or for a region with ``attention_backend("naive")``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("atoken_attention", default="sdpa")
# Upper bound on the padded score tensor (elements) per chunk of segments.
MAX_SCORE_ELEMENTS = 1 << 26


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Use ``name`` for every attention call inside the ``with`` block."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    token = _BACKEND.set(name)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def current_backend() -> str:
    """Name of the backend in effect."""
    return _BACKEND.get()


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seqlens: Sequence[int],
    *,
    seqlens_k: Sequence[int] | None = None,
    softcap: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """softmax(q k^T / sqrt(D) [soft-capped]) v within each segment.

    Args:
        q: ``[Nq, H, D]``; k, v: ``[Nk, H, D]``.
        seqlens: rows of q per segment (they sum to Nq).
        seqlens_k: rows of k/v per segment (default: ``seqlens``).
        softcap: if set, scores become ``softcap * tanh(s / softcap)`` (the GS decoder's 30).
    Returns:
        ``[Nq, H, D]`` in q's dtype.
    """
    seqlens = [int(n) for n in seqlens]
    seqlens_k = seqlens if seqlens_k is None else [int(n) for n in seqlens_k]
    if len(seqlens) != len(seqlens_k):
        raise ValueError(f"{len(seqlens)} query segments vs {len(seqlens_k)} key segments")
    if sum(seqlens) != q.shape[0] or sum(seqlens_k) != k.shape[0]:
        raise ValueError(
            f"segment lengths sum to {sum(seqlens)}/{sum(seqlens_k)}, rows are {q.shape[0]}/{k.shape[0]}"
        )
    name = backend or _BACKEND.get()
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    if q.shape[0] == 0:
        return q.clone()
    if 0 in seqlens:  # items without queries (e.g. absent from a temporal chunk) drop out
        keep_k = torch.repeat_interleave(
            torch.tensor([nq > 0 for nq in seqlens], device=k.device),
            torch.tensor(seqlens_k, device=k.device),
        )
        k, v = k[keep_k], v[keep_k]
        seqlens_k = [nk for nq, nk in zip(seqlens, seqlens_k) if nq > 0]
        seqlens = [nq for nq in seqlens if nq > 0]
    return BACKENDS[name](q, k, v, seqlens, seqlens_k, softcap)


def _scores_softmax_v(q: Tensor, k: Tensor, v: Tensor, softcap: float | None, mask=None) -> Tensor:
    """Reference math on ``[..., L, D]`` tensors in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v.float())


def naive_attention(q, k, v, seqlens, seqlens_k, softcap) -> Tensor:
    """Readable reference: one segment at a time, float32 arithmetic."""
    out, i, j = [], 0, 0
    for nq, nk in zip(seqlens, seqlens_k):
        qs, ks, vs = (t.transpose(0, 1) for t in (q[i : i + nq], k[j : j + nk], v[j : j + nk]))
        out.append(_scores_softmax_v(qs, ks, vs, softcap).transpose(0, 1))
        i, j = i + nq, j + nk
    return torch.cat(out).to(q.dtype)


def _pad(x: Tensor, lens: Sequence[int]) -> Tensor:
    """Contiguous segments of rows ``[N, H, D]`` -> ``[B, H, L, D]`` zero-padded."""
    parts = list(x.split(list(lens)))
    return torch.nn.utils.rnn.pad_sequence(parts, batch_first=True).transpose(1, 2)


def _padded_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, softcap: float) -> Tensor:
    """Attention on padded ``[B, H, L, D]`` tensors; ``key_mask [B, 1, 1, Lk]`` marks real keys."""
    if softcap > 0:
        return _scores_softmax_v(q, k, v, softcap, key_mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)


def _padded_call(fn: Callable, q, k, v, seqlens, seqlens_k, softcap) -> Tensor:
    """Pad segments into batches (chunked to bound memory), run ``fn``, unpad."""
    lq, lk = max(seqlens), max(seqlens_k)
    chunk = max(1, MAX_SCORE_ELEMENTS // (q.shape[1] * lq * lk))
    outs = []
    iq = ik = 0
    for c0 in range(0, len(seqlens), chunk):
        sq, sk = seqlens[c0 : c0 + chunk], seqlens_k[c0 : c0 + chunk]
        nq, nk = sum(sq), sum(sk)
        qp = _pad(q[iq : iq + nq], sq)
        kp, vp = _pad(k[ik : ik + nk], sk), _pad(v[ik : ik + nk], sk)
        if kp.shape[2] == lk and len(set(sk)) == 1:
            mask = torch.ones(len(sk), 1, 1, lk, dtype=torch.bool, device=q.device)
        else:
            mask = (
                torch.arange(kp.shape[2], device=q.device)
                < torch.tensor(sk, device=q.device)[:, None]
            )
            mask = mask[:, None, None, :]
        o = fn(qp, kp, vp, mask, float(softcap or 0.0)).transpose(1, 2)  # [n, Lq, H, D]
        outs.extend(o[i, :n] for i, n in enumerate(sq))
        iq, ik = iq + nq, ik + nk
    return torch.cat(outs).to(q.dtype)


def sdpa_attention(q, k, v, seqlens, seqlens_k, softcap) -> Tensor:
    """PyTorch SDPA; picks one call, a padded batch, or a per-segment loop."""
    if len(seqlens) == 1 and not softcap:
        o = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)))
        return o[0].transpose(0, 1)
    padded = len(seqlens) * max(seqlens) * max(seqlens_k)
    real = sum(a * b for a, b in zip(seqlens, seqlens_k))
    if softcap or padded <= 1.5 * real:
        return _padded_call(_padded_attention, q, k, v, seqlens, seqlens_k, softcap)
    out, i, j = [], 0, 0
    for nq, nk in zip(seqlens, seqlens_k):
        qs, ks, vs = (
            t.transpose(0, 1)[None] for t in (q[i : i + nq], k[j : j + nk], v[j : j + nk])
        )
        out.append(F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1))
        i, j = i + nq, j + nk
    return torch.cat(out)


_COMPILED: dict[str, Callable] = {}


def _padded_softcap_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, softcap: float):
    """:func:`_padded_attention` with a soft cap (a separate code object: its own compile cache)."""
    return _scores_softmax_v(q, k, v, softcap, key_mask).to(q.dtype)


def compiled_function(softcap: bool = False) -> Callable:
    """The ``torch.compile``d padded attention (built on first use, shared by all calls).

    One graph per (softcap, single/multi-segment, head_dim) is expected: sequence length and
    segment count are symbolic (``dynamic=True``).
    """
    key = "softcap" if softcap else "plain"
    if key not in _COMPILED:
        fn = _padded_softcap_attention if softcap else _padded_attention
        _COMPILED[key] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED[key]


def compiled_attention(q, k, v, seqlens, seqlens_k, softcap) -> Tensor:
    """Padded attention through ``torch.compile`` with symbolic shapes.

    Single-query segments (the pooling head's probe) go to SDPA: a length-1 axis would be
    specialised by the compiler and cost a graph for no speed.
    """
    if max(seqlens) == 1:
        return sdpa_attention(q, k, v, seqlens, seqlens_k, softcap)
    fn = compiled_function(bool(softcap))
    if len(seqlens) == 1:  # no padding needed; the all-true mask keeps the same graph
        mask = torch.ones(1, 1, 1, k.shape[0], dtype=torch.bool, device=q.device)
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k, v))
        return fn(qs, ks, vs, mask, float(softcap or 0.0))[0].transpose(0, 1).to(q.dtype)
    return _padded_call(fn, q, k, v, seqlens, seqlens_k, softcap)


def flash_attention(q, k, v, seqlens, seqlens_k, softcap) -> Tensor:
    """flash-attn 2 varlen kernel (CUDA, half precision)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError("attention backend 'flash' needs the flash-attn package") from e
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("attention backend 'flash' needs CUDA tensors in float16/bfloat16")
    lq = torch.tensor([0, *seqlens], device=q.device).cumsum(0).to(torch.int32)
    lk = torch.tensor([0, *seqlens_k], device=q.device).cumsum(0).to(torch.int32)
    return flash_attn_varlen_func(
        q, k, v, lq, lk, max(seqlens), max(seqlens_k), softcap=float(softcap or 0.0)
    )


_BUCKET_RATIO = 1.25  # longest / shortest window of one padded bucket
_BUCKET_SCORES = 1 << 22  # windows x length^2 per bucket


def bucketed_attention(q, k, v, seqlens, seqlens_k, softcap) -> Tensor:
    """Self-attention over many uneven segments (the Gaussian decoder's windows in training):
    segments sorted by length, padded in buckets of
    similar length (at most ``_BUCKET_RATIO`` apart) and run as one masked SDPA call each.

    Same maths as the ``sdpa`` backend. That backend runs uneven windows one by one through
    slices ``q[i : i + n]``; on CPU each call costs milliseconds and each slice's backward writes
    a zero gradient as large as the whole input, so with hundreds of windows the decoder's
    backward was ~10x slower than its forward. One gather per tensor and one scatter avoid both.
    """
    if list(seqlens) != list(seqlens_k):
        raise ValueError("bucketed attention is self-attention: seqlens_k must equal seqlens")
    n, device = q.shape[0], q.device
    lens_list = [int(s) for s in seqlens]
    lens = torch.tensor(lens_list, device=device)
    starts = torch.cumsum(lens, 0) - lens
    order = sorted(range(len(lens_list)), key=lens_list.__getitem__)
    buckets = []  # (window ids, padded length)
    i = 0
    while i < len(order):
        j, first = i + 1, max(1, lens_list[order[i]])
        while (
            j < len(order)
            and lens_list[order[j]] <= _BUCKET_RATIO * first
            and (j - i + 1) * lens_list[order[j]] ** 2 <= _BUCKET_SCORES
        ):
            j += 1
        buckets.append((order[i:j], lens_list[order[j - 1]]))
        i = j
    # One gather per tensor for all buckets (a gather per bucket would cost a full-size
    # zero gradient each in the backward), then split into padded buckets.
    idxs, valids = [], []
    for win, length in buckets:
        win = torch.tensor(win, device=device)
        ramp = torch.arange(length, device=device)
        valid = ramp < lens[win, None]  # [B, L]
        idxs.append(torch.where(valid, starts[win, None] + ramp, n))
        valids.append(valid)
    flat = torch.cat([t.reshape(-1) for t in idxs])
    sizes = [t.numel() for t in idxs]
    parts = [torch.cat([t, t.new_zeros(1, *t.shape[1:])])[flat].split(sizes) for t in (q, k, v)]
    rows, outs = [], []
    for b, (idx, valid) in enumerate(zip(idxs, valids)):
        shape = (*idx.shape, *q.shape[1:])
        qp, kp, vp = (p[b].reshape(shape).transpose(1, 2) for p in parts)  # [B, H, L, D]
        mask = valid[:, None, None, :]
        if softcap:
            sc = qp.float() @ kp.float().transpose(-1, -2) / math.sqrt(qp.shape[-1])
            sc = (softcap * torch.tanh(sc / softcap)).masked_fill(~mask, float("-inf"))
            o = (torch.softmax(sc, -1) @ vp.float()).to(q.dtype)
        else:
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
        outs.append(o.transpose(1, 2)[valid])  # [rows, H, D]
        rows.append(idx[valid])
    inv = torch.empty(n, dtype=torch.long, device=device)
    inv[torch.cat(rows)] = torch.arange(n, device=device)
    return torch.cat(outs)[inv]


BACKENDS: dict[str, Callable] = {
    "naive": naive_attention,
    "sdpa": sdpa_attention,
    "compiled": compiled_attention,
    "flash": flash_attention,
    "bucketed": bucketed_attention,
}
