"""The generated world: specs, captions, held-out pairs, rendering."""

from __future__ import annotations

import numpy as np
import pytest

from atoken.text.zeroshot import TEMPLATES
from atoken.training import world


def test_captions_use_the_zero_shot_templates():
    for kind in world.KINDS:
        assert world.prompt_templates(kind) == TEMPLATES[kind]
    spec = world.WorldSpec("image", "star", "red", "striped", seed=3)
    assert spec.label == "red striped star"
    assert spec.caption(0) == "a photo of a red striped star."
    assert world.WorldSpec("image", "star", "red").label == "red star"  # plain: no texture word
    video = world.WorldSpec("video", "square", "blue", motion="moving left")
    assert video.caption(1) == "a video of a blue square moving left."
    assert world.WorldSpec("3d", "torus", "green").caption(2) == "a 3D render of a green torus."


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "audio", "shape": "star", "colour": "red"}, "kind"),
        ({"kind": "image", "shape": "cube", "colour": "red"}, "shape"),
        ({"kind": "image", "shape": "star", "colour": "teal"}, "colour"),
        ({"kind": "image", "shape": "star", "colour": "red", "texture": "wavy"}, "texture"),
        ({"kind": "video", "shape": "star", "colour": "red"}, "motion"),
        ({"kind": "image", "shape": "star", "colour": "red", "motion": "rotating"}, "motion"),
        ({"kind": "3d", "shape": "cube", "colour": "red", "texture": "dotted"}, "plain"),
    ],
)
def test_bad_specs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        world.WorldSpec(**kwargs)


def test_held_out_pairs_are_a_transversal_and_never_sampled_for_training():
    for kind, shapes in (("image", world.SHAPES), ("3d", world.PRIMITIVES)):
        held = world.combinations(kind, "held_out")
        assert len(held) == len(shapes)  # one colour per shape
        assert len({c for _, c in held}) == len(held)  # and each colour at most once
        train = world.combinations(kind, "train")
        assert set(held).isdisjoint(train)
        assert len(held) + len(train) == len(shapes) * len(world.COLOURS)
        # every shape and every colour still has training partners
        assert {s for s, _ in train} == set(shapes)
        assert {c for _, c in train} == set(world.COLOURS)
    rng = np.random.default_rng(0)
    for kind in world.KINDS:
        for _ in range(200):
            s = world.sample_spec(rng, kind, "train")
            assert not world.is_held_out(kind, s.shape, s.colour)
        s = world.sample_spec(rng, kind, "held_out")
        assert world.is_held_out(kind, s.shape, s.colour)
    assert len(world.label_set("image")) == 64
    assert len(world.label_set("video", with_motion=True)) == 64 * len(world.MOTIONS)


def test_render_image_is_deterministic_and_shows_the_colour():
    spec = world.WorldSpec("image", "square", "red", "plain", seed=11)
    a, b = world.render_image(spec, 64), world.render_image(spec, 64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    red = (a[..., 0] > 180) & (a[..., 1] < 80) & (a[..., 2] < 80)
    assert 0.05 < red.mean() < 0.6  # the object covers a part of the image
    assert not np.array_equal(
        a, world.render_image(world.WorldSpec("image", "square", "red", seed=12), 64)
    )


def test_textures_differ_from_plain():
    plain = world.render_image(world.WorldSpec("image", "circle", "blue", "plain", seed=5), 96)
    for tex in ("striped", "dotted", "checkered"):
        img = world.render_image(world.WorldSpec("image", "circle", "blue", tex, seed=5), 96)
        changed = np.abs(img.astype(int) - plain).sum(-1) > 60
        assert changed.mean() > 0.02, tex


def _centroid(frame: np.ndarray) -> tuple[float, float, int]:
    mask = (frame[..., 2] > 180) & (frame[..., 0] < 90)
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean()), int(mask.sum())


@pytest.mark.parametrize(
    "motion, check",
    [
        ("moving right", lambda a, b: b[0] - a[0] > 10),
        ("moving left", lambda a, b: a[0] - b[0] > 10),
        ("moving down", lambda a, b: b[1] - a[1] > 10),
        ("moving up", lambda a, b: a[1] - b[1] > 10),
        ("growing", lambda a, b: b[2] > 1.5 * a[2]),
        ("shrinking", lambda a, b: a[2] > 1.5 * b[2]),
    ],
)
def test_video_motion(motion, check):
    v = world.render_video(
        world.WorldSpec("video", "hexagon", "blue", "plain", motion, seed=2), 64, 8
    )
    assert v.shape == (8, 64, 64, 3)
    assert check(_centroid(v[0]), _centroid(v[-1]))


def test_texture_image_statistics():
    rng = np.random.default_rng(0)
    img = world.texture_image(rng, 80, 112)
    assert img.shape == (80, 112, 3) and img.dtype == np.uint8
    assert img.std() > 15  # rich content, not a flat colour
    dx = np.abs(np.diff(img.astype(float), axis=1)).mean()
    assert 1.0 < dx < 60.0  # has edges but is not white noise
    with pytest.raises(ValueError, match="positive"):
        world.texture_image(rng, 0, 10)


def test_primitive_meshes():
    for shape in world.PRIMITIVES:
        mesh = world.primitive_mesh(world.WorldSpec("3d", shape, "yellow", seed=1))
        assert len(mesh.faces) > 10
        assert np.linalg.norm(mesh.vertices, axis=1).max() < 0.7  # inside the unit box
        assert tuple(mesh.visual.face_colors[0, :3]) == world.COLOURS["yellow"]


def test_render_voxels_small():
    feats, coords = world.render_voxels(
        world.WorldSpec("3d", "cube", "red", seed=0), num_views=4, resolution=64
    )
    assert feats.shape[1] == 768 and coords.shape == (feats.shape[0], 3)
    assert feats.shape[0] > 100
    rgb = np.asarray(feats).reshape(-1, 256, 3).mean(1)
    lit = rgb[rgb.sum(1) > 0.3]  # voxels seen by a camera
    assert (lit[:, 0] > lit[:, 1] + 0.2).mean() > 0.8  # red dominates
