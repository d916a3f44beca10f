"""Tokens against per-patch PCA-48 and JPEG / WebP / AVIF at the tokens' bits.

1. Time: what the codec comparison adds to one reconstruction of a 512x512 photo (astronaut,
   public domain) on CPU: token bit count (`atoken.pipelines.rate.token_rate`), the tokens' perceptual
   and Frechet distances, and `atoken.pipelines.codecs.compare_codecs` (three codecs at the budget with
   PSNR/SSIM/perceptual, plus PSNR curves at five qualities each).
2. Quality on the model card's four held-out photos (scikit-image chelsea, coffee,
   immunohistochemistry, camera): atoken-tiny and atoken-tiny-d against per-patch PCA-48
   (fitted per photo, on the four photos pooled, and on the four training photos, as
   ``scripts/build_atoken_tiny.py`` does): PSNR, perceptual distance, Frechet distance (per
   photo and over the set), and each codec at each model's bits.

    python benchmarks/codecs.py [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atoken.pipelines.codecs import compare_codecs  # noqa: E402
from atoken.pipelines.metrics import (  # noqa: E402
    effnet_taps,
    frechet_distance_from_features,
    frechet_positions,
    perceptual_distance_from_taps,
    psnr,
    ssim,
)
from atoken.pipelines.rate import token_rate  # noqa: E402
from atoken.pipelines.reconstruct import reconstruct_image  # noqa: E402
from atoken.pretrained.hub import load_pretrained  # noqa: E402
from atoken.training import data  # noqa: E402
from atoken.training.evaluate import pca_reconstruct  # noqa: E402

TEST_PHOTOS = ("chelsea", "coffee", "immunohistochemistry", "camera")
TRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "retina")


def frechet(taps_a: list, taps_b: list) -> float:
    """Frechet distance over the feature positions of several images."""
    fa = torch.cat([frechet_positions(t) for t in taps_a])
    fb = torch.cat([frechet_positions(t) for t in taps_b])
    return max(0.0, frechet_distance_from_features(fa, fb))


def timing(model_name: str) -> dict[str, float]:
    """Seconds of each step for one 512x512 photo (networks warm: second of two runs)."""
    model = load_pretrained(model_name)
    img = np.asarray(Image.fromarray(data.skimage_photos(["astronaut"])[0]).resize((512, 512)))
    out: dict[str, float] = {}
    for _ in range(2):
        t0 = time.perf_counter()
        res = reconstruct_image(model, img)
        t1 = time.perf_counter()
        rate = token_rate(model, res.latent, res.original, res.reconstruction)
        t2 = time.perf_counter()
        ta, tb = effnet_taps(res.original), effnet_taps(res.reconstruction)
        perceptual_distance_from_taps(ta, tb)
        frechet([ta], [tb])
        ssim(res.original, res.reconstruction)
        t3 = time.perf_counter()
        cmp = compare_codecs(res.original, rate.bits, reference_taps=ta)
        t4 = time.perf_counter()
        out = {
            "reconstruct_s": t1 - t0,
            "token_rate_s": t2 - t1,
            "token_metrics_s": t3 - t2,
            "compare_codecs_s": t4 - t3,
            "extra_total_s": t4 - t1,
            "tokens_bpp": rate.bpp,
            "curve_points": sum(len(c) for c in cmp.curves.values()),
        }
    return out


def quality() -> dict:
    """Per-photo and mean numbers on the held-out photos."""
    photos = dict(zip(TEST_PHOTOS, data.skimage_photos(TEST_PHOTOS)))
    train = data.skimage_photos(TRAIN_PHOTOS)
    crops = {
        n: reconstruct_image(load_pretrained("atoken-tiny"), a).original for n, a in photos.items()
    }
    ref_taps = {n: effnet_taps(c) for n, c in crops.items()}
    recs: dict[str, dict[str, np.ndarray]] = {}
    rates: dict[str, dict] = {}
    for name in ("atoken-tiny", "atoken-tiny-d"):
        model = load_pretrained(name)
        recs[name], rates[name] = {}, {}
        for n, a in photos.items():
            res = reconstruct_image(model, a)
            assert np.array_equal(res.original, crops[n])
            recs[name][n] = res.reconstruction
            rates[name][n] = token_rate(model, res.latent, res.original, res.reconstruction)
    recs["pca48/photo"] = {n: pca_reconstruct([c], 48)[0] for n, c in crops.items()}
    pooled = pca_reconstruct(list(crops.values()), 48)
    recs["pca48/pooled"] = dict(zip(crops, pooled))
    trained = pca_reconstruct(list(crops.values()), 48, fit_on=train)
    recs["pca48/train"] = dict(zip(crops, trained))
    report: dict = {"methods": {}, "codecs": {}}
    for method, by_photo in recs.items():
        taps = {n: effnet_taps(r) for n, r in by_photo.items()}
        rows = {
            n: {
                "psnr": psnr(crops[n], r),
                "perceptual": perceptual_distance_from_taps(ref_taps[n], taps[n])[0],
                "frechet": frechet([ref_taps[n]], [taps[n]]),
            }
            for n, r in by_photo.items()
        }
        mean = {
            k: float(np.mean([row[k] for row in rows.values()])) for k in next(iter(rows.values()))
        }
        mean["frechet_set"] = frechet(list(ref_taps.values()), list(taps.values()))
        report["methods"][method] = {"photos": rows, "mean": mean}
    for name in ("atoken-tiny", "atoken-tiny-d"):
        per = {}
        for n, c in crops.items():
            rate = rates[name][n]
            cmp = compare_codecs(c, rate.bits, qualities=None)
            per[n] = {"tokens_bpp": rate.bpp, **cmp.summary()}
        codec_names = [k for k in next(iter(per.values())) if k != "tokens_bpp"]
        mean = {
            k: {
                m: float(np.mean([per[n][k][m] for n in per]))
                for m in ("bpp", "psnr", "ssim", "perceptual")
            }
            for k in codec_names
        }
        mean["tokens_bpp"] = float(np.mean([per[n]["tokens_bpp"] for n in per]))
        report["codecs"][name] = {"photos": per, "mean": mean}
    return report


def main() -> None:
    """Parse arguments, time, measure, print."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = {
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "timing_512px": {m: timing(m) for m in ("atoken-tiny", "atoken-tiny-d")},
        **quality(),
    }
    print("timing on 512x512 (s):")
    for m, t in report["timing_512px"].items():
        print(f"  {m:14s} " + "  ".join(f"{k} {v:.2f}" for k, v in t.items()))
    print("held-out photos, means (frechet: per photo / over the set):")
    for m, r in report["methods"].items():
        x = r["mean"]
        print(
            f"  {m:14s} PSNR {x['psnr']:6.2f}  perceptual {x['perceptual']:.4f}  "
            f"frechet {x['frechet']:7.2f} / {x['frechet_set']:7.2f}"
        )
    for m, r in report["codecs"].items():
        x = r["mean"]
        print(f"  codecs at {m}'s bits ({x['tokens_bpp']:.3f} bpp):")
        for k, v in x.items():
            if k != "tokens_bpp":
                print(
                    f"    {k:5s} bpp {v['bpp']:.3f}  PSNR {v['psnr']:6.2f}  SSIM {v['ssim']:.4f}  "
                    f"perceptual {v['perceptual']:.4f}"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
