"""Settings that make Gradio's two 3D renderers show a mesh and its Gaussians alike.

``gr.Model3D`` draws a Gaussian-splat .ply with gsplat.js and every other file with Babylon.js
(``templates/frontend/assets/Model3D-*.js`` picks the renderer from the file). Only Babylon reads
``clear_color`` and ``camera_position``; gsplat.js gets ``zoom_speed`` and ``pan_speed`` alone
and keeps its built-in camera (``Canvas3DGS-*.js`` in Gradio 6.31):

* ``OrbitControls(camera, canvas)`` with alpha = beta = 0.5 rad and radius 5 around the origin,
  the camera at ``5 (sin a cos b, -sin b, -cos a cos b)``;
* a pinhole with ``fx = fy = 1132`` px whatever the canvas size, whose projection sends world
  +y down the screen (3DGS's y-down convention, see :data:`atoken.core.gaussians.PLY_FRAMES`);
* a black background (the canvas's inline style, cleared to transparent).

Babylon (right-handed, glTF's +y up) puts an ``ArcRotateCamera`` at
``r (cos alpha sin beta, cos beta, sin alpha sin beta)`` with a vertical field of view of 0.8 rad.
The splat is written as the glTF preview turned 180 degrees about x, so gsplat's camera seen from
the preview's frame sits at ``5 (sin a cos b, sin b, cos a cos b)``: Babylon's alpha = 90° - a,
beta = 90° - b. Its radius is the one at which both show the object at the same size at the
orbit centre (the perspective still differs: a 1132 px focal length is about three times
Babylon's on a 320 px viewer).
"""

from __future__ import annotations

import math

SPLAT_ORBIT = (0.5, 0.5, 5.0)  # gsplat.js OrbitControls: alpha, beta (rad), radius
SPLAT_FOCAL = 1132.0  # px, gsplat.js Camera fx = fy
SPLAT_BACKGROUND = (0.0, 0.0, 0.0, 1.0)
MESH_FOV = 0.8  # rad, Babylon ArcRotateCamera's vertical field of view
BORDER = 2  # px of a Model3D block's height that its canvas does not get (1 px border)
# One wheel notch (deltaY 100) moves Babylon's camera 10% of its radius (Gradio sets
# wheelPrecision = 250 / radius, and the inertia of 0.9 sums the step ten times); gsplat.js moves
# 100 * 0.025 * (0.1 + 0.9 (r - 0.1) / 29.9) = 0.62 at r = 5, i.e. 12.4%. This evens the first
# notches out (gsplat's steps are not proportional to the radius, so they drift apart slowly).
_R = SPLAT_ORBIT[2]
SPLAT_ZOOM_SPEED = 0.1 * _R / (100 * 0.025 * (0.1 + 0.9 * (_R - 0.1) / 29.9))  # 0.81


def mesh_camera(height: int) -> tuple[float, float, float]:
    """Model3D ``camera_position`` (alpha, beta in degrees, radius) that frames the glTF preview
    as gsplat.js frames the splat, for a viewer ``height`` px tall."""
    a, b, r = SPLAT_ORBIT
    focal = (height - BORDER) / 2 / math.tan(MESH_FOV / 2)
    return 90.0 - math.degrees(a), 90.0 - math.degrees(b), r * focal / SPLAT_FOCAL


def mesh_viewer(height: int) -> dict:
    """``gr.Model3D`` keyword arguments for the input mesh viewer."""
    return {
        "clear_color": SPLAT_BACKGROUND,
        "camera_position": mesh_camera(height),
        "height": height,
    }


def splat_viewer(height: int) -> dict:
    """``gr.Model3D`` keyword arguments for the Gaussian-splat viewer."""
    return {
        "clear_color": SPLAT_BACKGROUND,  # unused by gsplat.js, kept in step for the record
        "zoom_speed": SPLAT_ZOOM_SPEED,
        "height": height,
    }
