"""``atoken eval``: reconstruction quality of a folder, against a per-patch PCA baseline and
standard codecs at the tokens' size.

Pixel metrics (PSNR, SSIM) and the EfficientNet-Lite0 distances (`atoken.metrics`:
``perceptual`` per image, ``frechet`` over the feature positions of all frames) are taken on
the centre crop the model sees. Videos enter every metric frame by frame; the PCA baseline,
the token bit count and the codecs are for images only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from atoken import data as data_mod
from atoken.codecs import CODECS, compare_codecs, missing_codecs
from atoken.media import resize_max_side
from atoken.metrics import (
    MIN_SIDE,
    effnet_taps,
    frechet_distance_from_features,
    frechet_positions,
    perceptual_distance_from_taps,
    psnr,
    ssim,
)
from atoken.model import ATokenModel
from atoken.pipeline import reconstruct_image
from atoken.rate import token_rate
from atoken.training import pca_reconstruct, reconstruct_arrays, text_tower_from_spec


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
    frames), ``frechet`` (`atoken.metrics.frechet_feature_distance` over all frames),
    ``per_item``; with ``pca_components``: ``pca_psnr``, ``pca_ssim``, ``pca_perceptual``,
    ``pca_frechet`` of a per-patch PCA fitted on these very images (an oracle fit); with
    ``codecs``: ``tokens_bpp`` (`atoken.rate.token_rate`, mean over images),
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
        from atoken.zeroshot import zero_shot_eval

        zs = zero_shot_eval(model, zero_shot, text_tower=text_tower_from_spec(text_tower))
        result["zero_shot_accuracy"] = zs.accuracy
        result["zero_shot_top5"] = zs.top5_accuracy
    result["per_item"] = per_item
    return result
