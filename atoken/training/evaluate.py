"""``atoken eval``: reconstruction quality of a folder, against a per-patch PCA baseline and
standard codecs at the tokens' size.

Pixel metrics (PSNR, SSIM) and the EfficientNet-Lite0 distances (`atoken.pipelines.metrics`:
``perceptual`` per image, ``frechet`` over the feature positions of all frames) are taken on
the centre crop the model sees. Videos enter every metric frame by frame; the PCA baseline,
the token bit count and the codecs are for images only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from atoken.core.model import ATokenModel
from atoken.core.patchify import crop_box, to_uint8
from atoken.core.sparse import SparseTensor
from atoken.io.media import resize_max_side
from atoken.pipelines.codecs import CODECS, compare_codecs, missing_codecs
from atoken.pipelines.metrics import (
    MIN_SIDE,
    effnet_taps,
    frechet_distance_from_features,
    frechet_positions,
    perceptual_distance_from_taps,
    psnr,
    ssim,
)
from atoken.pipelines.rate import token_rate
from atoken.pipelines.reconstruct import reconstruct_image
from atoken.text.towers import TextTower
from atoken.training import data as data_mod
from atoken.training.standins import text_tower_from_spec


def read_folder(
    folder: str | Path, max_side: int | None = 512, num_frames: int = 16
) -> list[tuple[Path, np.ndarray]]:
    """(path, uint8 array) of every image ``[H, W, 3]`` and video ``[T, H, W, 3]`` (its first
    ``num_frames`` frames) under ``folder``, downscaled so the longer side <= ``max_side``."""
    items = []
    for p in sorted(Path(folder).rglob("*")):
        suffix = p.suffix.lower()
        if not p.is_file():
            continue
        if suffix in data_mod.IMAGE_EXTENSIONS:
            items.append((p, resize_max_side(data_mod.read_image(p), max_side)))
        elif suffix in data_mod.VIDEO_EXTENSIONS:
            clip = data_mod.read_frames(p, 0, min(num_frames, data_mod.count_frames(p)))
            items.append((p, np.stack([resize_max_side(f, max_side) for f in clip])))
    return items


def _mean(values: list[float]) -> float:
    return float(np.mean(values))


def _mean_known(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return _mean(known) if known else None


def _frechet(taps_a: list, taps_b: list) -> float:
    fa = torch.cat([frechet_positions(t) for t in taps_a])
    fb = torch.cat([frechet_positions(t) for t in taps_b])
    return max(0.0, frechet_distance_from_features(fa, fb))


def evaluate_folder(
    model: ATokenModel,
    folder: str | Path,
    *,
    max_side: int | None = 512,
    num_frames: int = 16,
    pca_components: int | None = None,
    codecs: bool = False,
    zero_shot: str | Path | None = None,
    text_tower: str | None = None,
) -> dict[str, Any]:
    """Quality of ``model``'s reconstructions of a folder, as one JSON-ready dict.

    Keys: ``items``, ``psnr``, ``ssim``, ``perceptual`` (means over items; videos: mean over
    frames), ``frechet`` (`atoken.pipelines.metrics.frechet_feature_distance` over all frames),
    ``per_item``; with ``pca_components``: ``pca_psnr``, ``pca_ssim``, ``pca_perceptual``,
    ``pca_frechet`` of a per-patch PCA fitted on these very images (an oracle fit); with
    ``codecs``: ``tokens_bpp`` (`atoken.pipelines.rate.token_rate`, mean over images),
    ``tokens_stored_bpp`` and ``codecs`` = ``{name: {bpp, psnr, ssim, perceptual, fits}}``,
    each codec at each image's token bits (means over images; ``fits`` is True when every
    image fitted), plus ``codecs_missing`` naming codecs Pillow lacks; with ``zero_shot``:
    ``zero_shot_accuracy`` and ``zero_shot_top5``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"evaluation folder not found: {str(folder)!r}")
    items = read_folder(folder, max_side, num_frames)
    if not items:
        raise ValueError(f"no images or videos under {str(folder)!r}")
    model.eval()
    device = model.device
    per_item, taps_t, taps_r, images = [], [], [], []
    for path, array in items:
        if array.ndim == 3:
            res = reconstruct_image(model, array)
            target, rec = res.original, res.reconstruction
            images.append((path, res))
        else:
            ((target, rec),) = reconstruct_arrays(model, [array])
        seen = min(target.shape[-3:-1]) >= MIN_SIDE  # smaller crops get no feature metrics
        tt, tr = (effnet_taps(target, device), effnet_taps(rec, device)) if seen else (None, None)
        taps_t.append(tt)
        taps_r.append(tr)
        per_item.append(
            {
                "path": str(path),
                "frames": 1 if target.ndim == 3 else target.shape[0],
                "psnr": psnr(target, rec),
                "ssim": ssim(target, rec),
                "perceptual": _mean(perceptual_distance_from_taps(tt, tr)) if seen else None,
            }
        )
    result: dict[str, Any] = {"items": len(per_item)}
    for key in ("psnr", "ssim"):
        result[key] = _mean([x[key] for x in per_item])
    seen = [i for i, t in enumerate(taps_t) if t is not None]
    result["perceptual"] = _mean([per_item[i]["perceptual"] for i in seen]) if seen else None
    result["frechet"] = (
        _frechet([taps_t[i] for i in seen], [taps_r[i] for i in seen]) if seen else None
    )
    index = {str(p): i for i, (p, _) in enumerate(items)}
    if pca_components and images:
        recs = pca_reconstruct([res.original for _, res in images], pca_components)
        pairs = list(zip([res.original for _, res in images], recs))
        result["pca_psnr"] = _mean([psnr(t, r) for t, r in pairs])
        result["pca_ssim"] = _mean([ssim(t, r) for t, r in pairs])
        rows = [(index[str(p)], r) for (p, _), r in zip(images, recs)]
        rows = [(taps_t[i], effnet_taps(r, device)) for i, r in rows if taps_t[i] is not None]
        if rows:
            result["pca_perceptual"] = _mean(
                [perceptual_distance_from_taps(t, r)[0] for t, r in rows]
            )
            result["pca_frechet"] = _frechet([t for t, _ in rows], [r for _, r in rows])
    if codecs and images:
        missing = missing_codecs(CODECS)
        names = [n for n in CODECS if n not in missing]
        tokens_bpp, stored_bpp, points = [], [], {n: [] for n in names}
        for path, res in images:
            rate = token_rate(
                model, res.latent, res.original, res.reconstruction, fsq=res.indices is not None
            )
            i = index[str(path)]
            cmp = compare_codecs(
                res.original,
                rate.bits,
                names,
                qualities=None,
                reference_taps=taps_t[i],
                perceptual=taps_t[i] is not None,
                device=device,
            )
            item = per_item[i]
            item["tokens_bpp"] = rate.bpp
            item["codecs"] = cmp.summary()
            tokens_bpp.append(rate.bpp)
            stored_bpp.append(rate.stored_bpp)
            for n in names:
                points[n].append(cmp.at_budget[n])
        result["tokens_bpp"] = _mean(tokens_bpp)
        result["tokens_stored_bpp"] = _mean(stored_bpp)
        result["codecs"] = {
            n: {
                "bpp": _mean([p.bpp for p in pts]),
                "psnr": _mean([p.psnr for p in pts]),
                "ssim": _mean([p.ssim for p in pts]),
                "perceptual": _mean_known([p.perceptual for p in pts]),
                "fits": all(p.fits for p in pts),
            }
            for n, pts in points.items()
        }
        result["codecs_missing"] = missing
    if zero_shot is not None:
        from atoken.text.zeroshot import zero_shot_eval

        zs = zero_shot_eval(model, zero_shot, text_tower=text_tower_from_spec(text_tower))
        result["zero_shot_accuracy"] = zs.accuracy
        result["zero_shot_top5"] = zs.top5_accuracy
    result["per_item"] = per_item
    return result


@torch.no_grad()
def reconstruct_arrays(
    model: ATokenModel, items: Sequence[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(target, reconstruction) uint8 pairs ``[T, H, W, 3]`` of images / videos (centre crops)."""
    from atoken.core.patchify import detokenize, prepare_clip, tokenize

    out = []
    for item in items:
        x = data_mod._float_pixels(item)
        kind = "image" if x.dim() == 3 else "video"
        tok = tokenize([x]).to(model.device, model.dtype)
        rec, _ = model.reconstruct(tok)
        r = detokenize(SparseTensor(rec.feats.float().cpu(), rec.coords.cpu()), kind)[0]
        clip = prepare_clip(x)
        t = clip[:1] if kind == "image" else clip[: r.shape[0]]
        out.append(
            (
                to_uint8(t),
                to_uint8(r.permute(0, 2, 3, 1)),
            )
        )
    return out


def patch_vectors(image: np.ndarray) -> np.ndarray:
    """float64 ``[h, w, 768]`` 16x16x3 patches (0..255) of the centre crop to multiples of 16.

    The crop is the model's input crop (`crop_box`); the per-patch PCA baselines work on these.
    """
    a = data_mod.as_rgb_u8(image)
    top, left, ch, cw = crop_box(a.shape[0], a.shape[1])
    h, w = ch // 16, cw // 16
    a = a[top : top + ch, left : left + cw].astype(np.float64)
    return a.reshape(h, 16, w, 16, 3).transpose(0, 2, 1, 3, 4).reshape(h, w, 768)


def pca_reconstruct(
    images: Sequence[np.ndarray], components: int = 48, fit_on: Sequence[np.ndarray] | None = None
) -> list[np.ndarray]:
    """Per-patch PCA baseline: 16x16x3 patches -> ``components`` numbers -> patches.

    The basis (and mean patch) is fitted on the patches of ``fit_on`` (default: ``images``
    themselves, an oracle fit); images are centre-cropped to multiples of 16 like the model's
    input. Returns uint8 ``[H', W', 3]`` reconstructions.
    """
    grids = [patch_vectors(a) for a in images]
    fit_grids = grids if fit_on is None else [patch_vectors(a) for a in fit_on]
    fit = np.concatenate([g.reshape(-1, 768) for g in fit_grids])
    if not 1 <= components <= 768:
        raise ValueError(f"components must be in 1..768, got {components}")
    mu = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - mu, full_matrices=False)
    basis = vt[:components]
    out = []
    for g in grids:
        h, w = g.shape[:2]
        r = (g - mu) @ basis.T @ basis + mu
        img = r.reshape(h, w, 16, 16, 3).transpose(0, 2, 1, 3, 4).reshape(16 * h, 16 * w, 3)
        out.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
    return out


@torch.no_grad()
def evaluate_world(
    model: ATokenModel,
    text_tower: TextTower | str,
    kind: str = "image",
    *,
    split: str = "held_out",
    count: int = 64,
    seed: int = 0,
    size: int = 96,
    frames: int = 16,
    max_voxels: int | None = 1024,
) -> dict[str, float]:
    """Zero-shot accuracy on generated scenes (`atoken.training.world`), by default held-out pairs.

    Each scene is scored against every colour + shape label of its modality (64 for images and
    videos, 40 for 3D; template-ensembled prompts as in `atoken.text.zeroshot`). Returns the exact
    label accuracy, the colour and shape accuracies of the predicted label, the chance level
    and, for videos, the accuracy of picking the motion among the 7 captions that differ only
    in their motion. 3D scenes keep at most ``max_voxels`` voxels (random subset).
    """
    from atoken.text.zeroshot import label_embeddings
    from atoken.training import world

    tower = text_tower_from_spec(text_tower)
    if tower is None:
        raise ValueError("evaluate_world needs a text tower")
    rng = np.random.default_rng(seed)
    specs = [world.sample_spec(rng, kind, split) for _ in range(count)]
    labels = world.label_set(kind)
    emb = label_embeddings(labels, tower, modality=kind).float()
    model.eval()
    feats = []
    for spec in specs:
        if kind == "image":
            s = data_mod.image_sample(world.render_image(spec, size))
        elif kind == "video":
            s = data_mod.video_sample(world.render_video(spec, size, frames))
        else:
            f, c = world.render_voxels(spec)
            s = data_mod.voxel_sample(
                f, c, max_tokens=max_voxels, rng=np.random.default_rng(spec.seed)
            )
        batch = data_mod.collate([s])
        x = batch.tokens.to(model.device, model.dtype)
        feats.append(F.normalize(model.encode(x).pooled.float(), dim=-1).cpu())
    pooled = torch.cat(feats)
    pred = (pooled @ emb.T.cpu()).argmax(1).tolist()
    truth = [f"{s.colour} {s.shape}" for s in specs]
    out = {
        "count": float(count),
        "labels": float(len(labels)),
        "chance": 1.0 / len(labels),
        "accuracy": float(np.mean([labels[p] == t for p, t in zip(pred, truth)])),
        "colour_accuracy": float(
            np.mean([labels[p].split()[0] == s.colour for p, s in zip(pred, specs)])
        ),
        "shape_accuracy": float(
            np.mean([labels[p].split()[-1] == s.shape for p, s in zip(pred, specs)])
        ),
    }
    if kind == "video":
        hits = []
        for f, s in zip(pooled, specs):
            options = [f"{s.colour} {s.shape} {m}" for m in world.MOTIONS]
            e = label_embeddings(options, tower, modality="video").float().cpu()
            hits.append(world.MOTIONS[int((e @ f).argmax())] == s.motion)
        out["motion_accuracy"] = float(np.mean(hits))
        out["motion_chance"] = 1.0 / len(world.MOTIONS)
    return out
