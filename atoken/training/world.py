"""A procedural world with compositional captions: images, videos and 3D primitives.

Every sample is described by a `WorldSpec` (shape, colour, texture, motion or 3D primitive) and
rendered from a seed, so datasets of any size are reproducible without files. Captions follow
the zero-shot prompt templates (`atoken.text.zeroshot.TEMPLATES`), e.g. "a photo of a red striped
star." or "a video of a blue square moving left.", so an encoder trained on them answers the
app's prompts. A fixed set of attribute *combinations* is held out of training
(`is_held_out`): each shape and each colour still appears in training, only the pair is new,
which is what `zero_shot_world` measures.

Besides the captioned scenes, `texture_image` draws caption-free images rich in the statistics
of natural photos (1/f noise, gradients, "dead leaves" occlusions, fine texture), used to train
reconstruction without any photo collection (§3.3 trains on general images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from atoken.text.zeroshot import TEMPLATES

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "heart", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 200, 30),
    "purple": (148, 60, 190),
    "orange": (255, 127, 14),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
MOTIONS = (
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "rotating",
    "growing",
    "shrinking",
)
PRIMITIVES = ("sphere", "cube", "cylinder", "cone", "torus")
KINDS = ("image", "video", "3d")
SPLITS = ("train", "held_out", "all")

_TEXTURE_WORDS = {"plain": "", "striped": "striped", "dotted": "dotted", "checkered": "checkered"}


@dataclass(frozen=True)
class WorldSpec:
    """What one generated sample shows; ``seed`` fixes layout, background and texture details."""

    kind: str
    shape: str
    colour: str
    texture: str = "plain"
    motion: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        shapes = PRIMITIVES if self.kind == "3d" else SHAPES
        if self.shape not in shapes:
            raise ValueError(f"{self.kind} shape must be one of {shapes}, got {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"colour must be one of {tuple(COLOURS)}, got {self.colour!r}")
        if self.texture not in TEXTURES:
            raise ValueError(f"texture must be one of {TEXTURES}, got {self.texture!r}")
        if self.kind == "video" and self.motion not in MOTIONS:
            raise ValueError(f"a video needs a motion from {MOTIONS}, got {self.motion!r}")
        if self.kind != "video" and self.motion is not None:
            raise ValueError(f"only videos have a motion, got {self.motion!r} for {self.kind}")
        if self.kind == "3d" and self.texture != "plain":
            raise ValueError("3D primitives are plain-coloured")

    @property
    def label(self) -> str:
        """Bare description: "red striped star", "blue square moving left", "green torus"."""
        words = [self.colour, _TEXTURE_WORDS[self.texture], self.shape]
        text = " ".join(w for w in words if w)
        return f"{text} {self.motion}" if self.motion else text

    def caption(self, template: int | None = None) -> str:
        """The label inside one of the modality's prompt templates (index or the seed's choice)."""
        prompts = TEMPLATES[self.kind]
        i = self.seed % len(prompts) if template is None else int(template)
        return prompts[i % len(prompts)].format(self.label)


def prompt_templates(kind: str) -> tuple[str, ...]:
    """Caption templates of a modality (the zero-shot templates)."""
    if kind not in TEMPLATES:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return TEMPLATES[kind]


def is_held_out(kind: str, shape: str, colour: str) -> bool:
    """True for the attribute pairs kept out of training.

    A Latin transversal of the (shape, colour) grid: shape ``i`` is held out with colour
    ``(3 i + 1) mod 8`` (8 of 64 pairs for images and videos) and primitive ``i`` with colour
    ``(3 i + 2) mod 8`` (5 of 40 pairs for 3D). Every shape and colour keeps 7 (3D: 4) training
    partners.
    """
    colours = tuple(COLOURS)
    if kind == "3d":
        i = PRIMITIVES.index(shape)
        return colours.index(colour) == (3 * i + 2) % len(colours)
    i = SHAPES.index(shape)
    return colours.index(colour) == (3 * i + 1) % len(colours)


def combinations(kind: str, split: str = "all") -> list[tuple[str, str]]:
    """(shape, colour) pairs of a modality in a split (``train``, ``held_out`` or ``all``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    shapes = PRIMITIVES if kind == "3d" else SHAPES
    pairs = [(s, c) for s in shapes for c in COLOURS]
    if split == "all":
        return pairs
    want = split == "held_out"
    return [(s, c) for s, c in pairs if is_held_out(kind, s, c) == want]


def sample_spec(rng: np.random.Generator, kind: str, split: str = "train") -> WorldSpec:
    """A random spec of ``kind`` whose (shape, colour) pair belongs to ``split``."""
    pairs = combinations(kind, split)
    shape, colour = pairs[int(rng.integers(len(pairs)))]
    texture = "plain" if kind == "3d" else TEXTURES[int(rng.integers(len(TEXTURES)))]
    motion = MOTIONS[int(rng.integers(len(MOTIONS)))] if kind == "video" else None
    if motion == "rotating" and shape in ("circle", "ring") and texture == "plain":
        texture = "striped"  # a plain disc does not visibly rotate
    return WorldSpec(kind, shape, colour, texture, motion, seed=int(rng.integers(2**31)))


# ---------------------------------------------------------------------------------------------
# Backgrounds and caption-free texture images


def _smooth_noise(rng: np.random.Generator, h: int, w: int, exponent: float) -> np.ndarray:
    """Gaussian noise with a ``1 / f^exponent`` amplitude spectrum, normalised to [0, 1]."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    spec = rng.standard_normal((h, w // 2 + 1)) + 1j * rng.standard_normal((h, w // 2 + 1))
    field = np.fft.irfft2(spec / f**exponent, s=(h, w))
    field -= field.min()
    return field / max(float(field.max()), 1e-8)


def _gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A linear colour gradient between two random colours ``[h, w, 3]`` in [0, 1]."""
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    t = (xx * math.cos(angle) + yy * math.sin(angle)) / max(h, w)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-8)
    a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    return a * (1 - t[..., None]) + b * t[..., None]


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A muted random background ``[H, W, 3]`` uint8: gradient, coloured 1/f noise, or both."""
    if min(height, width) < 1:
        raise ValueError(f"background size must be positive, got {height}x{width}")
    choice = rng.integers(3)
    base = _gradient(rng, height, width)
    if choice > 0:
        noise = np.stack(
            [_smooth_noise(rng, height, width, rng.uniform(1.0, 2.0)) for _ in range(3)], -1
        )
        base = noise if choice == 1 else 0.6 * base + 0.4 * noise
    # Keep backgrounds lower in contrast and saturation than the objects.
    grey = base.mean(-1, keepdims=True)
    base = 0.5 * grey + 0.5 * base
    base = 0.25 + 0.5 * base
    return np.clip(base * 255.0 + 0.5, 0, 255).astype(np.uint8)


def texture_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A caption-free image ``[H, W, 3]`` uint8 with natural-image-like statistics.

    Mixes 1/f ("pink") colour noise, gradients, a dead-leaves layer (random occluding discs and
    polygons, each with its own texture), fine grain and blur, in random proportions.
    """
    if min(height, width) < 1:
        raise ValueError(f"texture size must be positive, got {height}x{width}")
    h, w = height, width
    img = 0.5 * _gradient(rng, h, w) + 0.5 * np.stack(
        [_smooth_noise(rng, h, w, rng.uniform(0.8, 2.2)) for _ in range(3)], -1
    )
    if rng.random() < 0.8:
        img = _dead_leaves(rng, img, int(rng.integers(8, 60)))
    if rng.random() < 0.5:  # fine grain / film noise
        img = img + rng.normal(0, rng.uniform(0.005, 0.05), img.shape)
    out = Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        from PIL import ImageFilter

        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    return np.asarray(out)


def _dead_leaves(rng: np.random.Generator, img: np.ndarray, count: int) -> np.ndarray:
    h, w = img.shape[:2]
    out = img.copy()
    for _ in range(count):
        r = max(2.0, min(h, w) * rng.uniform(0.03, 0.35) ** 1.5 * 1.5)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        n = int(rng.choice([0, 3, 4, 5, 6]))
        mask = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(mask)
        if n == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            a0 = rng.uniform(0, 2 * math.pi)
            pts = [
                (
                    cx + r * math.cos(a0 + 2 * math.pi * k / n),
                    cy + r * math.sin(a0 + 2 * math.pi * k / n),
                )
                for k in range(n)
            ]
            draw.polygon(pts, fill=255)
        m = np.asarray(mask, dtype=np.float64)[..., None] / 255.0
        colour = rng.uniform(0, 1, 3)
        fill = np.broadcast_to(colour, img.shape).copy()
        kind = rng.integers(4)
        if kind == 1:
            fill = fill * (0.6 + 0.4 * _smooth_noise(rng, h, w, 1.5)[..., None])
        elif kind == 2:
            fill = fill * (
                0.7 + 0.3 * _pattern("striped", rng, h, w, rng.uniform(3, 12))[..., None]
            )
        elif kind == 3:
            fill = 0.5 * fill + 0.5 * _gradient(rng, h, w)
        out = out * (1 - m) + fill * m
    return out


# ---------------------------------------------------------------------------------------------
# Shapes and textures


def _polygon(shape: str, n_star: int = 5) -> list[tuple[float, float]]:
    """Unit-size outline (radius ~1 around the origin) of a polygonal shape."""
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "hexagon":
        return [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]
    if shape == "star":
        pts = []
        for k in range(2 * n_star):
            r = 1.0 if k % 2 == 0 else 0.42
            a = -math.pi / 2 + k * math.pi / n_star
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    if shape == "cross":
        a, b = 0.3, 0.95
        return [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    if shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        x = 16 * np.sin(ts) ** 3
        y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        return [(float(a) / 17.0, float(b) / 17.0 + 0.1) for a, b in zip(x, y)]
    raise ValueError(f"{shape!r} is not a polygonal shape")


def shape_mask(
    shape: str,
    size: int,
    centre: tuple[float, float],
    radius: float,
    angle: float,
    supersample: int = 4,
) -> np.ndarray:
    """Anti-aliased coverage ``[size, size]`` in [0, 1] of a shape (pixels, radians)."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    s = supersample
    mask = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = centre[0] * s, centre[1] * s, radius * s
    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            ri = 0.55 * r
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:
        ca, sa = math.cos(angle), math.sin(angle)
        pts = [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in _polygon(shape)]
        draw.polygon(pts, fill=255)
    small = mask.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def _pattern(
    texture: str,
    rng: np.random.Generator | None,
    h: int,
    w: int,
    period: float,
    angle: float = 0.0,
    phase: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Texture pattern ``[h, w]`` in [0, 1] (1 = main colour, 0 = second colour)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    ca, sa = math.cos(angle), math.sin(angle)
    u = (xx * ca + yy * sa) / period + phase[0]
    v = (-xx * sa + yy * ca) / period + phase[1]
    if texture == "plain":
        return np.ones((h, w))
    if texture == "striped":
        return np.clip(0.5 + 2.0 * np.sin(2 * math.pi * u), 0, 1)
    if texture == "checkered":
        s = np.sin(2 * math.pi * u) * np.sin(2 * math.pi * v)
        return np.clip(0.5 + 3.0 * s, 0, 1)
    if texture == "dotted":
        du, dv = u - np.round(u), v - np.round(v)
        d = np.sqrt(du**2 + dv**2)
        return np.clip((d - 0.28) * period * 0.7 + 0.5, 0, 1)
    raise ValueError(f"texture must be one of {TEXTURES}, got {texture!r}")


def _second_colour(colour: str) -> np.ndarray:
    rgb = np.asarray(COLOURS[colour], dtype=np.float64)
    return np.full(3, 150.0) if colour == "black" else rgb * 0.3


@dataclass(frozen=True)
class _Layout:
    cx: float
    cy: float
    radius: float
    angle: float
    period: float
    tex_angle: float


def _layout(spec: WorldSpec, size: int) -> _Layout:
    rng = np.random.default_rng(spec.seed)
    radius = size * rng.uniform(0.2, 0.32)
    margin = radius * 1.05
    cx, cy = rng.uniform(margin, size - margin, 2) if size > 2 * margin else (size / 2, size / 2)
    return _Layout(
        float(cx),
        float(cy),
        float(radius),
        float(rng.uniform(0, 2 * math.pi)),
        float(size * rng.uniform(0.05, 0.09)),
        float(rng.uniform(0, math.pi)),
    )


def _draw(spec: WorldSpec, bg: np.ndarray, lay: _Layout) -> np.ndarray:
    size = bg.shape[0]
    mask = shape_mask(spec.shape, size, (lay.cx, lay.cy), lay.radius, lay.angle)
    # Texture coordinates move with the object (rotation included).
    pat = _pattern(
        spec.texture,
        None,
        size,
        size,
        lay.period,
        lay.tex_angle + lay.angle,
        phase=(-lay.cx / lay.period, -lay.cy / lay.period),
    )
    main = np.asarray(COLOURS[spec.colour], dtype=np.float64)
    fill = pat[..., None] * main + (1 - pat[..., None]) * _second_colour(spec.colour)
    out = bg.astype(np.float64) * (1 - mask[..., None]) + fill * mask[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def render_image(spec: WorldSpec, size: int = 128) -> np.ndarray:
    """Draw an image spec -> ``[size, size, 3]`` uint8."""
    if spec.kind != "image":
        raise ValueError(f"render_image needs an image spec, got kind {spec.kind!r}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    bg = background(np.random.default_rng(spec.seed + 1), size, size)
    return _draw(spec, bg, _layout(spec, size))


def render_video(spec: WorldSpec, size: int = 64, frames: int = 16) -> np.ndarray:
    """Draw a video spec -> ``[frames, size, size, 3]`` uint8; the object follows its motion."""
    if spec.kind != "video":
        raise ValueError(f"render_video needs a video spec, got kind {spec.kind!r}")
    if size < 16 or frames < 2:
        raise ValueError(f"need size >= 16 and frames >= 2, got {size} and {frames}")
    bg = background(np.random.default_rng(spec.seed + 1), size, size)
    base = _layout(replace(spec, kind="image", motion=None), size)
    r = base.radius * 0.8
    out = []
    for i in range(frames):
        s = i / (frames - 1)  # 0 -> 1 over the clip
        lay = replace(base, radius=r)
        travel = size - 2.2 * r
        if spec.motion == "moving left":
            lay = replace(lay, cx=size - 1.1 * r - s * travel)
        elif spec.motion == "moving right":
            lay = replace(lay, cx=1.1 * r + s * travel)
        elif spec.motion == "moving up":
            lay = replace(lay, cy=size - 1.1 * r - s * travel)
        elif spec.motion == "moving down":
            lay = replace(lay, cy=1.1 * r + s * travel)
        elif spec.motion == "rotating":
            lay = replace(lay, cx=size / 2, cy=size / 2, angle=base.angle + s * math.pi)
        elif spec.motion == "growing":
            lay = replace(lay, cx=size / 2, cy=size / 2, radius=r * (0.45 + 0.75 * s))
        elif spec.motion == "shrinking":
            lay = replace(lay, cx=size / 2, cy=size / 2, radius=r * (1.2 - 0.75 * s))
        out.append(_draw(spec, bg, lay))
    return np.stack(out)


# ---------------------------------------------------------------------------------------------
# 3D primitives


def primitive_mesh(spec: WorldSpec):
    """A coloured trimesh of a 3D spec, randomly oriented by its seed."""
    import trimesh

    if spec.kind != "3d":
        raise ValueError(f"primitive_mesh needs a 3d spec, got kind {spec.kind!r}")
    creation = trimesh.creation
    if spec.shape == "sphere":
        mesh = creation.icosphere(subdivisions=3, radius=0.5)
    elif spec.shape == "cube":
        mesh = creation.box(extents=(0.8, 0.8, 0.8))
    elif spec.shape == "cylinder":
        mesh = creation.cylinder(radius=0.35, height=0.9, sections=48)
    elif spec.shape == "cone":
        mesh = creation.cone(radius=0.45, height=0.9, sections=48)
    else:
        mesh = creation.torus(
            major_radius=0.35, minor_radius=0.13, major_sections=48, minor_sections=24
        )
    mesh.apply_translation(-mesh.bounds.mean(0))  # trimesh's cone stands on z = 0
    rng = np.random.default_rng(spec.seed)
    q = rng.standard_normal(4)
    rot = trimesh.transformations.quaternion_matrix(q / np.linalg.norm(q))
    mesh.apply_transform(rot)
    rgb = np.asarray(COLOURS[spec.colour])
    mesh.visual.face_colors = np.concatenate([rgb, [255]]).astype(np.uint8)
    return mesh


def render_voxels(spec: WorldSpec, *, num_views: int = 12, resolution: int = 256):
    """Render and pack a 3D spec -> ``(feats [M, 768] in [0, 1], coords [M, 3])``.

    Goes through `atoken.threed.mesh_render.mesh_to_voxels` (the same pipeline users' meshes take),
    with fewer, smaller views than its defaults: primitives have no concavities to miss.
    """
    from atoken.threed.mesh_render import mesh_to_voxels

    return mesh_to_voxels(
        primitive_mesh(spec), num_views=num_views, resolution=resolution, seed=spec.seed
    )


def render(spec: WorldSpec, *, size: int = 128, frames: int = 16):
    """Render any spec: image/video uint8 arrays, 3D ``(feats, coords)``."""
    if spec.kind == "image":
        return render_image(spec, size)
    if spec.kind == "video":
        return render_video(spec, size, frames)
    return render_voxels(spec)


def label_set(kind: str, *, with_texture: bool = False, with_motion: bool = False) -> list[str]:
    """All labels of a modality for zero-shot scoring (colour + shape, optional attributes)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    textures = TEXTURES if with_texture and kind != "3d" else ("plain",)
    motions = MOTIONS if with_motion and kind == "video" else (None,)
    out = []
    for shape, colour in combinations(kind, "all"):
        for t in textures:
            for m in motions:
                words = [colour, _TEXTURE_WORDS[t], shape, m or ""]
                out.append(" ".join(w for w in words if w))
    return out
