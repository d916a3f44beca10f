"""Fit the frames 1-3 part of a tokenizer's video code in closed form (issue 16).

A token holds ``patch_t`` = 4 frames (3072 = 4 x 768 numbers); an image token fills frame 0 and
leaves frames 1-3 zero. A model trained mostly on images therefore reads almost only frame 0 of a
video token, and its decoder repeats frame 0 for frames 1-3: reconstructed videos stutter every
4 frames. Gradient training of the frames 1-3 weights does not leave that point (the copy decoder
is stationary by the symmetry of motion direction; it drifts to a blend of the 4 frames).

Here the frames 1-3 weights are set by least squares instead, leaving every frame-0 weight, so
every image and 3D encoding, bit-exact:

1. With the frames 1-3 input columns zeroed, the latent of a token is close to linear in its
   frame 0 (R^2 0.999 for atoken-tiny): fit that linear surrogate ``z ~ E0 x0`` and the frame-0
   decoder ``x0 ~ D0 z``.
2. Find the best linear code of the whole token under those fixed parts,
   ``z = E0 x0 + Er xr``, ``x0 ~ D0 z``, ``xr ~ V z`` (``xr`` = frames 1-3), by alternating least
   squares from a random start.
3. Make the network compute ``Er``: input columns ``W_k = W_0 M_k`` with
   ``M_k = D0 (E0 D0)^-1 Er_k`` make the encoder see frame 0 plus a picture in its own decodable
   subspace (``E0 M_k = Er_k``), the input an image encoder knows.
4. Fit the decoder's frames 1-3 output rows by least squares on its final hidden states.

`design_frame_code` does 1-4 on a tokenizer; `fit_frame_rows` does 4 alone (for a second
decoder, such as FSQ atoken-tiny-d's, that shares the encoder).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..core.patchify import to_model_range, tokenize
from ..core.sparse import SparseTensor


def clip_tokens(clips: Sequence[np.ndarray]) -> list[SparseTensor]:
    """uint8 clips ``[T, H, W, 3]`` (T a multiple of 4) -> one token set per clip."""
    return [tokenize([to_model_range(c)]) for c in clips]


def frame_width(model) -> int:
    """Numbers per frame in a token (768 for 16x16 RGB patches)."""
    return model.config.in_channels // model.patch_t


@torch.no_grad()
def run_tokens(model, pool: Sequence[SparseTensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Tokens ``X``, the latents the decoder sees ``Z`` (mean, or FSQ codes), the decoder's
    hidden states before its output layer ``H`` and the decoded tokens ``Y``, over the pool."""
    seen: dict[str, Tensor] = {}
    hook = model.decoder.out_layer.register_forward_pre_hook(
        lambda _m, a: seen.__setitem__("h", a[0].detach().float())
    )
    xs, zs, hs, ys = [], [], [], []
    try:
        for tokens in pool:
            enc = model.encode(tokens, pool=False)
            latent = model.latent_for_decoding(enc)
            ys.append(model.decode(latent).feats.float().cpu())
            xs.append(tokens.feats.float())
            zs.append(latent.feats.float().cpu())
            hs.append(seen["h"].cpu())
    finally:
        hook.remove()
    return torch.cat(xs), torch.cat(zs), torch.cat(hs), torch.cat(ys)


def position_psnr(x: Tensor, y: Tensor, frames: int = 4) -> list[float]:
    """PSNR (pixels in [-1, 1]) of each position inside the temporal patch, over all tokens."""
    w = x.shape[1] // frames
    out = []
    for k in range(frames):
        mse = ((x[:, k * w : (k + 1) * w] - y[:, k * w : (k + 1) * w]) ** 2).mean().item()
        out.append(round(10 * float(np.log10(4.0 / max(mse, 1e-12))), 2))
    return out


def _ridge_gram(a: Tensor, ridge: float) -> Tensor:
    """``a^T a + ridge * mean(diag) I`` (``a`` float64)."""
    g = a.T @ a
    return g + ridge * g.diagonal().mean() * torch.eye(len(g), dtype=g.dtype)


def _least_squares(a: Tensor, b: Tensor, ridge: float, intercept: bool) -> Tensor:
    """argmin_w |[a, 1] w - b|^2 + ridge * mean(diag) |w|^2 in float64 -> ``[(in (+1)), out]``."""
    a = a.double()
    if intercept:
        a = torch.cat([a, a.new_ones(len(a), 1)], 1)
    return torch.linalg.solve(_ridge_gram(a, ridge), a.T @ b.double())


def fit_frame_rows(model, pool: Sequence[SparseTensor], ridge: float = 1e-5) -> dict:
    """Refit only the decoder's frames 1-3 output rows on ``pool`` (step 4) by least squares of
    the frames on the decoder's hidden states; returns per-position PSNR on the pool before and
    after (the output layer is linear in those states, so "after" needs no second pass)."""
    x, _, h, y = run_tokens(model, pool)
    w = frame_width(model)
    layer = model.decoder.out_layer
    sol = _least_squares(h, x[:, w:], ridge, intercept=layer.bias is not None)
    with torch.no_grad():
        layer.weight[w:] = sol[: h.shape[1]].T.to(layer.weight)
        if layer.bias is not None:
            layer.bias[w:] = sol[-1].to(layer.bias)
    rows = h @ layer.weight[w:].float().T
    if layer.bias is not None:
        rows += layer.bias[w:].float()
    after = torch.cat([y[:, :w], rows], 1)
    return {
        "tokens": len(x),
        "rows_before": position_psnr(x, y, model.patch_t),
        "rows_after": position_psnr(x, after, model.patch_t),
    }


def design_frame_code(
    model,
    pool: Sequence[SparseTensor],
    *,
    iters: int = 40,
    seed: int = 0,
    ridge: float = 1e-2,
    log=print,
) -> dict:
    """Steps 1-4 on ``model`` in place (float32 weights; frame-0 weights untouched). Returns
    what was measured on the pool at each step."""
    t0 = time.time()
    w = frame_width(model)
    w_in = model.encoder.input_layer.weight
    with torch.no_grad():
        w_in[:, w:] = 0
    x, z, _, y = run_tokens(model, pool)
    report: dict = {"tokens": len(x), "frame0_only": position_psnr(x, y)}
    x0, xr = x[:, :w], x[:, w:]
    # 1. linear surrogate of the image path
    e0 = _least_squares(x0, z, 1e-3, intercept=True)  # [w + 1, C]
    d0 = _least_squares(z, y[:, :w], 1e-3, intercept=True)  # [C + 1, w]
    zb = torch.cat([x0.double(), x0.new_ones(len(x0), 1).double()], 1) @ e0
    report["surrogate_r2"] = float(
        1 - ((zb - z.double()) ** 2).sum() / ((z - z.mean(0)) ** 2).sum()
    )
    # 2. alternating least squares for Er (frames 1-3 -> latent) and V (latent -> frames 1-3)
    xd, xrd = x.double(), xr.double()
    chol = torch.linalg.cholesky(_ridge_gram(xrd, ridge))
    ones = torch.ones(len(x), 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    er = 0.01 * torch.randn(xr.shape[1], z.shape[1], generator=gen, dtype=torch.float64)
    for _ in range(iters):
        code = torch.cat([zb + xrd @ er, ones], 1)
        v = torch.linalg.solve(code.T @ code, code.T @ xrd)
        dec = torch.cat([d0, v], 1)  # [C + 1, 4w]
        dm, db = dec[:-1], dec[-1]
        best = torch.linalg.solve(dm @ dm.T, dm @ (xd - db).T).T  # the latent each token wants
        er = torch.cholesky_solve(xrd.T @ (best - zb), chol)
    code = torch.cat([zb + xrd @ er, ones], 1)
    report["linear_code"] = position_psnr(x, (code @ dec).float())
    log(f"[frames] linear code on the pool: {report['linear_code']} ({time.time() - t0:.0f}s)")
    # 3. encoder columns that compute Er through the image path
    e0m, d0m = e0[:-1].T, d0[:-1].T  # [C, w], [w, C]
    lift = d0m @ torch.linalg.inv(e0m @ d0m)  # [w, C]: latent direction -> decodable picture
    with torch.no_grad():
        w0 = w_in[:, :w].double()
        for k in range(model.patch_t - 1):
            block = er[k * w : (k + 1) * w].T  # [C, w]
            w_in[:, w * (k + 1) : w * (k + 2)] = (w0 @ lift @ block).to(w_in)
    # 4. decoder rows on the network's own hidden states
    rows = fit_frame_rows(model, pool)
    report["designed_encoder"] = rows["rows_before"]
    report["designed"] = rows["rows_after"]
    report["seconds"] = round(time.time() - t0, 1)
    log(f"[frames] network on the pool: {report['designed']} ({report['seconds']}s)")
    return report
