"""Write the example images and video of this folder from scikit-image's bundled photos.

python assets/examples/make_examples.py

astronaut (NASA, public domain), chelsea the cat and coffee (CC0, Stefan van der Walt /
Rachel Michetti) ship inside the scikit-image wheel; see assets/LICENSES.md. The video is a
slow pan and zoom over the astronaut photo, and the pencil a small procedural mesh (few voxels,
so the 3D tab runs in seconds on a CPU), both written by this script (CC0).
"""

from __future__ import annotations

from pathlib import Path

import imageio_ffmpeg
import numpy as np
import trimesh
from PIL import Image
from skimage import data

HERE = Path(__file__).parent
MAX_SIDE = 320


def small(img: np.ndarray, max_side: int = MAX_SIDE) -> Image.Image:
    """Lanczos-downscale so the longer side is ``max_side``."""
    pil = Image.fromarray(img).convert("RGB")
    s = max_side / max(pil.size)
    return pil.resize((round(pil.width * s), round(pil.height * s)), Image.LANCZOS)


def pan_video(img: np.ndarray, path: Path, frames: int = 32, size: int = 128) -> None:
    """A slow diagonal pan with a gentle zoom over ``img``, as an H.264 mp4."""
    h, w = img.shape[:2]
    writer = imageio_ffmpeg.write_frames(
        str(path), (size, size), fps=12, quality=8, pix_fmt_out="yuv420p", macro_block_size=16
    )
    writer.send(None)
    for i in range(frames):
        t = i / (frames - 1)
        side = int(min(h, w) * (0.75 - 0.2 * t))
        top, left = int((h - side) * 0.2 * t), int((w - side) * (0.1 + 0.5 * t))
        crop = Image.fromarray(img[top : top + side, left : left + side])
        writer.send(np.asarray(crop.resize((size, size), Image.LANCZOS)))
    writer.close()


def pencil() -> trimesh.Trimesh:
    """A vertex-coloured pencil along z: yellow hexagonal body, wooden cone, graphite tip, eraser."""

    def part(mesh: trimesh.Trimesh, rgb: tuple[int, int, int]) -> trimesh.Trimesh:
        mesh.visual = trimesh.visual.ColorVisuals(
            mesh, vertex_colors=np.tile([*rgb, 255], (len(mesh.vertices), 1))
        )
        return mesh

    body = trimesh.creation.cylinder(radius=0.05, height=0.7, sections=6)
    body.apply_translation([0, 0, 0.35])
    eraser = trimesh.creation.cylinder(radius=0.05, height=0.1, sections=24)
    eraser.apply_translation([0, 0, 0.75])
    wood = trimesh.creation.cone(radius=0.05, height=0.15, sections=24)
    wood.apply_transform(trimesh.transformations.rotation_matrix(np.pi, [1, 0, 0]))
    tip = trimesh.creation.cone(radius=0.015, height=0.045, sections=12)
    tip.apply_transform(trimesh.transformations.rotation_matrix(np.pi, [1, 0, 0]))
    tip.apply_translation([0, 0, -0.105])
    parts = [
        part(body, (250, 200, 30)),
        part(eraser, (240, 130, 150)),
        part(wood, (222, 184, 135)),
        part(tip, (60, 60, 60)),
    ]
    return trimesh.util.concatenate(parts)


def main() -> None:
    small(data.astronaut()).save(HERE / "astronaut.png", optimize=True)
    small(data.chelsea()).save(HERE / "chelsea.png", optimize=True)
    small(data.coffee()).save(HERE / "coffee.png", optimize=True)
    pan_video(data.astronaut(), HERE / "astronaut_pan.mp4")
    pencil().export(HERE / "pencil.glb")


if __name__ == "__main__":
    main()
