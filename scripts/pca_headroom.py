"""How much room is there above per-patch PCA-48 on the held-out photos, for simple codes?

The bundled atoken-tiny has to beat per-patch PCA with 48 numbers per 16x16 patch. This script
measures two classic ways a nonlinear or context-aware code gains over one global PCA, so the
model's figures can be read against them (PSNR in dB on the four held-out photos):

- a mixture of K PCAs (local PCA, "k-subspaces"): each patch is coded by the subspace that
  reconstructs it best, with 47 coefficients (the 48th number names the subspace), assignment by
  the true reconstruction error (an upper bound for a learnt encoder of this kind);
- PCA-48 plus a linear prediction of each patch's residual from the 3x3 neighbourhood of codes
  (what a decoder that looks at neighbouring tokens could add to a PCA code, linearly).

Each is fitted on the training photos (at three scales) and, as the comparator's privilege, on
the held-out photos themselves. Runs in about 3 minutes on 2 cores:

    python scripts/pca_headroom.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build_atoken_tiny import ROOT, TEST_PHOTOS  # noqa: E402

from atoken import training  # noqa: E402
from atoken.pipelines import metrics  # noqa: E402
from atoken.training import data  # noqa: E402

# the photos atoken-tiny's last stage trained on (its first data source)
STAGE = ROOT / "configs" / "train" / "atoken_tiny_s3c_mse.yaml"
TRAIN = tuple(training.load_train_config(STAGE).data["sources"][0]["names"])


def patch_rows(img: np.ndarray) -> np.ndarray:
    """``[h, w, 768]`` patches in [-1, 1] of the model's centre crop."""
    return training.patch_vectors(img) / 127.5 - 1


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    """PSNR of two patch arrays after rounding to 8 bits, like the card's figures."""
    x, y = (np.clip(np.round((v + 1) * 127.5), 0, 255).astype(np.uint8) for v in (x, y))
    return metrics.psnr(x, y)


def fit_pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(0)
    _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
    return mu, vt[:k]


def project(x: np.ndarray, mu: np.ndarray, basis: np.ndarray) -> np.ndarray:
    return mu + (x - mu) @ basis.T @ basis


def mixture(x: np.ndarray, k: int, dims: int, rng: np.random.Generator, rounds: int = 8) -> list:
    """k-subspaces clustering: alternate fitting a PCA per cluster and reassigning by error."""
    labels = rng.integers(k, size=len(x))
    models = []
    for _ in range(rounds):
        models = []
        for c in range(k):
            members = x[labels == c]
            if len(members) <= dims:  # an emptied cluster restarts on random patches
                members = x[rng.integers(len(x), size=4 * dims)]
            models.append(fit_pca(members, dims))
        labels = assign(x, models)
    return models


def assign(x: np.ndarray, models: list) -> np.ndarray:
    err = np.stack([((x - project(x, mu, b)) ** 2).sum(1) for mu, b in models], 1)
    return err.argmin(1)


def code_mixture(x: np.ndarray, models: list) -> np.ndarray:
    labels = assign(x, models)
    out = np.empty_like(x)
    for c, (mu, b) in enumerate(models):
        sel = labels == c
        out[sel] = project(x[sel], mu, b)
    return out


def neighbourhood(codes: np.ndarray) -> np.ndarray:
    """``[h, w, 9 * L + 1]``: the 3x3 neighbourhood of codes (edge-padded) and a constant."""
    h, w, _ = codes.shape
    pad = np.pad(codes, ((1, 1), (1, 1), (0, 0)), mode="edge")
    feats = [pad[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
    return np.concatenate(feats + [np.ones((h, w, 1))], -1)


def context_fit(grids: list[np.ndarray], mu: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Ridge map from neighbourhood codes to the PCA residual of the centre patch."""
    xs, ys = [], []
    for g in grids:
        codes = (g - mu) @ basis.T
        xs.append(neighbourhood(codes).reshape(-1, 9 * basis.shape[0] + 1))
        ys.append((g - mu - codes @ basis).reshape(-1, 768))
    x, y = np.concatenate(xs), np.concatenate(ys)
    return np.linalg.solve(x.T @ x + 1.0 * np.eye(x.shape[1]), x.T @ y)


def context_code(g: np.ndarray, mu: np.ndarray, basis: np.ndarray, w: np.ndarray) -> np.ndarray:
    codes = (g - mu) @ basis.T
    return mu + codes @ basis + neighbourhood(codes) @ w


def main() -> None:
    t0 = time.time()
    rng = np.random.default_rng(0)
    train_imgs = []
    for a in data.skimage_photos(TRAIN):
        a = data.as_rgb_u8(a)
        for s in (1.0, 0.7, 0.5):
            size = (int(a.shape[1] * s), int(a.shape[0] * s))
            train_imgs.append(np.asarray(Image.fromarray(a).resize(size, Image.LANCZOS)))
    test_grids = [patch_rows(a) for a in data.skimage_photos(TEST_PHOTOS)]
    train_grids = [patch_rows(a) for a in train_imgs]
    fits = {
        "training photos": (train_grids, np.concatenate([g.reshape(-1, 768) for g in train_grids])),
        "held-out photos": (test_grids, np.concatenate([g.reshape(-1, 768) for g in test_grids])),
    }
    print(f"held-out photos: {', '.join(TEST_PHOTOS)}; PSNR dB per photo and mean")
    for fit_name, (grids, patches) in fits.items():
        print(f"\nfitted on the {fit_name} ({len(patches)} patches)")
        mu, basis = fit_pca(patches, 48)
        rows = {"PCA-48": [project(g.reshape(-1, 768), mu, basis) for g in test_grids]}
        w = context_fit(grids, mu, basis)
        rows["PCA-48 + linear 3x3 context"] = [context_code(g, mu, basis, w) for g in test_grids]
        for k in (4, 16):
            models = mixture(patches, k, 47, rng)
            rows[f"mixture of {k} PCAs (47 + index)"] = [
                code_mixture(g.reshape(-1, 768), models) for g in test_grids
            ]
        for name, recs in rows.items():
            vals = [psnr(g.reshape(-1, 768), r.reshape(-1, 768)) for g, r in zip(test_grids, recs)]
            per = " ".join(f"{v:6.2f}" for v in vals)
            print(f"  {name:34s} {per}   mean {np.mean(vals):6.2f}")
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
