"""Per-frame video PSNR of a model, and how it varies inside a temporal patch (issue 16).

    python benchmarks/video_frames.py                            # atoken-tiny and atoken-tiny-d
    python benchmarks/video_frames.py --model path/to/model.safetensors --json out.json
    python benchmarks/video_frames.py --model atoken-tiny --pca  # + a PCA-48 reference curve

A token covers 4 frames (``pt`` = 0..3); a decoder that only learnt frame 0 repeats it for the
other three, which shows as a sawtooth in the per-frame PSNR and as reconstructed frames that
are near copies of their patch's first one. Clips (none but bigbuckbunny seen in training as
video):

- ``world``: 8 held-out (shape, colour) clips of the generated world, 96 px, 16 frames (the
  build script's set);
- ``pan:NAME``: a slow pan with zoom over the held-out photos (chelsea, coffee,
  immunohistochemistry, camera), 128 px, 16 frames, made here the way
  ``assets/examples/make_examples.py`` makes ``astronaut_pan.mp4``;
- ``astronaut_pan``: that example file (the pan is unseen, the astronaut photo was a training
  photo);
- ``cut``: the chelsea pan cut to the coffee pan at frame 6 (inside a temporal patch), to see
  how long the first scene lingers;
- ``bigbuckbunny (seen)``: 16 frames of the training video, for reference.

Prints a table; ``--json`` also writes every number: per-frame PSNR (mean over a group's
clips), the mean per position, spread = max - min over positions, whole-clip PSNR (MSE over all
frames, the card's video number) and the copy measure (PSNR between each decoded frame and its
patch's decoded first frame: high means the patch repeats one picture). "held_out" averages
the per-position curves of the world and pan groups.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from atoken import training  # noqa: E402
from atoken.core.checkpoint import load  # noqa: E402
from atoken.pipelines.metrics import psnr  # noqa: E402
from atoken.pretrained.hub import load_pretrained  # noqa: E402
from atoken.training import (
    data,  # noqa: E402
    world,  # noqa: E402
)

TEST_PHOTOS = ("chelsea", "coffee", "immunohistochemistry", "camera")
PT = 4  # frames per temporal patch
CUT = 6  # the scene cut of the "cut" clip: its first frame of the second scene


def pan(img: np.ndarray, frames: int = 16, size: int = 128) -> np.ndarray:
    """A slow diagonal pan with a gentle zoom over ``img`` -> uint8 ``[frames, size, size, 3]``."""
    h, w = img.shape[:2]
    out = []
    for i in range(frames):
        t = i / (frames - 1)
        side = int(min(h, w) * (0.75 - 0.2 * t))
        top, left = int((h - side) * 0.2 * t), int((w - side) * (0.1 + 0.5 * t))
        crop = Image.fromarray(img[top : top + side, left : left + side])
        out.append(np.asarray(crop.resize((size, size), Image.LANCZOS)))
    return np.stack(out)


def clips() -> dict[str, list[np.ndarray]]:
    """The evaluation clips by group (uint8 ``[T, H, W, 3]``, T a multiple of 4)."""
    rng = np.random.default_rng(5)  # as scripts/build_atoken_tiny.py
    out: dict[str, list[np.ndarray]] = {
        "world": [
            world.render_video(world.sample_spec(rng, "video", "held_out"), 96, 16)
            for _ in range(8)
        ]
    }
    pans = {n: pan(p) for n, p in zip(TEST_PHOTOS, data.skimage_photos(TEST_PHOTOS))}
    for name, clip in pans.items():
        out[f"pan:{name}"] = [clip]
    ex = ROOT / "assets" / "examples" / "astronaut_pan.mp4"
    out["astronaut_pan"] = [data.read_frames(ex, 0, data.count_frames(ex))]
    out["cut"] = [np.concatenate([pans["chelsea"][:CUT], pans["coffee"][CUT:]])]
    bbb = ROOT / "assets" / "video" / "bigbuckbunny_512x288.mp4"
    out["bigbuckbunny (seen)"] = [data.read_frames(bbb, 40, 16)]
    return out


def frame_psnrs(model, clip: np.ndarray) -> tuple[list[float], list[float], float]:
    """Per-frame PSNR against the clip; PSNR of each decoded frame against its patch's first
    decoded frame (0 for the first frames themselves, which are left out); whole-clip PSNR."""
    ((t, r),) = training.reconstruct_arrays(model, [clip])
    own = [psnr(t[i], r[i]) for i in range(len(r))]
    copy = [psnr(r[i - i % PT], r[i]) if i % PT else 0.0 for i in range(len(r))]
    return own, copy, psnr(t, r)


def per_position(values: list[list[float]]) -> list[float]:
    """Mean over clips and patches of the values at each position pt = 0..3."""
    a = np.array([v for clip in values for v in clip], dtype=np.float64).reshape(-1, PT)
    return [float(x) for x in a.mean(axis=0)]


def measure(model) -> dict:
    """Every number for one model."""
    groups: dict = {}
    for group, items in clips().items():
        own, copy, whole = zip(*(frame_psnrs(model, c) for c in items))
        pos = per_position(list(own))
        groups[group] = {
            "clips": len(items),
            "frame_psnr": [float(np.mean(col)) for col in zip(*own)],
            "position_psnr": pos,
            "spread": max(pos) - min(pos),
            "mean_psnr": float(np.mean([v for o in own for v in o])),
            "clip_psnr": float(np.mean(whole)),  # the card's video number: MSE over the clip
            "copy_psnr": per_position(list(copy))[1:],  # positions 1..3 against position 0
        }
    held = [g for g in groups if g.startswith(("world", "pan:"))]
    pos = np.mean([groups[g]["position_psnr"] for g in held], axis=0)
    groups["held_out"] = {
        "groups": held,
        "position_psnr": [float(x) for x in pos],
        "spread": float(pos.max() - pos.min()),
        "max_group_spread": max(groups[g]["spread"] for g in held),
    }
    return groups


def video_tokens(clip: np.ndarray) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` -> float ``[tokens, 4 * 768]``, each a 4x16x16 patch, (pt, ph, pw, c)."""
    t, h, w = clip.shape[0], clip.shape[1] // 16 * 16, clip.shape[2] // 16 * 16
    p = clip[:, :h, :w].astype(np.float64).reshape(t // PT, PT, h // 16, 16, w // 16, 16, 3)
    return p.transpose(0, 2, 4, 1, 3, 5, 6).reshape(-1, PT * 768)


def pca_reference(count: int = 48) -> list[float]:
    """Held-out per-position PSNR of per-token PCA with ``count`` numbers per 4-frame token,
    fitted on training clips (24 world training-pair clips and bigbuckbunny in 16-frame chunks,
    224x128): what a linear code of atoken-tiny's size keeps of the motion inside a patch."""
    rng = np.random.default_rng(11)
    train = [
        world.render_video(world.sample_spec(rng, "video", "train"), 96, 16) for _ in range(24)
    ]
    bbb = ROOT / "assets" / "video" / "bigbuckbunny_512x288.mp4"
    for start in range(0, data.count_frames(bbb) - 16, 16):
        frames = data.read_frames(bbb, start, 16)
        train.append(np.stack([np.asarray(Image.fromarray(f).resize((224, 128))) for f in frames]))
    x = np.concatenate([video_tokens(c) for c in train])
    mean = x.mean(axis=0)
    basis = np.linalg.svd(x - mean, full_matrices=False)[2][:count]
    curves = []
    for group, items in clips().items():
        if not group.startswith(("world", "pan:")):
            continue
        own = []
        for clip in items:
            t, h, w = clip.shape[0], clip.shape[1] // 16 * 16, clip.shape[2] // 16 * 16
            rec = mean + (video_tokens(clip) - mean) @ basis.T @ basis
            rec = rec.reshape(t // PT, h // 16, w // 16, PT, 16, 16, 3).transpose(
                0, 3, 1, 4, 2, 5, 6
            )
            rec = np.clip(rec.reshape(t, h, w, 3), 0, 255).round().astype(np.uint8)
            own.append([psnr(clip[i, :h, :w], rec[i]) for i in range(t)])
        curves.append(per_position(own))
    return [float(x) for x in np.mean(curves, axis=0)]


def table(name: str, res: dict) -> str:
    """Readable summary of `measure`."""
    lines = [
        f"{name}: PSNR dB at positions pt=0..3 | spread | clip | decoded frame pt=1..3 vs pt=0"
    ]
    for group, v in res.items():
        if group == "held_out":
            continue
        p = " ".join(f"{x:5.2f}" for x in v["position_psnr"])
        c = " ".join(f"{x:5.1f}" for x in v["copy_psnr"])
        lines.append(f"  {group:24s} {p} | {v['spread']:5.2f} | {v['clip_psnr']:5.2f} | {c}")
    h = res["held_out"]
    lines.append(
        f"  {'held-out mean':24s} {' '.join(f'{x:5.2f}' for x in h['position_psnr'])} | "
        f"{h['spread']:5.2f} | largest group spread {h['max_group_spread']:.2f}"
    )
    cut = res["cut"]["frame_psnr"]
    around = " ".join(f"{x:5.2f}" for x in cut[CUT - 2 : CUT + 4])
    lines.append(f"  cut at frame {CUT}: frames {CUT - 2}-{CUT + 3} read {around}")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, measure, print."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        action="append",
        help="bundled name or .safetensors path (repeatable; default atoken-tiny, atoken-tiny-d)",
    )
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pca", action="store_true", help="also the per-token PCA-48 reference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.model or ["atoken-tiny", "atoken-tiny-d"]
    report = {}
    for name in names:
        t0 = time.time()
        model = load(name) if name.endswith(".safetensors") else load_pretrained(name)
        model = model.float().eval()
        report[name] = measure(model)
        print(table(name, report[name]), f"\n  ({time.time() - t0:.0f} s)", flush=True)
    if args.pca:
        report["pca48_train_clips"] = {"held_out": {"position_psnr": pca_reference()}}
        curve = report["pca48_train_clips"]["held_out"]["position_psnr"]
        print(
            "PCA-48 per 4-frame token, fitted on training clips: held-out mean",
            " ".join(f"{x:5.2f}" for x in curve),
            f"| {max(curve) - min(curve):5.2f}",
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
