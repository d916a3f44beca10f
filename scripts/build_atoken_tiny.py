"""Rebuild the bundled atoken-tiny checkpoints from scratch, then measure them.

    python scripts/build_atoken_tiny.py                  # 8 stages + the frames step + export + evaluation
    python scripts/build_atoken_tiny.py --resume         # skip stages that already finished
    python scripts/build_atoken_tiny.py --eval-only      # measure the files in assets/
    python scripts/build_atoken_tiny.py --frames-from-assets  # redo only the frames step on assets/
    python scripts/build_atoken_tiny.py --polish-d-from-assets  # stage 4e on assets/atoken-tiny-d
    python scripts/build_atoken_tiny.py --steps-scale 0.02 --out /tmp/tiny  # smoke run

Stages (configs/train/atoken_tiny_s*.yaml): 1 images, 2 + video, 3 + 3D, 3b reconstruction
polish of proj + decoder (encoder frozen), then from 3b: 4 FSQ with the same frozen encoder and
4e its perceptual polish (MSE + EfficientNet-Lite0 feature distance), and 3c a longer MSE polish
of proj + decoder, then 3e the same perceptual polish of proj + decoder (still with the frozen
encoder). Then the frames step
(`atoken.training.frames`, no gradient training): the encoder's input columns and the decoders'
output rows for frames 1-3 of a video token are fitted by least squares on training clips
(`frame_clips`), so that videos reconstruct every frame of a temporal patch and not only the
first; every frame-0 weight, hence every image and 3D encoding, stays as it was. Stage 3e + frames
becomes ``assets/atoken-tiny.safetensors`` and stage 4e + frames
``assets/atoken-tiny-d.safetensors`` (proj + decoder only; its encoder is atoken-tiny's), both
float16 with the config in the metadata. Training data: scikit-image's astronaut, rocket,
hubble_deep_field and retina, ``assets/video/bigbuckbunny_512x288.mp4``, ``assets/meshes``, the
generated world (`atoken.training.world`) and, from stage 3e, the photos of `PHOTO_SOURCES`
(Debian packages ``libjxl-testdata`` and ``mate-backgrounds``; `prepare_photos` copies them to
``--out``/photos at 640 px on the long side). Held out for evaluation: the photos chelsea, coffee,
immunohistochemistry and camera, and the world's held-out attribute pairs.
Everything is written to ``--out`` (default ``build/atoken-tiny``), the report to
``report.json`` there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import video_frames  # noqa: E402

from atoken import training  # noqa: E402
from atoken.pipelines.metrics import psnr, ssim  # noqa: E402
from atoken.training import data  # noqa: E402
from atoken.training.evaluate import evaluate_folder  # noqa: E402

# stage -> the stage it starts from
STAGES = {
    "s1_image": None,
    "s2_video": "s1_image",
    "s3_3d": "s2_video",
    "s3b_polish": "s3_3d",
    "s4_fsq": "s3b_polish",
    "s4e_perceptual": "s4_fsq",
    "s3c_mse": "s3b_polish",
    "s3e_perceptual": "s3c_mse",
}
TRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "retina")
TEST_PHOTOS = ("chelsea", "coffee", "immunohistochemistry", "camera")
ASSETS = ROOT / "assets"
# stage 3e's extra photos: Debian package -> (files, licence); listed in assets/atoken-tiny.md
PHOTO_SOURCES = {
    "libjxl-testdata": (
        [
            f"/usr/share/libjxl-testdata/external/wesaturate/500px/{n}_srgb8.png"
            for n in ("cvo9xd_keong_macan", "tmshre_riaphotographs", "u76c0g_bliznaca")
        ],
        "CC0",
    ),
    "mate-backgrounds": (
        [
            f"/usr/share/backgrounds/mate/nature/{n}.jpg"
            for n in (
                "Aqua",
                "Blinds",
                "Dune",
                "FreshFlower",
                "Garden",
                "GreenMeadow",
                "LadyBird",
                "RainDrops",
                "Storm",
                "TwoWings",
                "Wood",
                "YellowFlower",
            )
        ],
        "GPL-2+",
    ),
}


def prepare_photos(folder: Path, long_side: int = 640) -> Path:
    """Copy `PHOTO_SOURCES` into ``folder`` as PNGs scaled to ``long_side`` (never up)."""
    from PIL import Image

    missing = [f for files, _ in PHOTO_SOURCES.values() for f in files if not Path(f).is_file()]
    if missing:
        raise SystemExit(
            f"stage 3e needs {len(missing)} photos that are not installed (first: {missing[0]}); "
            f"install the Debian packages: apt-get install {' '.join(PHOTO_SOURCES)}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for files, _ in PHOTO_SOURCES.values():
        for f in files:
            im = Image.open(f).convert("RGB")
            scale = long_side / max(im.size)
            if scale < 1:
                im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
            im.save(folder / f"{Path(f).stem}.png")
    return folder


def run_stage(
    out: Path, stage: str, init_from: Path | None, scale: float = 1.0, resume=None
) -> float:
    """Train one stage into ``out``/``stage`` from ``init_from``; returns its seconds."""
    folder = out / stage
    yaml = ROOT / "configs" / "train" / f"atoken_tiny_{stage}.yaml"
    over = {"output_dir": str(folder)}
    cfg = training.load_train_config(yaml)
    over["steps"] = max(2, round(cfg.steps * scale))
    over["warmup_steps"] = min(cfg.warmup_steps, over["steps"] // 2)
    over["save_every"] = 0 if scale < 1 else cfg.save_every
    if init_from is not None:
        over["init_from"] = str(init_from)
    for src in cfg.data.get("sources", []):
        if "cache_dir" in src:
            src["cache_dir"] = str(out / "voxels")
        if src.get("type") in ("video_folder", "voxel_folder"):
            src["path"] = str(ROOT / src["path"])
        if src.get("type") == "image_folder":  # the perceptual stages' photos
            src["path"] = str(prepare_photos(out / "photos"))
    over["data"] = cfg.data
    print(f"[build] {stage}: {over['steps']} steps -> {folder}", flush=True)
    result = training.train_from_config(yaml, **over, resume=resume)
    print(
        f"[build] {stage}: {result.seconds / 60:.1f} min, loss {result.first_loss:.4f} "
        f"-> {result.last_loss:.4f}",
        flush=True,
    )
    return result.seconds


def run_stages(out: Path, scale: float, resume: bool) -> dict[str, float]:
    """Train the stages in order, each from its parent; returns seconds per stage."""
    times_path = out / "times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    for stage, parent in STAGES.items():
        if resume and (out / stage / "model.safetensors").is_file() and stage in times:
            print(f"[build] {stage}: already trained, skipping", flush=True)
            continue
        init = None if parent is None else out / parent / "model.safetensors"
        times[stage] = run_stage(out, stage, init, scale, bool(resume) or None)
        times_path.parent.mkdir(parents=True, exist_ok=True)
        times_path.write_text(json.dumps(times, indent=1))
    return times


def bundled_minutes(path: Path) -> dict[str, float]:
    """The stage times (seconds) recorded in a bundled file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return {k: v * 60 for k, v in json.loads(meta.get("stage_minutes", "{}")).items()}


def frame_clips(out: Path, count: int = 300, seed: int = 123) -> list[np.ndarray]:
    """Training clips for the frames step, 16 frames at 64-96 px: about a third each of the
    world's training clips, pans with zoom over the training photos (`TRAIN_PHOTOS` and
    `PHOTO_SOURCES`) and windows of the training video (every frame or every second frame)."""
    from PIL import Image

    from atoken.training import world

    rng = np.random.default_rng(seed)
    photos = data.skimage_photos(TRAIN_PHOTOS) + [
        np.asarray(Image.open(f).convert("RGB"))
        for f in sorted(prepare_photos(out / "photos").glob("*.png"))
    ]
    bbb = ASSETS / "video" / "bigbuckbunny_512x288.mp4"
    bbb_frames = data.count_frames(bbb)

    def pan(img: np.ndarray, size: int) -> np.ndarray:
        h, w = img.shape[:2]
        z0, z1 = rng.uniform(0.4, 0.9, 2)
        a = rng.uniform(0, 1, 2)
        b = np.clip(a + rng.normal(0, 0.25, 2), 0, 1)
        frames = []
        for i in range(16):
            t = i / 15
            side = int(min(h, w) * (z0 + (z1 - z0) * t))
            top, left = (np.array([h - side, w - side]) * (a + (b - a) * t)).astype(int)
            crop = Image.fromarray(img[top : top + side, left : left + side])
            frames.append(np.asarray(crop.resize((size, size), Image.BILINEAR)))
        return np.stack(frames)

    clips = []
    for _ in range(count):
        r, size = rng.uniform(), int(rng.choice([64, 80, 96]))
        if r < 0.35:
            clips.append(world.render_video(world.sample_spec(rng, "video", "train"), size, 16))
        elif r < 0.7:
            clips.append(pan(photos[rng.integers(len(photos))], size))
        else:
            stride = int(rng.choice([1, 1, 2]))
            fr = data.read_frames(bbb, int(rng.integers(0, bbb_frames - 16 * stride)), 16, stride)
            h, w = fr.shape[1:3]
            sc = rng.uniform(0.25, 0.6)
            hw = (int(w * sc) // 16 * 16, int(h * sc) // 16 * 16)
            clips.append(
                np.stack([np.asarray(Image.fromarray(f).resize(hw, Image.BILINEAR)) for f in fr])
            )
    return clips


def frames_step(
    out: Path, cont_src: Path, disc_src: Path, design: bool = True
) -> tuple[Path, Path]:
    """The frames step on both models -> ``out``/s3f_frames and ``out``/s4f_frames (float32).

    ``design=False``: ``cont_src`` already went through it (its frames 1-3 encoder columns are
    kept); only the FSQ model's frames 1-3 output rows are fitted, for a decoder trained since."""
    from atoken.training import frames

    torch.set_num_threads(2)
    t0 = time.time()
    cont, disc = training.load_trained(cont_src), training.load_trained(disc_src)
    pool = frames.clip_tokens(frame_clips(out))
    report = {"continuous": frames.design_frame_code(cont, pool) if design else "kept"}
    w = frames.frame_width(cont)
    with torch.no_grad():  # the FSQ model shares the encoder; only its own rows are fitted
        disc.encoder.input_layer.weight[:, w:] = cont.encoder.input_layer.weight[:, w:]
    report["fsq"] = frames.fit_frame_rows(disc, pool)
    report["seconds"] = round(time.time() - t0, 1)
    print(f"[build] frames step: {json.dumps(report)}", flush=True)
    disc_path = training.save_model(disc, out / "s4f_frames" / "model.safetensors")
    cont_path = (  # unchanged without the design: no second copy
        training.save_model(cont, out / "s3f_frames" / "model.safetensors") if design else cont_src
    )
    (out / ("frames.json" if design else "frames_d.json")).write_text(json.dumps(report, indent=1))
    torch.set_num_threads(1)
    return cont_path, disc_path


def export(out: Path, times: dict[str, float], cont_src: Path, disc_src: Path) -> tuple[Path, Path]:
    """Write the float16 bundles into assets/."""
    minutes = {k: round(v / 60, 1) for k, v in times.items()}
    common = {
        "training": "scripts/build_atoken_tiny.py",
        "stage_minutes": json.dumps(minutes),
        "licence_note": "see assets/atoken-tiny.md",
    }
    cont = training.load_trained(cont_src)
    cont_path = training.save_model(
        cont,
        ASSETS / "atoken-tiny.safetensors",
        training.export_config(cont, name="atoken-tiny"),
        "float16",
        common,
    )
    disc = training.load_trained(disc_src)
    # the FSQ model's encoder is stage 3's (frozen in stage 4): store it once. Runs made before
    # the EMA kept frozen weights bit-exact differ by float rounding only, below float16's
    # resolution (relative 1e-3) that the bundle is stored in.
    enc_a, enc_b = cont.encoder.state_dict(), disc.encoder.state_dict()
    bad = [k for k in enc_a if not torch.allclose(enc_a[k], enc_b[k], rtol=1e-3, atol=1e-4)]
    assert not bad, f"stage 4 changed the encoder: {bad[:5]}"
    disc_path = training.save_model(
        disc,
        ASSETS / "atoken-tiny-d.safetensors",
        training.export_config(disc, name="atoken-tiny-d"),
        "float16",
        common,
        encoder_from="atoken-tiny.safetensors",
    )
    return cont_path, disc_path


def photo_metrics(model, photos: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """PSNR / SSIM of a model on whole photos (centre crop to multiples of 16)."""
    pairs = training.reconstruct_arrays(model, list(photos.values()))
    return {
        n: {"psnr": psnr(t[0], r[0]), "ssim": ssim(t[0], r[0])} for n, (t, r) in zip(photos, pairs)
    }


def pca_metrics(
    photos: dict[str, np.ndarray], train: list[np.ndarray]
) -> dict[str, dict[str, float]]:
    """Per-patch PCA with 48 numbers per patch, fitted three ways."""
    out: dict[str, dict[str, float]] = {}
    pooled = training.pca_reconstruct(list(photos.values()), 48)
    trained = training.pca_reconstruct(list(photos.values()), 48, fit_on=train)
    for i, (name, img) in enumerate(photos.items()):
        target = training.pca_reconstruct([img], 768)[0]  # the centre crop itself
        own = training.pca_reconstruct([img], 48)[0]
        out[name] = {
            "per_photo": psnr(target, own),
            "pooled_test": psnr(target, pooled[i]),
            "train_photos": psnr(target, trained[i]),
        }
    return out


def evaluate(cont_path: Path, disc_path: Path, out: Path) -> dict:
    """Everything the card reports."""
    t0 = time.time()
    photos = dict(zip(TEST_PHOTOS, data.skimage_photos(TEST_PHOTOS)))
    train = data.skimage_photos(TRAIN_PHOTOS)
    cont, disc = training.load_trained(cont_path), training.load_trained(disc_path)
    report: dict = {
        "files": {p.name: round(p.stat().st_size / 2**20, 2) for p in (cont_path, disc_path)}
    }
    report["params"] = sum(p.numel() for p in cont.parameters())
    report["photos"] = {
        "atoken-tiny": photo_metrics(cont, photos),
        "atoken-tiny-d": photo_metrics(disc, photos),
        "pca48": pca_metrics(photos, train),
    }
    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image

        for name, img in photos.items():
            Image.fromarray(img).save(Path(tmp) / f"{name}.png")
        # EfficientNet-Lite0 distances, PCA-48 fitted on these photos and codecs at the tokens' bits
        report["folder_eval"] = {
            name: {
                k: v
                for k, v in evaluate_folder(
                    m, tmp, max_side=None, pca_components=48, codecs=True
                ).items()
                if k != "per_item"
            }
            for name, m in (("atoken-tiny", cont), ("atoken-tiny-d", disc))
        }
    # videos: a generated held-out clip set and the (seen) training video
    from atoken.training import world

    rng = np.random.default_rng(5)
    clips = [
        world.render_video(world.sample_spec(rng, "video", "held_out"), 96, 16) for _ in range(8)
    ]
    bbb = data.read_frames(ASSETS / "video" / "bigbuckbunny_512x288.mp4", 40, 16)
    for name, m in (("atoken-tiny", cont), ("atoken-tiny-d", disc)):
        gen = [psnr(t, r) for t, r in training.reconstruct_arrays(m, clips)]
        ((t, r),) = training.reconstruct_arrays(m, [bbb])
        report.setdefault("video", {})[name] = {
            "world_held_out_psnr": float(np.mean(gen)),
            "bigbuckbunny_seen_psnr": psnr(t, r),
        }
    # per-frame PSNR inside a 4-frame temporal patch (issue 16; benchmarks/video_frames.py)
    report["video_frames"] = {
        name: video_frames.measure(m)
        for name, m in (("atoken-tiny", cont), ("atoken-tiny-d", disc))
    }
    # 3D: voxel-feature PSNR of held-out primitives (1024-voxel subsets)
    for name, m in (("atoken-tiny", cont), ("atoken-tiny-d", disc)):
        vals = []
        for shape, colour in world.combinations("3d", "held_out"):
            f, c = world.render_voxels(world.WorldSpec("3d", shape, colour, seed=11))
            s = data.voxel_sample(f, c, max_tokens=1024, rng=np.random.default_rng(0))
            b = data.collate([s])
            with torch.no_grad():
                rec, _ = m.reconstruct(b.tokens)
            a = ((b.tokens.feats[:, :768] + 1) * 127.5).clamp(0, 255).round()
            r = ((rec.feats[:, :768].float() + 1) * 127.5).clamp(0, 255).round()
            vals.append(psnr(a.numpy().astype(np.uint8), r.numpy().astype(np.uint8)))
        report.setdefault("voxels", {})[name] = {"held_out_feature_psnr": float(np.mean(vals))}
    # zero-shot on the generated world
    zs = {}
    for kind, count in (("image", 128), ("video", 64), ("3d", 25)):
        for split in ("held_out", "train"):
            zs[f"{kind}/{split}"] = training.evaluate_world(
                cont, "minilm", kind, split=split, count=count, seed=7
            )
    report["zero_shot"] = zs
    report["logit_scale"], report["logit_bias"] = cont.config.logit_scale, cont.config.logit_bias
    report["eval_seconds"] = time.time() - t0
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def summary(report: dict) -> str:
    """A short text table of the main numbers."""
    lines = []
    ph = report["photos"]
    lines.append("photo      tiny   tiny-d  pca/photo  pca/pooled  pca/train")
    for n in TEST_PHOTOS:
        lines.append(
            f"{n[:10]:10s} {ph['atoken-tiny'][n]['psnr']:6.2f} {ph['atoken-tiny-d'][n]['psnr']:6.2f} "
            f"{ph['pca48'][n]['per_photo']:9.2f} {ph['pca48'][n]['pooled_test']:10.2f} "
            f"{ph['pca48'][n]['train_photos']:9.2f}"
        )
    mean = lambda key, sub: float(np.mean([ph[key][n][sub] for n in TEST_PHOTOS]))  # noqa: E731
    lines.append(
        f"{'mean':10s} {mean('atoken-tiny', 'psnr'):6.2f} {mean('atoken-tiny-d', 'psnr'):6.2f} "
        f"{mean('pca48', 'per_photo'):9.2f} {mean('pca48', 'pooled_test'):10.2f} "
        f"{mean('pca48', 'train_photos'):9.2f}"
    )
    for name, res in report["video_frames"].items():
        pos = " ".join(f"{x:.2f}" for x in res["held_out"]["position_psnr"])
        lines.append(
            f"video {name}: held-out PSNR at positions 0-3 {pos} (spread "
            f"{res['held_out']['spread']:.2f})"
        )
    for k, v in report["zero_shot"].items():
        extra = f" motion {v['motion_accuracy']:.2f}" if "motion_accuracy" in v else ""
        lines.append(
            f"zero-shot {k:14s} acc {v['accuracy']:.2f} (chance {v['chance']:.3f}) "
            f"colour {v['colour_accuracy']:.2f} shape {v['shape_accuracy']:.2f}{extra}"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, train, export, evaluate."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "atoken-tiny")
    ap.add_argument("--steps-scale", type=float, default=1.0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--no-export", action="store_true", help="evaluate the stage outputs in --out")
    ap.add_argument(
        "--frames-from-assets",
        action="store_true",
        help="only the frames step, on the bundled files (float16 -> float32), then export",
    )
    ap.add_argument(
        "--polish-d-from-assets",
        action="store_true",
        help="only stage 4e from the bundled atoken-tiny-d, then its frames 1-3 rows, then export",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bundled = ASSETS / "atoken-tiny.safetensors", ASSETS / "atoken-tiny-d.safetensors"
    if args.eval_only:
        cont, disc = bundled
    elif args.frames_from_assets:
        times = bundled_minutes(bundled[0])
        t1 = time.time()
        cont, disc = frames_step(args.out, *bundled)
        times["frames"] = time.time() - t1
        cont, disc = export(args.out, times, cont, disc)
    elif args.polish_d_from_assets:
        times = bundled_minutes(bundled[0])
        start = args.out / "s4f_bundled" / "model.safetensors"  # float32, encoder merged
        training.save_model(training.load_trained(bundled[1]), start)
        times["s4e_perceptual"] = run_stage(args.out, "s4e_perceptual", start, args.steps_scale)
        t1 = time.time()
        cont, disc = frames_step(
            args.out, bundled[0], args.out / "s4e_perceptual" / "model.safetensors", design=False
        )
        times["frames_d"] = time.time() - t1
        cont, disc = export(args.out, times, cont, disc)
    else:
        times = run_stages(args.out, args.steps_scale, args.resume)
        t1 = time.time()
        cont, disc = frames_step(
            args.out,
            args.out / "s3e_perceptual" / "model.safetensors",
            args.out / "s4e_perceptual" / "model.safetensors",
        )
        times["frames"] = time.time() - t1
        if not args.no_export:
            cont, disc = export(args.out, times, cont, disc)
        print(
            f"[build] training: {sum(times.values()) / 60:.1f} min "
            f"({', '.join(f'{k} {v / 60:.1f}' for k, v in times.items())})",
            flush=True,
        )
    report = evaluate(cont, disc, args.out)
    print(summary(report))
    print(
        f"[build] total wall time {(time.time() - t0) / 60:.1f} min; report: {args.out / 'report.json'}"
    )


if __name__ == "__main__":
    main()
