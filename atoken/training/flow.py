"""Training the latent flow generator (`atoken.pipelines.flow`) on accelerate, from cached latents.

A frozen tokenizer encodes every training item once; its posterior means (the pre-quantisation
mean for FSQ tokenizers) and the captions' text-tower embeddings are cached to safetensors
files, one per data source, keyed by the source, the tokenizer and the text tower. Training then
never runs the tokenizer or the text tower. Sources: the generated world (``type: world`` with
``kind`` image / video / 3d; only the training split of shape-colour pairs) and folders of
images with captions (``type: folder``: ``.txt`` sidecars, ``captions.json`` or
``captions.csv``, as `atoken.training.data`'s folders).

Conventions follow `atoken.training.trainer`: a YAML config with dotted ``--set`` overrides, AdamW with
warm-up + cosine, EMA weights exported (``generator.safetensors``) beside the raw ones, and a
resumable state (``state/step-N/trainer.pt``, plain tensors, read with ``weights_only``) that
includes the data generator, so N steps equal N/2 + resume + N/2 bit for bit.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from atoken.pipelines.flow import (
    COARSE_CELL,
    FlowConfig,
    FlowTransformer,
    coarse_voxels,
    flow_matching_loss,
    sample_timesteps,
    save_generator,
)
from atoken.training.config import _merge, read_config
from atoken.training.schedule import EMA, lr_factor
from atoken.training.trainer import latest_state, prune_states

SOURCE_TYPES = ("world", "folder")
TEMPLATE_SEED = 12345  # pose of the 3D templates (a fixed world seed)


@dataclass
class GenTrainConfig:
    """One generator training run (see ``configs/generator/*.yaml``).

    ``data``: ``cache_dir`` and ``sources``, each a mapping with ``type`` (world / folder),
    ``weight`` (how often a batch comes from it), ``batch`` (items per batch) and per type:
    world ``kind``, ``count``, ``size``, ``frames``, ``seed``; folder ``path``, ``size``.
    ``model``: `atoken.pipelines.flow.FlowConfig` fields (latent width and text size are filled in).
    """

    name: str = "generator"
    output_dir: str = "runs/generator"
    tokenizer: str = "atoken-tiny"
    text_tower: str = "minilm"
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    cond_drop: float = 0.1
    timesteps: str = "logit_normal"
    seed: int = 0
    threads: int | None = None
    cpu: bool = True
    log_every: int = 50
    save_every: int = 0
    keep_states: int = 2
    resume: str | bool | None = None
    export_dtype: str = "float16"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, {self.steps}), got {self.warmup_steps}")
        if not 0 <= self.cond_drop < 1:
            raise ValueError(f"cond_drop must be in [0, 1), got {self.cond_drop}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, lr > 0; got {self.lr}, {self.min_lr}")
        if not self.data.get("sources"):
            raise ValueError("data.sources is empty: list at least one source")
        for s in self.data["sources"]:
            if s.get("type") not in SOURCE_TYPES:
                raise ValueError(
                    f"source type must be one of {SOURCE_TYPES}, got {s.get('type')!r}"
                )
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GenTrainConfig:
        """Build from a mapping, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown generator config keys {unknown}; known keys: {sorted(known)}"
            )
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (written to ``config.yaml`` in the output folder)."""
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out


def load_gen_config(path_or_dict: str | Path | Mapping[str, Any], **overrides) -> GenTrainConfig:
    """A `GenTrainConfig` from YAML or a mapping, with dotted overrides (``data.cache_dir``)."""
    return GenTrainConfig.from_dict(_merge(read_config(path_or_dict, "generator"), overrides))


# ---------------------------------------------------------------------------------------------
# Latent cache


@dataclass
class LatentSet:
    """Cached latents of one source: rows of items, their coords, captions' embeddings."""

    kind: str
    feats: Tensor  # [R, L] float32
    coords: Tensor  # [R, 5] int32, b = item index
    offsets: Tensor  # [I + 1] int64 row offsets
    text: Tensor  # [I, text_dim]
    template: Tensor  # [I] int64 3D template (-1: none)
    captions: list[str]
    template_coords: Tensor | None = None  # [M, 4] (template, x, y, z) for 3D sources

    def __len__(self) -> int:
        return len(self.captions)


def _world_items(spec: Mapping[str, Any]):
    """(pixels-or-voxels, caption, template) of a world source's training split."""
    from atoken.training import world

    kind = spec.get("kind", "image")
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    size = int(spec.get("size", 64))
    for _ in range(int(spec.get("count", 1000))):
        s = world.sample_spec(rng, kind, "train")
        if kind == "image":
            yield world.render_image(s, size), s.caption(), -1
        elif kind == "video":
            yield world.render_video(s, size, int(spec.get("frames", 8))), s.caption(), -1
        else:
            feats, coords = world.render_voxels(s)
            yield (feats, coords), s.caption(), world.PRIMITIVES.index(s.shape)


def _folder_items(spec: Mapping[str, Any], base: str | None):
    from atoken.io.media import read_image
    from atoken.training.data import _caption_for, _read_captions

    root = Path(spec["path"]) if base is None else Path(base) / spec["path"]
    if not root.is_dir():
        raise ValueError(f"caption folder not found: {str(root)!r}")
    table = _read_captions(root)
    size = int(spec.get("size", 64))
    files = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
    )
    for p in files:
        caption = _caption_for(p, root, table)
        if caption:
            yield _square(read_image(p), size), caption, -1


def _square(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``size`` (Lanczos)."""
    from PIL import Image

    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = Image.fromarray(img[top : top + s, left : left + s])
    return np.asarray(crop.resize((size, size), Image.LANCZOS))


def template_voxels() -> Tensor:
    """The 3D templates: voxel ids of each world primitive in one fixed pose, ``[M, 4]``."""
    from atoken.training import world

    rows = []
    for i, prim in enumerate(world.PRIMITIVES):
        _, coords = world.render_voxels(world.WorldSpec("3d", prim, "white", seed=TEMPLATE_SEED))
        c = torch.as_tensor(np.asarray(coords), dtype=torch.int16)
        rows.append(torch.cat([torch.full((len(c), 1), i, dtype=torch.int16), c], 1))
    return torch.cat(rows)


def cache_key(spec: Mapping[str, Any], tokenizer: str, text_tower: str) -> str:
    """Short stable hash naming a source's cache file."""
    blob = json.dumps({"s": dict(spec), "t": tokenizer, "x": text_tower, "v": 1}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def build_latent_set(
    spec: Mapping[str, Any], tokenizer, tower, base: str | None = None, batch: int = 32
) -> LatentSet:
    """Encode one source with a frozen tokenizer (posterior means) and embed its captions."""
    from atoken.core.patchify import to_model_range, tokenize, tokenize_3d

    spec = {k: v for k, v in spec.items() if k not in ("weight", "batch")}
    kind = spec.get("kind", "image") if spec["type"] == "world" else "image"
    items = _world_items(spec) if spec["type"] == "world" else _folder_items(spec, base)
    feats, coords, captions, templates, pending = [], [], [], [], []

    def flush() -> None:
        if not pending:
            return
        x = tokenize([to_model_range(p) for p, _, _ in pending])
        mean = tokenizer.encode(x.to(tokenizer.device), pool=False).mean.float().cpu()
        for sl, (_, cap, tpl) in zip(x.item_slices(), pending):
            _append(mean[sl], x.coords[sl], cap, tpl)
        pending.clear()

    def _append(m: Tensor, c: Tensor, cap: str, tpl: int) -> None:
        c = c.clone()
        c[:, 0] = len(captions)
        feats.append(m)
        coords.append(c)
        captions.append(cap)
        templates.append(tpl)

    for item, cap, tpl in items:
        if kind == "3d":
            f768, cxyz = item
            x = tokenize_3d(f768, cxyz)
            keep, _ = coarse_voxels(x.coords[:, 2:], COARSE_CELL)
            mean = tokenizer.encode(x.to(tokenizer.device), pool=False).mean.float().cpu()
            _append(mean[keep], x.coords[keep], cap, tpl)
        else:
            pending.append((item, cap, tpl))
            if len(pending) >= batch:
                flush()
    flush()
    if not captions:
        raise ValueError(f"source {dict(spec)} gave no captioned items")
    lens = torch.tensor([len(f) for f in feats])
    return LatentSet(
        kind,
        torch.cat(feats),
        torch.cat(coords).to(torch.int32),
        torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]),
        tower.encode(captions).float().cpu(),
        torch.tensor(templates, dtype=torch.long),
        captions,
        template_voxels() if kind == "3d" else None,
    )


def save_latent_set(ls: LatentSet, path: str | Path, **meta) -> Path:
    """Write a `LatentSet` to safetensors (captions and kind in the metadata)."""
    from safetensors.torch import save_file

    tensors = {
        "feats": ls.feats.contiguous(),
        "coords": ls.coords.contiguous(),
        "offsets": ls.offsets.contiguous(),
        "text": ls.text.contiguous(),
        "template": ls.template.contiguous(),
    }
    if ls.template_coords is not None:
        tensors["template_coords"] = ls.template_coords.contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    md = {
        "kind": ls.kind,
        "captions": json.dumps(ls.captions),
        **{k: str(v) for k, v in meta.items()},
    }
    save_file(tensors, str(tmp), metadata=md)
    tmp.replace(path)
    return path


def load_latent_set(path: str | Path) -> LatentSet:
    """Read a `LatentSet` written by `save_latent_set`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    t = load_file(str(path))
    return LatentSet(
        meta["kind"],
        t["feats"],
        t["coords"],
        t["offsets"],
        t["text"],
        t["template"],
        json.loads(meta["captions"]),
        t.get("template_coords"),
    )


def cached_latent_sets(cfg: GenTrainConfig, log=print) -> list[LatentSet]:
    """Every source's `LatentSet`, encoded once and then read from ``data.cache_dir``."""
    cache = Path(cfg.data.get("cache_dir", Path(cfg.output_dir) / "latents"))
    out, tokenizer, tower = [], None, None
    for spec in cfg.data["sources"]:
        clean = {k: v for k, v in spec.items() if k not in ("weight", "batch")}
        path = cache / f"{cache_key(clean, cfg.tokenizer, cfg.text_tower)}.safetensors"
        if not path.is_file():
            if tokenizer is None:
                from atoken.pretrained.hub import load_pretrained
                from atoken.text.towers import load_text_tower

                tokenizer = _load_tokenizer(cfg.tokenizer, load_pretrained)
                tower = load_text_tower(cfg.text_tower)
            t0 = time.time()
            ls = build_latent_set(clean, tokenizer, tower, cfg.data.get("base_dir"))
            save_latent_set(ls, path, tokenizer=cfg.tokenizer, text_tower=cfg.text_tower)
            log(f"cached {len(ls)} {ls.kind} items -> {path} ({time.time() - t0:.0f} s)")
        out.append(load_latent_set(path))
    return out


def _load_tokenizer(name: str, load_pretrained):
    path = Path(name)
    if path.suffix == ".safetensors" and path.is_file():
        from atoken.core.checkpoint import load

        return load(path).eval()
    return load_pretrained(name).eval()


# ---------------------------------------------------------------------------------------------
# Batches


def sample_batch(
    sets: list[LatentSet], weights: list[float], sizes: list[int], g: torch.Generator
) -> tuple[int, Tensor, Tensor, Tensor, Tensor]:
    """One batch from one source: (source index, feats [N, L], coords [N, 5], text, template)."""
    w = torch.tensor(weights, dtype=torch.float64)
    si = int(torch.multinomial(w / w.sum(), 1, generator=g))
    ls = sets[si]
    idx = torch.randint(len(ls), (sizes[si],), generator=g)
    feats, coords = [], []
    for b, i in enumerate(idx.tolist()):
        a, z = int(ls.offsets[i]), int(ls.offsets[i + 1])
        c = ls.coords[a:z].clone()
        c[:, 0] = b
        feats.append(ls.feats[a:z])
        coords.append(c)
    return si, torch.cat(feats), torch.cat(coords), ls.text[idx], ls.template[idx]


def latent_statistics(sets: list[LatentSet]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std ``[L]`` over every cached row (each source weighted equally)."""
    means = torch.stack([s.feats.mean(0) for s in sets]).mean(0)
    var = torch.stack([((s.feats - means) ** 2).mean(0) for s in sets]).mean(0)
    return means, var.sqrt().clamp_min(1e-3)


# ---------------------------------------------------------------------------------------------
# Trainer


@dataclass
class GenTrainResult:
    """Where a run wrote its weights and how it went."""

    output_dir: Path
    checkpoint: Path
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    history: list[dict[str, float]]


class GenTrainer:
    """Trains a `FlowTransformer` on cached latents with accelerate (see the module docstring)."""

    def __init__(self, cfg: GenTrainConfig, log=print) -> None:
        from accelerate import Accelerator

        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.accelerator = Accelerator(cpu=cfg.cpu)
        acc = self.accelerator
        self.out = Path(cfg.output_dir)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.sets = cached_latent_sets(cfg, log)
        srcs = cfg.data["sources"]
        self.weights = [float(s.get("weight", 1.0)) for s in srcs]
        self.sizes = [int(s.get("batch", 32)) for s in srcs]
        templates = next(
            (s.template_coords for s in self.sets if s.template_coords is not None), None
        )
        from atoken.training import world

        mcfg = dict(cfg.model)
        mcfg.setdefault("latent_channels", int(self.sets[0].feats.shape[1]))
        mcfg.setdefault("text_dim", int(self.sets[0].text.shape[1]))
        mcfg.setdefault("text_tower", cfg.text_tower)
        mcfg.setdefault("tokenizer", cfg.tokenizer)
        mcfg.setdefault("templates", list(world.PRIMITIVES) if templates is not None else [])
        for s in self.sets:
            if s.kind == "image":
                c = s.coords[s.offsets[0] : s.offsets[1]]
                mcfg.setdefault("image_grid", [int(c[:, 2].max()) + 1, int(c[:, 3].max()) + 1])
            if s.kind == "video":
                c = s.coords[s.offsets[0] : s.offsets[1]]
                mcfg.setdefault("video_grid", [int(c[:, i].max()) + 1 for i in (1, 2, 3)])
        torch.manual_seed(cfg.seed)
        model = FlowTransformer(FlowConfig(**mcfg))
        mean, std = latent_statistics(self.sets)
        model.latent_mean.copy_(mean)
        model.latent_std.copy_(std)
        if templates is not None:
            model.template_coords = templates.clone()
        self.generator = torch.Generator().manual_seed(cfg.seed + 17)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=cfg.lr,
            betas=cfg.betas,
            weight_decay=cfg.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr / cfg.lr)
        )
        self.ema = EMA(model, cfg.ema_decay)
        self.model, self.optimizer = acc.prepare(model, self.optimizer)
        self.step = 0
        self.history: list[dict[str, float]] = []
        if cfg.resume:
            self.resume(cfg.resume)

    @property
    def raw_model(self) -> FlowTransformer:
        """The model without accelerate's wrapping."""
        return self.accelerator.unwrap_model(self.model)

    # -- state ---------------------------------------------------------------------------
    def save_state(self) -> Path:
        """Model, optimiser, schedule, EMA and the data generator at the current step."""
        d = self.out / "state" / f"step-{self.step:07d}"
        d.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": self.raw_model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict(),
                "step": self.step,
                "generator": self.generator.get_state(),
            },
            d / "trainer.pt",
        )
        prune_states(self.out, self.cfg.keep_states)
        return d

    def resume(self, where: str | bool) -> None:
        """Restore the latest state (``True`` / "auto") or a given state folder."""
        if where is True or where == "auto":
            d = latest_state(self.out)
            if d is None:
                return
        else:
            d = Path(str(where))
        if not (d / "trainer.pt").is_file():
            raise ValueError(f"no resumable state in {str(d)!r} (expected trainer.pt)")
        blob = torch.load(d / "trainer.pt", map_location="cpu", weights_only=True)
        self.raw_model.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self.ema.load_state_dict(blob["ema"])
        self.step = int(blob["step"])
        self.generator.set_state(blob["generator"])

    # -- loop ----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimiser step on one batch of one source."""
        cfg, g, dev = self.cfg, self.generator, self.accelerator.device
        si, x1, coords, text, _ = sample_batch(self.sets, self.weights, self.sizes, g)
        model = self.raw_model
        batch = text.shape[0]
        x1 = model.normalize(x1)
        x0 = torch.randn(x1.shape, generator=g)
        t = sample_timesteps(batch, g, cfg.timesteps)
        drop = torch.rand(batch, generator=g) < cfg.cond_drop
        rows = coords[:, 0].long()
        x1, x0, coords, text, drop, t = (v.to(dev) for v in (x1, x0, coords, text, drop, t))

        def velocity(xt: Tensor, _t: Tensor) -> Tensor:
            return self.model(xt, coords, t, text, drop)

        loss = flow_matching_loss(velocity, x1, x0, t[rows.to(dev)][:, None])
        row = {"loss": float(loss.detach()), f"loss_{self.sets[si].kind}": float(loss.detach())}
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} at step {self.step}")
        self.accelerator.backward(loss)
        if cfg.grad_clip:
            self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.ema.update(self.raw_model)
        self.step += 1
        return row

    def fit(self) -> GenTrainResult:
        """Train to ``steps``, log to ``metrics.csv``, save states, export the EMA weights."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, desc=cfg.name)
        t0 = time.time()
        cols = ["step", "seconds", "lr", "loss", "loss_image", "loss_video", "loss_3d"]
        csv_path = self.out / "metrics.csv"
        if not csv_path.exists():
            with csv_path.open("w", newline="") as f:
                csv.writer(f).writerow(cols)
        recent: list[dict[str, float]] = []
        while self.step < cfg.steps:
            row = self.train_step()
            row.update(
                step=self.step, seconds=time.time() - t0, lr=self.scheduler.get_last_lr()[-1]
            )
            self.history.append(row)
            recent.append(row)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                avg = {
                    k: float(np.mean([r[k] for r in recent if k in r]))
                    for k in cols[3:]
                    if any(k in r for r in recent)
                }
                bar.set_postfix(loss=f"{avg['loss']:.4f}")
                with csv_path.open("a", newline="") as f:
                    merged = {**row, **avg}
                    csv.writer(f).writerow(
                        ["" if k not in merged else f"{merged[k]:.6g}" for k in cols]
                    )
                recent = []
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_state()
        bar.close()
        seconds = time.time() - t0
        ckpt = self.export()
        if cfg.save_every:
            self.save_state()
        losses = [r["loss"] for r in self.history] or [float("nan")]
        return GenTrainResult(
            self.out, ckpt, self.step, seconds, losses[0], losses[-1], self.history
        )

    def export(self) -> Path:
        """``generator.safetensors`` (EMA weights) and ``generator_raw.safetensors``."""
        meta = {"step": self.step, "run": self.cfg.name}
        save_generator(
            self.raw_model, self.out / "generator_raw.safetensors", self.cfg.export_dtype, **meta
        )
        ema_model = copy.deepcopy(self.raw_model).float()
        self.ema.copy_to(ema_model)
        if ema_model.structure_head is not None:
            from atoken.text.towers import load_text_tower

            fit_structure_head(ema_model, load_text_tower(self.cfg.text_tower), self.cfg.seed)
        return save_generator(
            ema_model, self.out / "generator.safetensors", self.cfg.export_dtype, **meta
        )


def structure_captions() -> tuple[list[str], Tensor]:
    """Every caption template of every *training* 3D pair, with its primitive index."""
    from atoken.training import world

    caps, labels = [], []
    for shape, colour in world.combinations("3d", "train"):
        for i in range(len(world.prompt_templates("3d"))):
            caps.append(world.WorldSpec("3d", shape, colour).caption(i))
            labels.append(world.PRIMITIVES.index(shape))
    return caps, torch.tensor(labels)


def fit_structure_head(model: FlowTransformer, tower, seed: int = 0, steps: int = 400) -> float:
    """Fit p(template | text) from scratch on `structure_captions` (text only, no latents).

    The head is a linear softmax classifier on the pooled text embedding; it needs no rendered
    data, so it sees every training caption rather than the few 3D items the flow trains on.
    Returns the final training accuracy.
    """
    head = model.structure_head
    assert head is not None
    caps, labels = structure_captions()
    emb = tower.encode(caps).float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(0.01 * torch.randn(head.weight.shape, generator=g))
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(emb.to(head.weight.dtype)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((head(emb).argmax(-1) == labels).float().mean())


def train_generator(path_or_dict: str | Path | Mapping[str, Any], **overrides) -> GenTrainResult:
    """Run one generator training from a YAML path or a mapping; keyword overrides win."""
    return GenTrainer(load_gen_config(path_or_dict, **overrides)).fit()
