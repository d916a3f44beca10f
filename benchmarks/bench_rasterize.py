"""Seconds per 512 px view of the pure-torch Gaussian rasteriser at 10k / 100k / 300k Gaussians.

Scene: a realistic decoder-like output: Gaussians on a bumpy closed shell inside [-0.5, 0.5]^3,
flattened along the surface normal, scales log-uniform in [1/512, 1/64] (voxel size and below),
opacities in [0.3, 1]; camera at radius 2, fov 40 degrees, 512x512 (the official preview setup).
``--stress`` adds two harder 300k scenes: every scale at the voxel size 1/64, and that with
opacities in [0.1, 0.4] (many more layers before a pixel saturates).

    .venv/bin/python benchmarks/bench_rasterize.py [--threads 2] [--sizes 10000 100000 300000]

Wall time is only meaningful on an otherwise idle machine; the CPU time is printed beside it.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atoken.core.cameras import turntable_cameras  # noqa: E402
from atoken.core.gaussians import Gaussians  # noqa: E402
from atoken.threed.rasterize import render_gaussians  # noqa: E402


def shell_scene(num: int, seed: int = 0) -> Gaussians:
    """Decoder-like Gaussians on a bumpy closed surface inside [-0.5, 0.5]^3."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.nn.functional.normalize(torch.randn(num, 3, generator=gen), dim=-1)
    theta = torch.atan2(normal[:, 1], normal[:, 0])
    bump = 0.06 * torch.sin(3 * theta) * torch.cos(4 * torch.asin(normal[:, 2]))
    xyz = normal * (0.36 + bump)[:, None] + 0.004 * torch.randn(num, 3, generator=gen)
    log_s = torch.empty(num, 1).uniform_(math.log(1 / 512), math.log(1 / 64), generator=gen)
    scaling = torch.exp(log_s) * torch.tensor([1.0, 1.0, 0.3])  # flat along the local z
    # Rotation taking local z to the normal (shortest arc), plus random spin noise.
    z = torch.tensor([0.0, 0.0, 1.0]).expand(num, 3)
    q = torch.cat([1.0 + (z * normal).sum(-1, keepdim=True), torch.linalg.cross(z, normal)], -1)
    q = torch.nn.functional.normalize(q + 0.05 * torch.randn(num, 4, generator=gen), dim=-1)
    rgb = 0.5 + 0.4 * torch.sin(6 * xyz + torch.tensor([0.0, 2.0, 4.0]))
    opacity = torch.empty(num, 1).uniform_(0.3, 1.0, generator=gen)
    return Gaussians.from_rgb(xyz, rgb, scaling, q, opacity)


def _time(gs: Gaussians, cam, repeats: int) -> tuple[float, float, float]:
    """Best wall and CPU seconds over ``repeats`` renders, and the covered fraction."""
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = render_gaussians(gs, cam, backend="torch")
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), float((out.alpha > 0.5).float().mean())


def main() -> None:
    """Time warm renders per size and print seconds, threads and peak RSS."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stress", action="store_true", help="also time two harder scenes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cam = turntable_cameras(8, resolution=args.resolution)[1]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.resolution}px")
    render_gaussians(shell_scene(1000), cam)  # warm-up
    rows = [(f"{n} Gaussians", shell_scene(n)) for n in args.sizes]
    if args.stress:
        voxel = shell_scene(300_000)
        voxel.scaling[:] = 1 / 64
        rows.append(("300000 Gaussians, all scales 1/64", voxel))
        faint = shell_scene(300_000)
        faint.scaling[:] = 1 / 64
        faint.opacity.uniform_(0.1, 0.4, generator=torch.Generator().manual_seed(1))
        rows.append(("300000 Gaussians, scales 1/64, opacity 0.1-0.4", faint))
    for name, gs in rows:
        wall, cpu, cover = _time(gs, cam, args.repeats)
        print(
            f"{name:>48s}: {wall:6.2f} s/view wall, {cpu:6.2f} s CPU (best of "
            f"{args.repeats}), coverage {cover:.2f}"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
