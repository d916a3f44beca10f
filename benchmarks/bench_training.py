"""Training throughput: tokens per second of one optimiser step, by precision and model size.

    python benchmarks/bench_training.py                  # atoken-tiny shape, fp32 and bf16
    python benchmarks/bench_training.py --steps 20 --budget 2048 --threads 2

Prints one line per setting: tokens/s over the timed steps (after warm-up steps), the mean
step time and the peak resident memory. Images only (random crops of a scikit-image photo),
L1 reconstruction, no semantic term: the cost of the autoencoder itself.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atoken import training  # noqa: E402

SHAPES = {
    # encoder blocks, decoder blocks, width, mlp
    "atoken-tiny": (2, 3, 384, 1024),
    "small": (1, 1, 384, 768),
}


def config(shape: str, precision: str, budget: int, steps: int, threads: int) -> dict:
    """A throwaway training config for one benchmark setting."""
    e, d, width, mlp = SHAPES[shape]
    enc = dict(channels=width, num_blocks=e, num_heads=width // 64, mlp_channels=mlp)
    dec = dict(channels=width, num_blocks=d, num_heads=width // 64, mlp_channels=mlp)
    return {
        "name": f"bench-{shape}-{precision}",
        "output_dir": f"/tmp/atoken-bench/{shape}-{precision}",
        "model": "tiny-c",
        "model_overrides": {
            "encoder": enc,
            "decoder": dec,
            "latent_channels": 48,
            "text_tower": None,
        },
        "steps": steps + 10,
        "warmup_steps": 1,
        "cpu": not torch.cuda.is_available(),
        "mixed_precision": precision,
        "threads": threads,
        "progress": False,
        "data": {
            "token_budget": budget,
            "sources": [
                {"type": "skimage", "names": ["astronaut"], "min_side": 128, "max_side": 128}
            ],
        },
        "loss": {"image": {"lpips": 0.0, "gram": 0.0, "perceptual": 0.0}},
        "semantic": {"text_tower": None},
    }


def main() -> None:
    """Run the benchmark grid and print a line per setting."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["atoken-tiny"], choices=sorted(SHAPES))
    ap.add_argument("--precision", nargs="+", default=["no", "bf16"])
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    for shape in args.shapes:
        for precision in args.precision:
            cfg = training.load_train_config(
                config(shape, precision, args.budget, args.steps, args.threads)
            )
            trainer = training.Trainer(cfg)
            params = sum(p.numel() for p in trainer.raw_module.model.parameters())
            times, tokens = [], 0
            for i in range(args.warmup + args.steps):
                batch = next(trainer.batches)
                t = time.perf_counter()
                trainer.train_step(batch)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t)
                    tokens += len(batch.tokens)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"{shape:12s} {params / 1e6:5.1f}M params  precision={precision:4s} "
                f"threads={args.threads}  {tokens / sum(times):7.0f} tokens/s  "
                f"{sum(times) / len(times):6.2f} s/step  peak RSS {rss:.0f} MB",
                flush=True,
            )


if __name__ == "__main__":
    main()
