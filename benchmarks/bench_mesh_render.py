"""Mesh renderer and multiview packing: speed per backend, and views/resolution quality curve.

    python benchmarks/bench_mesh_render.py              # everything (a few minutes on 2 cores)
    python benchmarks/bench_mesh_render.py --part speed # renderer + packing timings only
    python benchmarks/bench_mesh_render.py --part curve --meshes duck.glb panda.glb

Timings are the best of ``--repeat`` runs (the machine is shared). The curve runs the
``mesh_to_voxels`` pipeline for V views x R px on the example meshes and reports the voxel IoU
against the uncapped occupancy of a dense render (150 views at 512 px) and the share of voxels
whose feature comes from a view that actually shows them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import trimesh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atoken.threed import multiview  # noqa: E402
from atoken.threed.mesh import load_mesh  # noqa: E402
from atoken.threed.mesh_render import (  # noqa: E402
    DEFAULT_RESOLUTION,
    DEFAULT_VIEWS,
    default_cameras,
    gl_available,
    mesh_to_voxels,
    prepare_mesh,
    render_views,
)

MESHES = ROOT / "assets" / "meshes"
GOLDEN = ROOT / "tests" / "golden" / "multiview"


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def torus_10k() -> trimesh.Trimesh:
    """A 10,000-face vertex-coloured torus (the size the renderer candidates were timed on)."""
    mesh = trimesh.creation.torus(0.35, 0.12, major_sections=100, minor_sections=50)
    rgb = ((mesh.vertices - mesh.vertices.min(0)) / np.ptp(mesh.vertices, 0) * 255).astype(np.uint8)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.c_[rgb, rgb[:, :1] * 0 + 255])
    return mesh


def bench_speed(repeat: int) -> None:
    backends = ["torch", "gl"] if gl_available() else ["torch"]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch threads: {torch.get_num_threads()}; GL available: {gl_available()}; load {load}")
    print(f"\n## Renderer, seconds per view (best of {repeat}, 8 views per call)")
    print(f"{'mesh':24s} {'faces':>7s} {'res':>5s} " + " ".join(f"{b:>8s}" for b in backends))
    meshes = [("torus_10k (procedural)", torus_10k())]
    meshes += [(p.name, load_mesh(p)) for p in sorted(MESHES.glob("*")) if p.suffix != ".py"]
    for name, mesh in meshes:
        rm = prepare_mesh(mesh)
        for res in (256, 512):
            cams = default_cameras(8, res)
            row = []
            for b in backends:
                render_views(rm, cams[:1], backend=b)  # warm up (GL context, allocations)
                call = lambda b=b, rm=rm, cams=cams: render_views(rm, cams, backend=b)  # noqa: E731
                row.append(best_of(call, repeat) / 8)
            cells = " ".join(f"{t:8.4f}" for t in row)
            print(f"{name:24s} {len(mesh.faces):7d} {res:5d} {cells}")
    print(
        f"\n## mesh_to_voxels at the defaults ({DEFAULT_VIEWS} views x {DEFAULT_RESOLUTION} px), s"
    )
    for name in ("duck.glb", "panda.glb"):
        mesh = load_mesh(MESHES / name)
        cells = []
        for b in backends:
            t = best_of(lambda b=b, m=mesh: mesh_to_voxels(m, backend=b, normalize=False), repeat)
            cells.append(f"{b} {t:.3f}")
        print(f"{name:24s} " + "  ".join(cells))
    print("\n## Packing golden cases (pack_views: read files + pack), seconds")
    for case in sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()):
        folder = GOLDEN / case / "input"
        t_all = best_of(lambda f=folder: multiview.pack_views(f), repeat)
        images, depths, cams = multiview.load_views(folder)
        args = (images, depths, cams)
        t_pack = best_of(lambda a=args: multiview.pack_arrays(*a), repeat)
        print(f"{case:16s} views {len(cams):3d}  pack_views {t_all:.3f}  pack_arrays {t_pack:.3f}")
    # A realistic full-size input: 150 views at 512 px, above the 500k point cap.
    mesh = load_mesh(MESHES / "duck.glb")
    cams = default_cameras(150, 512)
    rgba, depth = render_views(mesh, cams)
    t = best_of(lambda: multiview.pack_arrays(list(rgba), list(depth), cams), repeat)
    n = int((depth >= 0).sum())
    print(f"duck 150 views x 512 px ({n} surface points, capped at 500k): pack_arrays {t:.3f}")


def pipeline(mesh, views: int, res: int, backend: str | None, max_points: int | None):
    """Render + pack like ``mesh_to_voxels``: (coords set, visible share, seconds, M)."""
    t = time.perf_counter()
    cams = default_cameras(views, res)
    rgba, depth = render_views(mesh, cams, backend=backend)
    depth = np.where(depth >= 0, depth.astype(np.float16).astype(np.float32), -1.0)
    gen = torch.Generator().manual_seed(0)
    if max_points is None:  # the uncapped truth: occupancy only
        points = multiview.surface_points(list(depth), cams)
        coords = multiview.occupied_voxels(points)
    else:
        _, coords = multiview.pack_arrays(
            list(rgba), list(depth), cams, max_points=max_points, generator=gen
        )
    seconds = time.perf_counter() - t
    return {tuple(c) for c in coords.tolist()}, visible_share(coords, cams, depth), seconds


def visible_share(coords, cams, depth: np.ndarray) -> float:
    """Share of voxels whose feature view (nearest camera) shows the voxel's own surface.

    Not shown: the centre projects outside the image, onto background, or behind a surface
    more than 1.5 voxels in front of it (the official rule has no visibility test).
    """
    view, uv = multiview.nearest_views(coords, cams)
    centres = multiview.voxel_centres(coords)
    w2c = torch.stack([c.w2c for c in cams])[view]
    z = (w2c[:, 2, :3] * centres).sum(1) + w2c[:, 2, 3]
    h, w = depth.shape[1:]
    col = torch.floor(uv[:, 0] * w).long()
    row = torch.floor(uv[:, 1] * h).long()
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    d = torch.full_like(z, -1.0)
    d[inside] = torch.from_numpy(depth)[view[inside], row[inside], col[inside]]
    seen = inside & (d >= 0) & (d >= z - 1.5 / 64)
    return float(seen.float().mean())


def bench_curve(names: list[str], backend: str | None) -> None:
    views_list = [8, 16, 32, 64, 150]
    print(f"\n## Views x resolution (backend {backend or 'auto'}, 500k point cap as official)")
    print("IoU: voxels vs the uncapped 150-view 512 px occupancy; seen: share of voxels whose")
    print("feature view shows them; sec: render + pack")
    print(f"{'mesh':18s} {'V':>4s} {'res':>4s} {'M':>6s} {'IoU':>6s} {'seen':>6s} {'sec':>6s}")
    summary: dict[tuple[int, int], list] = {}
    for name in names:
        mesh = load_mesh(MESHES / name)
        truth, _, _ = pipeline(mesh, 150, 512, backend, None)
        for res in (256, 512):
            for v in views_list:
                got, seen, t = pipeline(mesh, v, res, backend, multiview.MAX_SURFACE_POINTS)
                iou = len(truth & got) / len(truth | got)
                summary.setdefault((v, res), []).append((len(got), iou, seen, t))
                print(f"{name:18s} {v:4d} {res:4d} {len(got):6d} {iou:6.3f} {seen:6.3f} {t:6.2f}")
    print(f"\n## Mean over {len(names)} meshes")
    print(f"{'V':>4s} {'res':>4s} {'M':>6s} {'IoU':>6s} {'seen':>6s} {'sec':>6s}")
    for (v, res), rows in sorted(summary.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        m = np.mean(np.array(rows), 0)
        print(f"{v:4d} {res:4d} {m[0]:6.0f} {m[1]:6.3f} {m[2]:6.3f} {m[3]:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "speed", "curve"], default="all")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", choices=["gl", "torch"], default=None)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--meshes",
        nargs="*",
        default=["duck.glb", "panda.glb", "teapot.stl", "rainbow_torus.ply", "blocks.glb"],
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("all", "speed"):
        bench_speed(args.repeat)
    if args.part in ("all", "curve"):
        bench_curve(args.meshes, args.backend)


if __name__ == "__main__":
    main()
