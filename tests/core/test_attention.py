"""Attention backends: agreement with the reference, segment isolation, softcap, compile."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import atoken
from atoken.core.attention import BACKENDS, attention, attention_backend, current_backend

from ..conftest import GOLDEN

CPU_BACKENDS = ["sdpa", "compiled"]


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    """Tests sweep many head sizes; start each with an empty dynamo cache (no recompile limit)."""
    torch._dynamo.reset()
    yield


def random_qkv(seqlens, heads=3, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(seqlens)
    return [torch.randn(n, heads, dim, generator=g) for _ in range(3)]


SEQLENS = [[37], [5, 64, 3], [8] * 20, [1, 200]]


@pytest.mark.parametrize("seqlens", SEQLENS)
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_sdpa_matches_reference(seqlens, softcap):
    q, k, v = random_qkv(seqlens)
    ref = attention(q, k, v, seqlens, backend="naive", softcap=softcap)
    out = attention(q, k, v, seqlens, backend="sdpa", softcap=softcap)
    assert (out - ref).abs().max() < 1e-5


def test_compiled_matches_reference_without_recompiling():
    """All shapes in one process: the graphs compiled for the first sizes serve the rest."""
    from torch._dynamo.utils import counters

    graphs = []
    for softcap in (None, 30.0):
        for seqlens in SEQLENS + [[50], [3, 3, 90]]:
            q, k, v = random_qkv(seqlens)
            ref = attention(q, k, v, seqlens, backend="naive", softcap=softcap)
            out = attention(q, k, v, seqlens, backend="compiled", softcap=softcap)
            assert (out - ref).abs().max() < 1e-5
            graphs.append(int(counters["stats"]["unique_graphs"]))
    # at most (softcap x single/multi segment) x (static, dynamic) graphs; the last sizes add none
    assert graphs[-1] <= 8 and graphs[-1] == graphs[-3]


def test_segments_never_mix():
    seqlens = [6, 9]
    q, k, v = random_qkv(seqlens)
    both = attention(q, k, v, seqlens)
    alone0 = attention(q[:6], k[:6], v[:6], [6])
    # changing the second segment's keys leaves the first segment untouched
    k2 = k.clone()
    k2[6:] += 5
    again = attention(q, k2, v, seqlens)
    assert torch.allclose(both[:6], alone0, atol=1e-6)
    assert torch.equal(again[:6], both[:6])
    assert not torch.allclose(again[6:], both[6:])


def test_softcap_formula():
    q, k, v = random_qkv([4], heads=1, dim=8)
    q = q * 40  # large scores so the cap matters
    s = (q[:, 0] @ k[:, 0].T) / 8**0.5
    p = torch.softmax(30 * torch.tanh(s / 30), -1)
    expected = p @ v[:, 0]
    out = attention(q, k, v, [4], softcap=30.0, backend="naive")[:, 0]
    assert torch.allclose(out, expected, atol=1e-5)


def test_different_key_lengths():
    sq, sk = [3, 4], [5, 7]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(7, 2, 8, generator=g)
    k, v = torch.randn(12, 2, 8, generator=g), torch.randn(12, 2, 8, generator=g)
    ref = attention(q, k, v, sq, seqlens_k=sk, backend="naive")
    for backend in CPU_BACKENDS:
        assert (attention(q, k, v, sq, seqlens_k=sk, backend=backend) - ref).abs().max() < 1e-5


def test_empty_segments_and_validation():
    q, k, v = random_qkv([4, 3])
    out = attention(q, k, v, [4, 0, 3], seqlens_k=[4, 0, 3])
    assert torch.allclose(out, attention(q, k, v, [4, 3]), atol=1e-6)
    with pytest.raises(ValueError, match="sum"):
        attention(q, k, v, [4, 4])
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, [7], backend="magic")


def test_context_manager_selects_backend():
    assert current_backend() == "sdpa"
    with attention_backend("naive"):
        assert current_backend() == "naive"
    assert current_backend() == "sdpa"
    with pytest.raises(ValueError), attention_backend("nope"):
        pass
    assert set(BACKENDS) >= {"naive", "sdpa", "compiled", "flash"}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@torch.no_grad()
def test_model_backends_agree_and_batch_equals_single(backend):
    t = load_file(str(GOLDEN / "cases/c_batch2.safetensors"))
    model = atoken.load(GOLDEN / "weights/tiny_c.safetensors", "tiny-c")
    items = [t["input/item0"], t["input/item1"]]
    with attention_backend("naive"):
        ref_rec, ref_enc = model.reconstruct(atoken.tokenize(items))
    with attention_backend(backend):
        rec, enc = model.reconstruct(atoken.tokenize(items))
        singles = [model.reconstruct(atoken.tokenize([it])) for it in items]
    assert (rec.feats - ref_rec.feats).abs().max() < 1e-5
    assert (enc.pooled - ref_enc.pooled).abs().max() < 1e-5
    n0 = singles[0][0].feats.shape[0]
    assert (rec.feats[:n0] - singles[0][0].feats).abs().max() < 1e-5
    assert (rec.feats[n0:] - singles[1][0].feats).abs().max() < 1e-5
    for b in range(2):
        assert (enc.pooled[b] - singles[b][1].pooled[0]).abs().max() < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_backend_matches_reference_on_gpu():  # pragma: no cover - GPU only
    pytest.importorskip("flash_attn", reason="flash-attn not installed")
    q, k, v = (t.cuda().half() for t in random_qkv([17, 40], dim=64))
    ref = attention(q.float(), k.float(), v.float(), [17, 40], backend="naive")
    out = attention(q, k, v, [17, 40], backend="flash")
    assert (out.float() - ref).abs().max() < 2e-2


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_bucketed_backend_matches_naive_on_uneven_segments(softcap):
    g = torch.Generator().manual_seed(3)
    seqlens = [1, 7, 8, 9, 40, 3, 33]
    q, k, v = (torch.randn(sum(seqlens), 2, 8, generator=g) for _ in range(3))
    ref = attention(q, k, v, seqlens, softcap=softcap, backend="naive")
    out = attention(q, k, v, seqlens, softcap=softcap, backend="bucketed")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="self-attention"):
        attention(q, k[:-1], v[:-1], seqlens, seqlens_k=[*seqlens[:-1], 32], backend="bucketed")
