"""atoken.pipelines.flow: the flow-matching objective and sampler on toy data, the network, the bundle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from atoken.pipelines.flow import (
    FlowConfig,
    FlowTransformer,
    coarse_voxels,
    flow_matching_loss,
    flow_path,
    guided_velocity,
    layout,
    load_generator,
    sample_flow,
    sample_timesteps,
    save_generator,
    time_grid,
)


class ToyVelocity(nn.Module):
    """MLP velocity for 2-D points, optionally conditioned on a class (index 2 = null)."""

    def __init__(self, classes: int = 0):
        super().__init__()
        self.embed = nn.Embedding(classes + 1, 32) if classes else None
        self.net = nn.Sequential(
            nn.Linear(2 + 16 + (32 if classes else 0), 128),
            nn.SiLU(),
            nn.Linear(128, 128),
            nn.SiLU(),
            nn.Linear(128, 2),
        )

    def forward(self, x, t, c=None):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1).expand(x.shape[0], 1)
        freqs = torch.arange(1, 9, dtype=torch.float32)[None]
        parts = [x, torch.sin(math.pi * t * freqs), torch.cos(math.pi * t * freqs)]
        if self.embed is not None:
            parts.append(self.embed(c))
        return self.net(torch.cat(parts, -1))


def two_gaussians(n: int, g: torch.Generator, labels: torch.Tensor | None = None):
    """Points around (-2, 0) and (2, 0), std 0.3; the label picks the side."""
    side = torch.randint(0, 2, (n,), generator=g) if labels is None else labels
    centre = torch.stack([side.float() * 4 - 2, torch.zeros(n)], -1)
    return centre + 0.3 * torch.randn(n, 2, generator=g), side


def train_toy(model, steps: int, *, conditional: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x1, side = two_gaussians(256, g)
        x0 = torch.randn(x1.shape, generator=g)
        t = sample_timesteps(256, g, "uniform")[:, None]
        c = None
        if conditional:
            drop = torch.rand(256, generator=g) < 0.2
            c = torch.where(drop, torch.full_like(side, 2), side)
        loss = flow_matching_loss(lambda xt, tt, c=c: model(xt, tt, c), x1, x0, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_flow_path_endpoints_and_velocity():
    x1, x0 = torch.randn(5, 3), torch.randn(5, 3)
    a, v = flow_path(x1, x0, torch.zeros(5, 1))
    b, _ = flow_path(x1, x0, torch.ones(5, 1))
    assert torch.equal(a, x0) and torch.equal(b, x1)
    assert torch.allclose(v, x1 - x0)
    mid, _ = flow_path(x1, x0, torch.full((5, 1), 0.25))
    assert torch.allclose(mid, 0.75 * x0 + 0.25 * x1)


def test_time_grid_and_shift():
    assert time_grid(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    shifted = time_grid(4, shift=3.0)
    assert shifted[0] == 0.0 and shifted[-1] == 1.0
    assert all(a < b for a, b in zip(shifted, shifted[1:]))
    assert shifted[2] < 0.5  # more of the steps near the noise end
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)


def test_heun_beats_euler_on_a_known_ode():
    # dx/dt = x from x(0) = 1: x(1) = e
    x0 = torch.ones(1, 1)
    e = math.e
    euler = float(sample_flow(lambda x, t: x, x0, 8, method="euler"))
    heun = float(sample_flow(lambda x, t: x, x0, 8, method="heun"))
    assert abs(heun - e) < abs(euler - e) / 3
    calls = []
    sample_flow(lambda x, t: x, x0, 5, progress=lambda i, n, m: calls.append((i, n)))
    assert calls == [(i, 5) for i in range(1, 6)]


def test_flow_learns_two_gaussians():
    model = train_toy(ToyVelocity(), 800)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2000, 2, generator=g)
    with torch.no_grad():
        x = sample_flow(lambda x, t: model(x, t), noise, 40, method="heun")
    right = x[:, 0] > 0
    assert 0.4 < float(right.float().mean()) < 0.6  # both modes, evenly
    for side, centre in ((right, 2.0), (~right, -2.0)):
        pts = x[side]
        assert abs(float(pts[:, 0].mean()) - centre) < 0.2
        assert abs(float(pts[:, 1].mean())) < 0.15
        assert 0.15 < float(pts.std(0).mean()) < 0.5  # target std 0.3
    # an untrained network is far from it
    with torch.no_grad():
        raw = sample_flow(lambda x, t: ToyVelocity()(x, t), noise, 40)
    assert abs(float(raw[:, 0].abs().mean()) - 2.0) > 0.5


def test_guidance_pushes_towards_the_condition():
    model = train_toy(ToyVelocity(classes=2), 800, conditional=True, seed=3)
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(1000, 2, generator=g)
    means = {}
    for w in (0.0, 1.0, 3.0):
        for label in (0, 1):
            c = torch.full((1000,), label)
            null = torch.full((1000,), 2)

            def v(x, t, c=c, null=null, w=w):
                return guided_velocity(model(x, t, c), model(x, t, null), w)

            with torch.no_grad():
                means[w, label] = float(sample_flow(v, noise, 30)[:, 0].mean())
    # guidance 0 is the unconditional model: both modes, mean near 0
    assert abs(means[0.0, 1]) < 0.6 and abs(means[0.0, 0]) < 0.6
    # conditional sampling lands on the asked side, and stronger guidance pushes further out
    assert means[1.0, 1] > 1.5 and means[1.0, 0] < -1.5
    assert means[3.0, 1] > means[1.0, 1] + 0.1
    assert means[3.0, 0] < means[1.0, 0] - 0.1


def small_generator(**kw) -> FlowTransformer:
    torch.manual_seed(0)
    cfg = FlowConfig(latent_channels=8, text_dim=12, width=32, depth=2, heads=2, **kw)
    model = FlowTransformer(cfg)
    with torch.no_grad():  # non-zero output layers, so the outputs depend on the inputs
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_items_in_a_batch_do_not_interact():
    model = small_generator()
    coords = layout(model, "video", 3)
    x = torch.randn(len(coords), 8)
    t = torch.tensor([0.1, 0.5, 0.9])
    text = torch.randn(3, 12)
    out = model(x, coords, t, text)
    assert out.shape == x.shape
    rows = coords[:, 0] == 1
    alone = coords[rows].clone()
    alone[:, 0] = 0
    single = model(x[rows], alone, t[1:2], text[1:2])
    assert torch.allclose(out[rows], single, atol=1e-5)
    # the text and the time both matter
    assert not torch.allclose(model(x, coords, t, text.flip(0)), out)
    assert not torch.allclose(model(x, coords, t.flip(0), text), out)
    # dropping the caption uses the null embedding
    drop = torch.tensor([True, False, False])
    dropped = model(x, coords, t, text, drop)
    assert torch.allclose(dropped[~(coords[:, 0] == 0)], out[~(coords[:, 0] == 0)], atol=1e-6)
    assert not torch.allclose(dropped[coords[:, 0] == 0], out[coords[:, 0] == 0])


def test_layouts():
    model = small_generator(image_grid=(3, 5), video_grid=(2, 2, 2))
    img = layout(model, "image", 2)
    assert img.shape == (30, 5) and int(img[:, 1].max()) == 0
    assert int(img[:, 2].max()) == 2 and int(img[:, 3].max()) == 4
    vid = layout(model, "video", 1)
    assert vid.shape == (8, 5) and int(vid[:, 1].max()) == 1
    with pytest.raises(ValueError, match="template"):
        layout(model, "3d", 1)


def test_coarse_voxels_owner_lies_in_the_same_cell():
    g = torch.Generator().manual_seed(0)
    xyz = torch.unique(torch.randint(0, 20, (500, 3), generator=g), dim=0)
    keep, owner = coarse_voxels(xyz, 4)
    cells = xyz // 4
    assert torch.equal(cells[keep[owner]], cells)
    assert len(keep) == len(torch.unique(cells, dim=0))
    assert torch.equal(keep[owner][keep], keep)  # representatives own themselves


def test_save_load_round_trip(tmp_path):
    model = small_generator(templates=["a", "b"])
    model.latent_mean.fill_(0.5)
    model.latent_std.fill_(2.0)
    model.template_coords = torch.tensor(
        [[0, 1, 2, 3], [1, 4, 5, 6], [1, 4, 5, 7]], dtype=torch.int16
    )
    path = save_generator(model, tmp_path / "g.safetensors", "float32")
    back = load_generator(path)
    assert back.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    assert back.template(1).tolist() == [[4, 5, 6], [4, 5, 7]]
    assert torch.allclose(back.denormalize(torch.zeros(1, 8)), torch.full((1, 8), 0.5))
    with pytest.raises(ValueError, match="width"):
        FlowConfig(width=30, heads=2)


def test_bundled_generator_makes_an_image():
    from atoken.pipelines.flow import GENERATORS, generate, generator_path
    from atoken.pretrained.hub import load_pretrained

    assert "atoken-tiny-gen" in GENERATORS
    assert generator_path("atoken-tiny-gen").stat().st_size < 40e6
    gen = load_generator("atoken-tiny-gen")
    tok = load_pretrained("atoken-tiny")
    assert gen.config.latent_channels == tok.config.latent_channels
    seen = []
    out = generate(
        tok,
        gen,
        "a photo of a red circle.",
        steps=6,
        seed=3,
        progress=lambda i, n, m: seen.append(i),
    )
    h, w = gen.config.image_grid
    assert out.image.shape == (16 * h, 16 * w, 3) and out.image.dtype == np.uint8
    assert out.latent.feats.shape == (h * w, tok.config.latent_channels)
    assert seen == list(range(1, 7))
    again = generate(tok, gen, "a photo of a red circle.", steps=6, seed=3)
    assert np.array_equal(out.image, again.image)  # seeded
    other = generate(tok, gen, "a photo of a red circle.", steps=6, seed=4)
    assert not np.array_equal(out.image, other.image)


def test_eval_prompts_are_the_held_out_pairs():
    from atoken.training import world
    from atoken.training.flow_eval import prompt_specs

    specs = prompt_specs("image", "held_out", 3, seed=0)
    assert len(specs) == 3 * len(world.combinations("image", "held_out"))
    assert all(world.is_held_out("image", s.shape, s.colour) for s in specs)
    vids = prompt_specs("video", "held_out", 1, seed=0)
    assert all(s.motion in world.MOTIONS for s in vids)


def test_judge_scores_vote_over_frames():
    from atoken.training import world
    from atoken.training.flow_eval import Judge, judge_scores

    class Fixed(Judge):
        """Colour from the red channel of pixel (0, 0), shape from its green channel."""

        def forward(self, images_u8):
            px = images_u8[:, 0, 0].long()
            c = torch.nn.functional.one_hot(px[:, 0] % 8, 8).float()
            s = torch.nn.functional.one_hot(px[:, 1] % 8, 8).float()
            return c, s, torch.zeros(len(px), 64)

    def frames(colour: int, shapes: list[int]):
        out = np.zeros((len(shapes), 4, 4, 3), np.uint8)
        out[:, 0, 0, 0] = colour
        out[:, 0, 0, 1] = shapes
        return out

    specs = [world.WorldSpec("image", "circle", "red"), world.WorldSpec("image", "star", "blue")]
    star = world.SHAPES.index("star")
    items = [frames(0, [0]), frames(2, [star, star, 0])]  # colour 0 = red, 2 = blue
    scores = judge_scores(Fixed(8, 8), items, specs, world.SHAPES)
    assert scores["colour"] == 1.0  # red is colour 0, blue colour 2
    assert scores["shape"] == 1.0 and scores["both"] == 1.0  # 2 of 3 frames say star
    wrong = judge_scores(
        Fixed(8, 8), [frames(1, [0]), frames(2, [0, 0, star])], specs, world.SHAPES
    )
    assert wrong["colour"] == 0.5 and wrong["shape"] == 0.5 and wrong["both"] == 0.0
