"""Does the generator follow prompts it was never trained on? Held-out combinations, judged.

The generated world holds out some (shape, colour) pairs from every training set
(`atoken.training.world.is_held_out`). `evaluate_generator` prompts the generator with captions of those
pairs and asks a *judge*, a small CNN with a colour head and a shape head, whether the result
shows the right colour and shape. The judge is trained here on the world's real renders (every
pair, including the held-out ones: it must know what a correct answer looks like), seeded and
cached, and never sees the generator or its training latents. Images and video frames share one
2-D judge; 3D has its own (colour + primitive) trained on mesh renders from orbit cameras, and
judges renders of the generated Gaussians.

Besides accuracy, a Frechet distance between the judge's features of generated and real samples
of the same prompts (and, as a floor, between two independent real sets) measures how close the
samples' distribution is. Every figure comes with the judge's own accuracy on fresh real
renders and on the tokenizer's reconstructions of them (what a perfect generator could reach
through this decoder).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atoken.core.sparse import SparseTensor
from atoken.pipelines.flow import (
    FlowTransformer,
    _decoder_input,
    coarse_voxels,
    gs_decoder_device,
    layout,
    load_generator,
    sample_latents,
)
from atoken.pipelines.metrics import frechet_distance_from_features
from atoken.training import world

JUDGE_SIZE = 64
JUDGE_VERSION = 2


class Judge(nn.Module):
    """A small CNN on 64 px images: features ``[B, 64]`` and colour / shape logits."""

    def __init__(self, colours: int, shapes: int):
        super().__init__()
        chans = [3, 32, 48, 64, 96, 128]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
            stride = 1 if i == 0 else 2  # 64 px -> 4 px, full resolution first for thin shapes
            layers += [nn.Conv2d(a, b, 3, stride=stride, padding=1), nn.GroupNorm(8, b), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.feat = nn.Linear(chans[-1], 64)
        self.colour = nn.Linear(64, colours)
        self.shape = nn.Linear(64, shapes)

    def features(self, images_u8: Tensor) -> Tensor:
        """``[B, H, W, 3]`` uint8 (resized to 64 px) -> features ``[B, 64]``."""
        x = images_u8.float().permute(0, 3, 1, 2) / 127.5 - 1.0
        if x.shape[-1] != JUDGE_SIZE or x.shape[-2] != JUDGE_SIZE:
            x = F.interpolate(x, size=(JUDGE_SIZE, JUDGE_SIZE), mode="bilinear", antialias=True)
        h = self.body(x).amax((2, 3))
        return F.silu(self.feat(h))

    def forward(self, images_u8: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(colour logits, shape logits, features)."""
        f = self.features(images_u8)
        return self.colour(f), self.shape(f), f


# ---------------------------------------------------------------------------------------------
# Real data for the judges


def real_2d(rng: np.random.Generator, n: int, split: str = "all") -> tuple[np.ndarray, list]:
    """``n`` real 64 px renders (half images, half single frames of videos) and their specs."""
    imgs, specs = [], []
    for i in range(n):
        if i % 2 == 0:
            s = world.sample_spec(rng, "image", split)
            imgs.append(world.render_image(s, JUDGE_SIZE))
        else:
            s = world.sample_spec(rng, "video", split)
            frames = world.render_video(s, JUDGE_SIZE, 8)
            imgs.append(frames[int(rng.integers(len(frames)))])
        specs.append(s)
    return np.stack(imgs), specs


def _orbit(rng: np.random.Generator, views: int):
    from atoken.core.cameras import orbit_cameras

    return orbit_cameras(
        views,
        radius=2.0,
        fov=np.radians(40.0),
        resolution=JUDGE_SIZE,
        offset=(float(rng.uniform(0, 1)), float(rng.uniform(0.1, 0.5))),
    )


def real_3d(rng: np.random.Generator, n: int, split: str = "all", views: int = 4):
    """``n * views`` mesh renders (on black) of random primitives and their specs per view."""
    from atoken.pipelines.reconstruct3d import render_mesh_views

    imgs, specs = [], []
    for _ in range(n):
        s = world.sample_spec(rng, "3d", split)
        imgs.append(render_mesh_views(world.primitive_mesh(s), _orbit(rng, views)))
        specs += [s] * views
    return np.concatenate(imgs), specs


def _labels(specs, shapes) -> tuple[Tensor, Tensor]:
    colours = list(world.COLOURS)
    c = torch.tensor([colours.index(s.colour) for s in specs])
    s = torch.tensor([list(shapes).index(sp.shape) for sp in specs])
    return c, s


def train_judge(kind: str, *, seed: int = 0, n: int = 8000, epochs: int = 8, log=print) -> Judge:
    """Train a judge on real renders: ``"2d"`` (images + video frames) or ``"3d"`` (meshes)."""
    shapes = world.PRIMITIVES if kind == "3d" else world.SHAPES
    rng = np.random.default_rng(seed)
    t0 = time.time()
    if kind == "3d":
        imgs, specs = real_3d(rng, n // 4)
    else:
        imgs, specs = real_2d(rng, n)
    yc, ys = _labels(specs, shapes)
    x = torch.from_numpy(imgs)
    torch.manual_seed(seed)
    judge = Judge(len(world.COLOURS), len(shapes))
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * (len(x) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - 63, 64):
            idx = order[i : i + 64]
            batch = x[idx]
            if torch.rand(1, generator=g) < 0.5:  # flips keep colour and shape class
                batch = batch.flip(2)
            lc, ls, _ = judge(batch)
            loss = F.cross_entropy(lc, yc[idx]) + F.cross_entropy(ls, ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    log(f"trained the {kind} judge on {len(x)} real renders in {time.time() - t0:.0f} s")
    return judge.eval()


def load_judge(kind: str, *, seed: int = 0, cache: str | Path | None = None, log=print) -> Judge:
    """A trained judge from the cache (``$ATOKEN_HOME/flow-eval``), training it once if absent."""
    from safetensors.torch import load_file, save_file

    from atoken.pretrained.download import cache_dir

    folder = Path(cache) if cache is not None else cache_dir() / "flow-eval"
    tag = hashlib.sha1(f"{kind}-{seed}-{JUDGE_VERSION}".encode()).hexdigest()[:12]
    path = folder / f"judge-{kind}-{tag}.safetensors"
    shapes = world.PRIMITIVES if kind == "3d" else world.SHAPES
    if path.is_file():
        judge = Judge(len(world.COLOURS), len(shapes))
        judge.load_state_dict(load_file(str(path)))
        return judge.eval()
    with torch.enable_grad():  # callers may run under no_grad (evaluate_generator does)
        judge = train_judge(kind, seed=seed, log=log)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(path))
    return judge


@torch.no_grad()
def judge_scores(judge: Judge, frames: list[np.ndarray], specs, shapes) -> dict[str, Any]:
    """Colour / shape / both accuracy; each item's frames (views) vote by mean logits."""
    lc, ls, feats = [], [], []
    for f in frames:
        c, s, h = judge(torch.from_numpy(np.ascontiguousarray(f)))
        lc.append(c.mean(0))
        ls.append(s.mean(0))
        feats.append(h.mean(0))
    yc, ys = _labels(specs, shapes)
    pc, ps = torch.stack(lc).argmax(-1), torch.stack(ls).argmax(-1)
    ok_c, ok_s = pc == yc, ps == ys
    return {
        "colour": float(ok_c.float().mean()),
        "shape": float(ok_s.float().mean()),
        "both": float((ok_c & ok_s).float().mean()),
        "n": len(specs),
        "_features": torch.stack(feats).numpy(),
    }


# ---------------------------------------------------------------------------------------------
# Generation for the evaluation


def prompt_specs(kind: str, split: str, samples: int, seed: int) -> list[world.WorldSpec]:
    """``samples`` specs per (shape, colour) pair of a split, with random texture / motion."""
    rng = np.random.default_rng(seed)
    out = []
    for shape, colour in world.combinations(kind, split):
        for _ in range(samples):
            s = world.sample_spec(rng, kind, "all")
            out.append(
                world.WorldSpec(
                    kind,
                    shape,
                    colour,
                    s.texture,
                    s.motion,
                    seed=s.seed,
                )
            )
    return out


@torch.no_grad()
def generate_batch(
    tokenizer,
    generator: FlowTransformer,
    tower,
    specs: list[world.WorldSpec],
    *,
    steps: int,
    guidance: float,
    seed: int,
    chunk: int = 64,
) -> list[np.ndarray]:
    """Generate one image / video per spec's caption -> uint8 ``[T, H, W, 3]`` each."""
    from atoken.core.patchify import detokenize, to_uint8

    out = []
    for i in range(0, len(specs), chunk):
        part = specs[i : i + chunk]
        kind = part[0].kind
        text = tower.encode([s.caption() for s in part])
        coords = layout(generator, kind, len(part))
        lat = sample_latents(generator, text, coords, steps=steps, guidance=guidance, seed=seed + i)
        rec = tokenizer.decode(_decoder_input(tokenizer, SparseTensor(lat, coords)))
        for fr in detokenize(rec, kind):
            out.append(to_uint8(fr.permute(0, 2, 3, 1)))
    return out


@torch.no_grad()
def generate_3d_views(
    tokenizer, generator, gs_decoder, tower, spec, *, steps, guidance, seed, views: int = 4
) -> tuple[np.ndarray, str]:
    """One 3D sample for a spec's caption -> Gaussian renders ``[V, 64, 64, 3]`` and template."""
    from atoken.core.patchify import gs_input
    from atoken.pipelines.flow import choose_template
    from atoken.pipelines.reconstruct3d import render_gaussian_views

    text = tower.encode([spec.caption()])
    tpl = choose_template(generator, text)
    coords = layout(generator, "3d", 1, template=tpl)
    lat = sample_latents(generator, text, coords, steps=steps, guidance=guidance, seed=seed)
    full = generator.template(tpl)
    _, owner = coarse_voxels(full)
    fc = torch.zeros(len(full), 5, dtype=torch.int32)
    fc[:, 1] = 1
    fc[:, 2:] = full
    rec = tokenizer.decode(_decoder_input(tokenizer, SparseTensor(lat[owner], fc)))
    (gauss,) = gs_decoder(gs_input(rec).to(gs_decoder_device(gs_decoder)))
    rng = np.random.default_rng(seed)
    return render_gaussian_views(gauss.to("cpu"), _orbit(rng, views)), generator.config.templates[
        tpl
    ]


def _fd(a: np.ndarray, b: np.ndarray) -> float:
    return float(frechet_distance_from_features(a, b))


def _public(scores: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in scores.items() if not k.startswith("_")}


@torch.no_grad()
def evaluate_generator(
    generator: str | FlowTransformer = "atoken-tiny-gen",
    tokenizer=None,
    *,
    kinds: tuple[str, ...] = ("image",),
    samples: int = 16,
    steps: int = 25,
    guidance: float = 4.0,
    seed: int = 0,
    samples_3d: int = 2,
    judge_cache: str | Path | None = None,
    log=print,
) -> dict[str, Any]:
    """Prompt-following on held-out pairs (and seen pairs) per kind, as one JSON-able dict."""
    from atoken.pretrained.hub import load_pretrained
    from atoken.text.towers import load_text_tower

    t_start = time.time()
    gen = load_generator(generator) if not isinstance(generator, FlowTransformer) else generator
    tok = tokenizer if tokenizer is not None else load_pretrained(gen.config.tokenizer).eval()
    tower = load_text_tower(gen.config.text_tower)
    report: dict[str, Any] = {
        "generator": str(generator) if not isinstance(generator, FlowTransformer) else "<module>",
        "tokenizer": gen.config.tokenizer,
        "text_tower": gen.config.text_tower,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "samples_per_pair": samples,
    }
    judge2d = None
    for kind in kinds:
        t0 = time.time()
        if kind in ("image", "video"):
            judge2d = judge2d or load_judge("2d", cache=judge_cache, log=log)
            report[kind] = _eval_2d(kind, tok, gen, tower, judge2d, samples, steps, guidance, seed)
        elif kind == "3d":
            judge3d = load_judge("3d", cache=judge_cache, log=log)
            gs = load_pretrained_gs_for(gen.config.tokenizer)
            report["3d"] = _eval_3d(tok, gen, gs, tower, judge3d, samples_3d, steps, guidance, seed)
        else:
            raise ValueError(f"kind must be image, video or 3d, got {kind!r}")
        report[kind]["seconds"] = round(time.time() - t0, 1)
        log(f"{kind}: {json.dumps(report[kind].get('held_out'))}")
    report["seconds"] = round(time.time() - t_start, 1)
    return report


def load_pretrained_gs_for(tokenizer: str):
    """The Gaussian decoder paired with a tokenizer name (bundled tiny: ``atoken-tiny-gs``)."""
    from atoken.pretrained import hub

    if hasattr(hub, "load_pretrained_gs"):
        return hub.load_pretrained_gs(tokenizer if tokenizer != "atoken-tiny" else "atoken-tiny-gs")
    return hub.load_pretrained("atoken-tiny-gs" if tokenizer == "atoken-tiny" else "gs")


def _eval_2d(kind, tok, gen, tower, judge, samples, steps, guidance, seed) -> dict[str, Any]:
    shapes = world.SHAPES
    n_per = samples if kind == "image" else max(1, samples // 2)
    held = prompt_specs(kind, "held_out", n_per, seed + 1)
    seen = prompt_specs(kind, "train", max(1, n_per // 4), seed + 2)
    gen_held = generate_batch(tok, gen, tower, held, steps=steps, guidance=guidance, seed=seed)
    gen_seen = generate_batch(tok, gen, tower, seen, steps=steps, guidance=guidance, seed=seed + 7)
    real = [_render(s) for s in held]
    real2 = [_render(s) for s in prompt_specs(kind, "held_out", n_per, seed + 3)]
    recon = _reconstruct(tok, real, kind)
    s_held = judge_scores(judge, gen_held, held, shapes)
    s_seen = judge_scores(judge, gen_seen, seen, shapes)
    s_real = judge_scores(judge, real, held, shapes)
    s_real2 = judge_scores(judge, real2, held, shapes)
    s_recon = judge_scores(judge, recon, held, shapes)
    return {
        "held_out": _public(s_held),
        "seen_pairs": _public(s_seen),
        "judge_on_real_held_out": _public(s_real),
        "judge_on_tokenizer_reconstructions": _public(s_recon),
        "frechet_generated_vs_real": _fd(s_held["_features"], s_real["_features"]),
        "frechet_real_vs_real": _fd(s_real2["_features"], s_real["_features"]),
        "frechet_reconstructed_vs_real": _fd(s_recon["_features"], s_real["_features"]),
        "size": list(gen_held[0].shape),
    }


def _render(spec: world.WorldSpec) -> np.ndarray:
    if spec.kind == "image":
        return world.render_image(spec, JUDGE_SIZE)[None]
    return world.render_video(spec, JUDGE_SIZE, 8)


@torch.no_grad()
def _reconstruct(tok, items: list[np.ndarray], kind: str) -> list[np.ndarray]:
    from atoken.core.patchify import detokenize, to_model_range, to_uint8, tokenize

    out = []
    for i in range(0, len(items), 64):
        part = [it[0] if kind == "image" else it for it in items[i : i + 64]]
        x = tokenize([to_model_range(p) for p in part])
        rec, _ = tok.reconstruct(x.to(tok.device))
        out += [to_uint8(f.permute(0, 2, 3, 1)) for f in detokenize(rec, kind)]
    return out


def _eval_3d(tok, gen, gs, tower, judge, samples, steps, guidance, seed) -> dict[str, Any]:
    from atoken.pipelines.flow import choose_template
    from atoken.pipelines.reconstruct3d import render_mesh_views

    shapes = world.PRIMITIVES
    held = prompt_specs("3d", "held_out", samples, seed + 1)
    rng = np.random.default_rng(seed + 5)
    generated, templates = [], []
    for i, s in enumerate(held):
        views, tpl = generate_3d_views(
            tok, gen, gs, tower, s, steps=steps, guidance=guidance, seed=seed + i
        )
        generated.append(views)
        templates.append(tpl)
    real = [render_mesh_views(world.primitive_mesh(s), _orbit(rng, 4)) for s in held]
    s_held = judge_scores(judge, generated, held, shapes)
    s_real = judge_scores(judge, real, held, shapes)
    # the structure head alone, on every held-out caption template
    right = total = 0
    for shape, colour in world.combinations("3d", "held_out"):
        for tpl_i in range(len(world.prompt_templates("3d"))):
            cap = world.WorldSpec("3d", shape, colour).caption(tpl_i)
            right += gen.config.templates[choose_template(gen, tower.encode([cap]))] == shape
            total += 1
    return {
        "held_out": _public(s_held),
        "judge_on_real_held_out": _public(s_real),
        "structure_head_held_out": right / total,
        "templates_chosen": templates,
        "frechet_generated_vs_real": _fd(s_held["_features"], s_real["_features"]),
    }
