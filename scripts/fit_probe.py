"""Can atoken-tiny's architecture beat PCA-48 at all, given the photos it is measured on?

Trains a fresh model of atoken-tiny's size (2 + 2 blocks of width 384, latent 48) with an MSE
loss directly on random 128x128 crops of the four held-out photos, the privilege the PCA
comparator has, and prints PSNR on the whole photos every 200 steps. If even this stays at the
level of PCA fitted on those photos (30.33 dB), the limit is the model at this compute, not the
training data. About 7 minutes for 3000 steps on one core:

    python scripts/fit_probe.py --start pca      # encoder/decoder start as training-photo PCA
    python scripts/fit_probe.py --start random
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build_atoken_tiny import TEST_PHOTOS, TRAIN_PHOTOS  # noqa: E402

from atoken import training  # noqa: E402
from atoken.core.model import ATokenModel  # noqa: E402
from atoken.core.patchify import tokenize  # noqa: E402
from atoken.core.sparse import SparseTensor  # noqa: E402
from atoken.pipelines.metrics import psnr  # noqa: E402
from atoken.training import data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", choices=("pca", "random"), default="pca")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    trunk = {"channels": 384, "num_blocks": 2, "num_heads": 6, "mlp_channels": 768}
    cfg = training.model_config(
        "tiny-c", {"encoder": trunk, "decoder": trunk, "latent_channels": 48, "text_tower": None}
    )
    model = ATokenModel(cfg)
    training.init_weights(model)
    test = [data.as_rgb_u8(a) for a in data.skimage_photos(TEST_PHOTOS)]
    if args.start == "pca":
        train = [data.as_rgb_u8(a) for a in data.skimage_photos(TRAIN_PHOTOS)]
        patches = torch.cat([tokenize([data._float_pixels(a)]).feats[:, :768] for a in train])
        training.pca_init(model, *training.patch_pca(patches, 48))
    opt = torch.optim.AdamW(model.parameters(), args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(0)

    def crops():
        out = []
        for _ in range(8):
            a = test[rng.integers(len(test))]
            top, left = rng.integers(a.shape[0] - 127), rng.integers(a.shape[1] - 127)
            out.append(data._float_pixels(a[top : top + 128, left : left + 128]))
        return tokenize(out)

    def evaluate() -> str:
        model.eval()
        with torch.no_grad():
            pairs = training.reconstruct_arrays(model, test)
        model.train()
        vals = [psnr(t[0], r[0]) for t, r in pairs]
        return " ".join(f"{v:6.2f}" for v in vals) + f"   mean {np.mean(vals):6.2f}"

    print(f"start={args.start} lr={args.lr}; PSNR on {', '.join(TEST_PHOTOS)}")
    print(f"step     0  {evaluate()}", flush=True)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / 100)
        x = crops()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            enc = model.encode(x, pool=False)
            rec = model.decode(SparseTensor(enc.mean, x.coords)).feats
        loss = ((rec.float()[:, :768] - x.feats[:, :768]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        if step % 200 == 0:
            crop_psnr = 10 * math.log10(4 / loss.item())
            print(
                f"step {step:5d}  {evaluate()}   (batch {crop_psnr:5.2f}, {time.time() - t0:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
