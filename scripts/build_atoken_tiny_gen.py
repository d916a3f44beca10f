"""Build the bundled text-to-latent generator `assets/atoken-tiny-gen.safetensors`.

    python scripts/build_atoken_tiny_gen.py              # cache latents, train (resumable), export, evaluate
    python scripts/build_atoken_tiny_gen.py --eval-only  # only the measurements (assets/atoken-tiny-gen.report.json)

Training runs on one thread (`threads: 1` in configs/generator/atoken_tiny_gen.yaml); rerunning
after an interruption resumes from the last saved state.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs/generator/atoken_tiny_gen.yaml"
ASSET = ROOT / "assets/atoken-tiny-gen.safetensors"
REPORT = ROOT / "assets/atoken-tiny-gen.report.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--samples", type=int, default=16, help="generated samples per held-out pair")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    if not args.eval_only:
        from atoken.training.flow import train_generator

        t0 = time.time()
        res = train_generator(CONFIG, resume="auto")
        shutil.copyfile(res.checkpoint, ASSET)
        print(
            f"trained {res.steps} steps in {res.seconds / 60:.1f} min "
            f"(wall {(time.time() - t0) / 60:.1f} min) -> {ASSET}"
        )
    if args.train_only:
        return 0
    from atoken.training.flow_eval import evaluate_generator

    report = evaluate_generator(str(ASSET), samples=args.samples, kinds=("image", "video", "3d"))
    report["generator"] = str(ASSET.relative_to(ROOT))
    REPORT.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
