"""Core speed on CPU/GPU: a So/C-size model with random weights.

Prints, for 256 and 512 px images: encode+decode seconds and tokens/s, achieved FLOP/s against a
matmul peak measured in the same run; the compiled attention backend's warm-up seconds and the
number of recompiles over 10 different image sizes after warm-up; peak memory.

    python benchmarks/bench_core.py [--preset so-c] [--device cpu] [--dtype float32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import atoken  # noqa: E402
from atoken.core.attention import attention_backend, compiled_function  # noqa: E402


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_flops(cfg: atoken.ATokenConfig, n: int) -> float:
    """Multiply-add FLOPs (x2) of one encode + decode of a single item with n tokens."""
    total = 0.0
    for trunk in (cfg.encoder, cfg.decoder):
        c, m = trunk.channels, trunk.mlp_channels
        per_token = 8 * c * c + 4 * c * m + 4 * n * c  # qkv+out, mlp, scores+values
        total += trunk.num_blocks * per_token * n
    total += 2 * n * cfg.in_channels * cfg.encoder.channels  # encoder input layer
    total += 2 * n * cfg.encoder.channels * 2 * cfg.latent_channels  # proj
    total += 2 * n * cfg.latent_channels * cfg.decoder.channels  # decoder input layer
    total += 2 * n * cfg.decoder.channels * cfg.out_channels  # out layer
    c, m = cfg.encoder.channels, cfg.encoder.mlp_channels
    total += n * 2 * c * 2 * c + 2 * c * c * 2 + 4 * c * m  # pooling head (kv over n tokens)
    return total


def image(side: int) -> torch.Tensor:
    return torch.rand(side, side, 3) * 2 - 1


@torch.no_grad()
def time_reconstruct(model, side: int, device: str, repeats: int) -> float:
    x = atoken.tokenize([image(side)])
    model.reconstruct(x)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        model.reconstruct(x)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def compiled_counts() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="so-c")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--skip-compile", action="store_true")
    args = p.parse_args()
    dtype = atoken.core.checkpoint.resolve_dtype(args.dtype)
    results: dict = {
        "preset": args.preset,
        "device": args.device,
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
    }
    peak = matmul_peak(args.device, dtype)
    results["matmul_peak_gflops"] = round(peak / 1e9, 1)
    t = time.perf_counter()
    model = atoken.load(None, args.preset, device=args.device, dtype=dtype)
    results["build_seconds"] = round(time.perf_counter() - t, 2)
    cfg = model.config
    for side in (int(s) for s in args.sizes.split(",")):
        n = (side // 16) ** 2
        secs = time_reconstruct(model, side, args.device, args.repeats)
        flops = model_flops(cfg, n)
        results[f"{side}px"] = {
            "tokens": n,
            "encode_decode_s": round(secs, 3),
            "tokens_per_s": round(n / secs, 1),
            "gflops": round(flops / secs / 1e9, 1),
            "fraction_of_matmul_peak": round(flops / secs / peak, 3),
        }
        print(json.dumps({f"{side}px": results[f"{side}px"]}), flush=True)
    if not args.skip_compile:
        with attention_backend("compiled"):
            compiled_function()
            c0 = compiled_counts()
            t = time.perf_counter()
            for side in (64, 96):  # warm-up: the first shape, then the dynamic-shape graph
                model.reconstruct(atoken.tokenize([image(side)]))
            results["compile_warmup_s"] = round(time.perf_counter() - t, 2)
            c1 = compiled_counts()
            sizes = [
                (48, 80),
                (112, 64),
                (128, 128),
                (80, 176),
                (160, 96),
                (144, 208),
                (224, 112),
                (192, 192),
                (240, 160),
                (256, 224),
            ]
            t = time.perf_counter()
            for h, w in sizes:
                model.reconstruct(atoken.tokenize([torch.rand(h, w, 3) * 2 - 1]))
            results["compiled_10_sizes_s"] = round(time.perf_counter() - t, 2)
            results["graphs_compiled_in_warmup"] = c1 - c0
            results["recompiles_over_10_sizes_after_warmup"] = compiled_counts() - c1
    results["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if args.device.startswith("cuda"):
        results["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
