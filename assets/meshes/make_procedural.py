"""Write the procedural example meshes of this folder (our own, CC0): run from the repo root.

python assets/meshes/make_procedural.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

HERE = Path(__file__).parent


def rainbow_torus() -> trimesh.Trimesh:
    """A torus with per-vertex colours: hue around the ring, brightness around the tube."""
    torus = trimesh.creation.torus(
        major_radius=1.0, minor_radius=0.35, major_sections=96, minor_sections=32
    )
    v = torus.vertices
    hue = (np.arctan2(v[:, 1], v[:, 0]) / (2 * np.pi)) % 1.0
    ring = np.hypot(v[:, 0], v[:, 1])
    shade = 0.65 + 0.35 * np.clip((ring - 0.65) / 0.7, 0, 1)
    k = (hue[:, None] * 6 + np.array([0.0, 4.0, 2.0])) % 6
    rgb = 1 - np.clip(np.minimum(k, 4 - k), 0, 1)  # hue -> RGB at full saturation
    rgb = (rgb * shade[:, None] * 255).round().astype(np.uint8)
    torus.visual = trimesh.visual.ColorVisuals(
        torus, vertex_colors=np.c_[rgb, np.full(len(v), 255)]
    )
    return torus


def blocks_scene() -> trimesh.Scene:
    """Three coloured boxes and a ball placed by scene-graph transforms (glTF, Y up)."""
    scene = trimesh.Scene()
    parts = [
        (trimesh.creation.box(extents=(2.0, 0.4, 1.2)), (0.0, 0.2, 0.0), (200, 60, 40)),
        (trimesh.creation.box(extents=(0.6, 1.0, 0.6)), (-0.6, 0.9, 0.0), (40, 120, 200)),
        (trimesh.creation.box(extents=(0.5, 0.5, 0.5)), (0.6, 0.65, 0.2), (230, 200, 40)),
        (trimesh.creation.icosphere(subdivisions=3, radius=0.35), (0.6, 1.25, 0.2), (60, 170, 80)),
    ]
    for i, (mesh, offset, colour) in enumerate(parts):
        mesh.visual = trimesh.visual.TextureVisuals(
            material=trimesh.visual.material.PBRMaterial(baseColorFactor=[*colour, 255])
        )
        transform = np.eye(4)
        transform[:3, 3] = offset
        scene.add_geometry(mesh, node_name=f"part{i}", transform=transform)
    return scene


if __name__ == "__main__":
    rainbow_torus().export(HERE / "rainbow_torus.ply")
    blocks_scene().export(HERE / "blocks.glb")
