"""Rebuild ``assets/atoken-tiny-gs.safetensors`` from scratch: data, training, evaluation.

    python scripts/build_atoken_tiny_gs.py                 # everything (~25 min data + training)
    python scripts/build_atoken_tiny_gs.py --eval-only     # metrics of the current checkpoint

Data: procedural meshes (``atoken.training.gs.random_asset``) packed with the app's
``mesh_to_voxels`` defaults, cached under ``--data`` (train seed 1, held-out test seed 2).
Training: rendering loss (L1 + 0.2 (1 - SSIM)) through the differentiable deferred renderer,
on random crops of about 5k voxels, with noise / blur augmentation of the input features.
Evaluation: held-out procedural assets (their stored mesh renders) and the example meshes in
``assets/meshes`` (the app's protocol, ``pipeline3d.eval_cameras``), written to ``--metrics``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from atoken.core.checkpoint import load_gaussian_decoder  # noqa: E402
from atoken.core.gs_decoder import GaussianDecoder  # noqa: E402
from atoken.io.media import MESH_EXTENSIONS  # noqa: E402
from atoken.training.gs import (  # noqa: E402
    GSTrainConfig,
    build_dataset,
    evaluate_meshes,
    evaluate_samples,
    init_gs_decoder,
    save_gs_decoder,
    tiny_gs_config,
    train_gs_decoder,
)

EXAMPLES = sorted(p for p in (ROOT / "assets" / "meshes").iterdir() if p.suffix in MESH_EXTENSIONS)


def chain_timings(decoder: GaussianDecoder, model_name: str, folder: Path) -> dict:
    """Seconds of ``pipeline3d.reconstruct_asset`` (mesh -> voxels -> tokens -> Gaussians ->
    .ply, metrics included) per example, plus re-reading the .ply."""
    import atoken
    from atoken.core.gaussians import Gaussians
    from atoken.pipelines.reconstruct3d import reconstruct_asset
    from atoken.pretrained.hub import bundled_path

    if model_name == "atoken-tiny":
        if bundled_path("atoken-tiny") is None:
            return {}
        model = atoken.load_pretrained("atoken-tiny")
    else:
        model = atoken.load(None, model_name)
    out = {}
    for path in EXAMPLES:
        t = time.perf_counter()
        res = reconstruct_asset(model, decoder, path, folder / f"{path.stem}.ply")
        back = Gaussians.load_ply(res.ply)
        seconds = time.perf_counter() - t
        assert len(back) == res.num_gaussians
        out[path.name] = {
            "seconds": round(seconds, 1),
            "gaussians": res.num_gaussians,
            **{k: round(v, 3) for k, v in res.metrics.items()},
            "steps": {k: round(v, 1) for k, v in res.timings.items()},
        }
        print(f"chain {model_name} {path.name}: {out[path.name]}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="/tmp/atoken_gs_data", help="sample cache folder")
    p.add_argument("--train-count", type=int, default=320)
    p.add_argument("--test-count", type=int, default=24)
    p.add_argument("--minutes", type=float, default=70.0, help="training wall-time budget")
    p.add_argument(
        "--steps", type=int, default=3000, help="step cap (the time limit usually ends first)"
    )
    p.add_argument("--out", default=str(ROOT / "assets" / "atoken-tiny-gs.safetensors"))
    p.add_argument(
        "--metrics", default=None, help="JSON file for the metrics (default: next to --out)"
    )
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chain", action="store_true", help="also time the app's 3D chain per example")
    args = p.parse_args()
    out = Path(args.out)
    metrics_path = Path(args.metrics) if args.metrics else out.with_suffix(".metrics.json")

    t0 = time.perf_counter()
    data = Path(args.data)
    test = build_dataset(data / "test", args.test_count, seed=2)
    if args.eval_only:
        decoder = load_gaussian_decoder(out, None)
        meta = {}
    else:
        train = build_dataset(data / "train", args.train_count, seed=1)
        t_data = time.perf_counter() - t0
        torch.manual_seed(args.seed)
        decoder = GaussianDecoder(tiny_gs_config())
        init_gs_decoder(decoder)
        cfg = GSTrainConfig(steps=args.steps, time_limit_s=args.minutes * 60, seed=args.seed)
        meta = {"train_config": json.dumps(cfg.to_dict()), "data": f"{len(train)} procedural"}

        def checkpoint(step: int, dec: GaussianDecoder) -> None:
            if step % 100 == 99:
                save_gs_decoder(dec, out, {**meta, "steps": str(step + 1)})
                dec.train()

        t1 = time.perf_counter()
        history = train_gs_decoder(decoder, train, cfg, callback=checkpoint)
        t_train = time.perf_counter() - t1
        meta.update(
            steps=str(len(history)), train_seconds=f"{t_train:.0f}", data_seconds=f"{t_data:.0f}"
        )
        save_gs_decoder(decoder, out, meta)
        print(f"saved {out} after {len(history)} steps, {t_train / 60:.1f} min training")

    results = {
        "heldout_procedural": evaluate_samples(decoder, test),
        "examples_gt_voxels": evaluate_meshes(decoder, EXAMPLES, log=print),
        "checkpoint": str(out.name),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        **{k: v for k, v in meta.items() if k != "train_config"},
    }
    if args.chain:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            results["chain_random_tiny_c"] = chain_timings(decoder, "tiny-c", Path(tmp))
            tiny = chain_timings(decoder, "atoken-tiny", Path(tmp))
            if tiny:
                results["chain_atoken_tiny"] = tiny
    ex = results["examples_gt_voxels"]
    results["examples_mean"] = {
        k: sum(v[k] for v in ex.values()) / len(ex) for k in ("psnr", "ssim")
    }
    print(json.dumps(results, indent=1))
    metrics_path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min; metrics in {metrics_path}")


if __name__ == "__main__":
    main()
