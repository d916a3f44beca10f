"""Text-to-latent generation: a rectified-flow transformer over AToken latent tokens (paper §5).

The paper trains generators for images, videos and 3D on AToken's latent space; this module is a
small one. A `FlowTransformer` predicts the velocity ``v = x1 - x0`` of the straight path
``x_t = (1 - t) x0 + t x1`` from Gaussian noise ``x0`` (t = 0) to a tokenizer latent ``x1``
(t = 1) (rectified flow / flow matching). It works on the tokenizer's own sparse layout: rows of
latents ``[N, L]`` with coords ``(b, t, x, y, z)`` and the same 4D RoPE, so one network serves
images (a t = 0 grid), videos (t > 0) and 3D voxels (t = 1, x y z). Text enters through a
pooled text-tower embedding (MiniLM bundled, SigLIP2 when present) mixed with the time into
adaLN modulation (DiT-style); a learned null embedding stands in for dropped captions so one
model gives both terms of classifier-free guidance.

The objective (`flow_matching_loss`) and the sampler (`sample_flow`, Euler or Heun, seeded,
with a progress callback) are plain functions of a velocity callable, so they are tested on
2-D toy distributions as well as used here.

3D occupancy comes from **templates**: a 3D asset of the generated world is one of a few
primitives, and the generator learns a categorical *structure head* p(template | text) trained
on the training captions; the flow then generates the latents on the chosen template's coarse
voxels (one per 4^3 cell, ~1k tokens), copied to the full ~19k surface voxels of the cell
before the tokenizer decodes them. Why: a free-form sparse-structure generator (the paper's 3D
generator follows TRELLIS's two stages) needs far more compute than the 2-CPU budget this
project trains on, and attention over all ~19k voxel tokens per sample costs minutes per
prompt on CPU; the template keeps the structure choice learned from text and the appearance
generated, at the price of never producing a shape outside the template set.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atoken.core.rope import rope_angles
from atoken.core.sparse import SparseTensor
from atoken.core.transformer import Context, FeedForward, SelfAttention
from atoken.pretrained import registry

Progress = Callable[[int, int, str], None]
KINDS = ("image", "video", "3d")
COARSE_CELL = 4  # voxels per side of a 3D structure cell


# ---------------------------------------------------------------------------------------------
# Objective and sampler as plain functions


def flow_path(x1: Tensor, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Point ``x_t = (1 - t) x0 + t x1`` on the straight path and its velocity ``x1 - x0``.

    ``t`` broadcasts against the rows of ``x1`` (e.g. ``[N, 1]``).
    """
    return (1.0 - t) * x0 + t * x1, x1 - x0


def sample_timesteps(n: int, generator: torch.Generator, mode: str = "logit_normal") -> Tensor:
    """``n`` training times in (0, 1): logit-normal (SD3's choice, §5 of its paper) or uniform."""
    if mode == "uniform":
        return torch.rand(n, generator=generator)
    if mode == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    raise ValueError(f"timestep mode must be 'logit_normal' or 'uniform', got {mode!r}")


def flow_matching_loss(
    velocity: Callable[[Tensor, Tensor], Tensor], x1: Tensor, x0: Tensor, t: Tensor
) -> Tensor:
    """Mean squared error between ``velocity(x_t, t)`` and the path's velocity ``x1 - x0``.

    Args:
        velocity: ``(x_t [N, D], t) -> [N, D]``, called with ``t`` exactly as given.
        x1: data ``[N, D]``; x0: noise of the same shape; t: times broadcasting to ``[N, D]``.
    """
    xt, target = flow_path(x1, x0, t)
    return F.mse_loss(velocity(xt, t).float(), target.float())


def time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """``steps + 1`` times from 0 (noise) to 1 (data); ``shift > 1`` spends more steps near noise.

    The shift is SD3's ``t' = t / (t + shift (1 - t))`` applied to a uniform grid.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    out = []
    for i in range(steps + 1):
        u = i / steps
        out.append(u / (u + shift * (1.0 - u)) if u < 1 else 1.0)
    return out


@torch.no_grad()
def sample_flow(
    velocity: Callable[[Tensor, float], Tensor],
    noise: Tensor,
    steps: int,
    *,
    method: str = "euler",
    shift: float = 1.0,
    progress: Progress | None = None,
) -> Tensor:
    """Integrate ``dx/dt = velocity(x, t)`` from ``noise`` at t = 0 to t = 1 (Euler or Heun)."""
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    ts = time_grid(steps, shift)
    x = noise.float()
    for i in range(steps):
        t0, t1 = ts[i], ts[i + 1]
        v = velocity(x, t0).float()
        if method == "heun" and i < steps - 1:  # the last step stays Euler (Karras et al.)
            x_e = x + (t1 - t0) * v
            v = 0.5 * (v + velocity(x_e, t1).float())
        x = x + (t1 - t0) * v
        if progress is not None:
            progress(i + 1, steps, "sampling")
    return x


def guided_velocity(v_cond: Tensor, v_uncond: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance: ``v_u + g (v_c - v_u)`` (g = 1: purely conditional)."""
    return v_uncond + guidance * (v_cond - v_uncond)


# ---------------------------------------------------------------------------------------------
# The network


@dataclass
class FlowConfig:
    """A latent flow transformer and what it generates (stored as JSON in the weights file).

    ``image_grid`` (rows, cols) and ``video_grid`` (latent frames, rows, cols) are the token
    layouts it was trained on; ``templates`` names the 3D structures (empty: no 3D).
    """

    latent_channels: int = 48
    text_dim: int = 384
    width: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    text_tower: str = "minilm"
    tokenizer: str = "atoken-tiny"
    image_grid: tuple[int, int] = (4, 4)
    video_grid: tuple[int, int, int] = (2, 4, 4)
    templates: list[str] = field(default_factory=list)
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.width % self.heads or (self.width // self.heads) % 8:
            raise ValueError(
                f"width / heads must be a multiple of 8 for 4D RoPE, got {self.width}/{self.heads}"
            )
        for name in ("latent_channels", "text_dim", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.image_grid = tuple(int(v) for v in self.image_grid)  # type: ignore[assignment]
        self.video_grid = tuple(int(v) for v in self.video_grid)  # type: ignore[assignment]
        self.templates = [str(t) for t in self.templates]

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.width // self.heads

    def to_json(self) -> str:
        """The config as JSON (what the weights file's metadata holds)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FlowConfig:
        """Inverse of `to_json`, rejecting unknown keys by name."""
        raw = json.loads(text)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown generator config keys {unknown}; known: {sorted(known)}")
        return cls(**raw)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` of times ``t [B]`` in [0, 1] (scaled to 0..1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
    ang = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(ang), torch.sin(ang)], -1)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class FlowBlock(nn.Module):
    """Pre-norm block whose norms are modulated by the condition (adaLN-zero, DiT)."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads, bias=True, qk_rms_norm=True, rope=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(width, mlp, bias=True)
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, c: Tensor, ctx: Context) -> Tensor:
        """``x [N, W]``, per-row condition ``c [N, W]``."""
        s1, g1, a1, s2, g2, a2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        x = x + a1 * self.attn(_modulate(self.norm1(x), s1, g1), ctx)
        return x + a2 * self.mlp(_modulate(self.norm2(x), s2, g2))


class FlowTransformer(nn.Module):
    """Velocity network over sparse latent tokens, conditioned on time and a text embedding.

    Buffers ``latent_mean`` / ``latent_std`` ``[L]`` normalise the tokenizer's latents (set from
    the training cache), so the flow runs on unit-scale data whatever the tokenizer. 3D
    templates (``template_coords [M, 4]`` = (template, x, y, z)) are buffers too.
    """

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = cfg = config
        w = cfg.width
        self.in_proj = nn.Linear(cfg.latent_channels, w)
        self.time_mlp = nn.Sequential(nn.Linear(256, w), nn.SiLU(), nn.Linear(w, w))
        self.text_mlp = nn.Sequential(nn.Linear(cfg.text_dim, w), nn.SiLU(), nn.Linear(w, w))
        self.null_text = nn.Parameter(torch.zeros(cfg.text_dim))
        mlp = int(w * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(FlowBlock(w, cfg.heads, mlp) for _ in range(cfg.depth))
        self.out_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.out_ada = nn.Linear(w, 2 * w)
        self.out_proj = nn.Linear(w, cfg.latent_channels)
        for lin in (self.out_ada, self.out_proj):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        n_t = len(cfg.templates)
        self.structure_head = nn.Linear(cfg.text_dim, n_t) if n_t else None
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))
        self.register_buffer("template_coords", torch.zeros(0, 4, dtype=torch.int16))

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.in_proj.weight.device

    def condition(self, t: Tensor, text: Tensor, drop: Tensor | None = None) -> Tensor:
        """Per-item condition ``[B, W]`` from times ``[B]`` and text embeddings ``[B, text_dim]``.

        ``drop [B]`` bool replaces those captions by the learned null embedding (guidance).
        """
        if drop is not None:
            text = torch.where(drop[:, None], self.null_text.to(text.dtype)[None], text)
        temb = timestep_embedding(t, 256).to(self.in_proj.weight.dtype)
        return self.time_mlp(temb) + self.text_mlp(text.to(self.in_proj.weight.dtype))

    def forward(
        self, x: Tensor, coords: Tensor, t: Tensor, text: Tensor, drop: Tensor | None = None
    ) -> Tensor:
        """Velocity ``[N, L]`` of normalised latents ``x [N, L]`` at per-item times ``t [B]``.

        Args:
            coords: ``[N, 5]`` int (b, t, x, y, z), rows of an item contiguous, b ascending.
            text: ``[B, text_dim]`` text embeddings; drop: optional ``[B]`` bool (null caption).
        """
        b = coords[:, 0].long()
        batch = t.shape[0]
        seqlens = torch.bincount(b, minlength=batch).tolist()
        cond = self.condition(t, text, drop)[b]  # [N, W]
        ctx = Context(seqlens, rope_angles(coords[:, 1:5], self.config.head_dim))
        h = self.in_proj(x.to(self.in_proj.weight.dtype))
        for blk in self.blocks:
            h = blk(h, cond, ctx)
        shift, scale = self.out_ada(F.silu(cond)).chunk(2, dim=-1)
        return self.out_proj(_modulate(self.out_norm(h), shift, scale))

    # -- latent scale ---------------------------------------------------------------------
    def normalize(self, latent: Tensor) -> Tensor:
        """Tokenizer latent -> the flow's unit-scale space."""
        return (latent.float() - self.latent_mean) / self.latent_std

    def denormalize(self, x: Tensor) -> Tensor:
        """The flow's space -> tokenizer latent."""
        return x.float() * self.latent_std + self.latent_mean

    # -- 3D structure ---------------------------------------------------------------------
    def template(self, index: int) -> Tensor:
        """Full-resolution voxel ids ``[M, 3]`` (int32) of one 3D template."""
        if not 0 <= index < len(self.config.templates):
            raise ValueError(f"template index {index} not in [0, {len(self.config.templates)})")
        rows = self.template_coords[:, 0].long() == index
        return self.template_coords[rows, 1:].to(torch.int32)

    def structure_logits(self, text: Tensor) -> Tensor:
        """Scores ``[B, templates]`` of the 3D structures for text embeddings ``[B, text_dim]``."""
        if self.structure_head is None:
            raise ValueError("this generator has no 3D templates")
        return self.structure_head(text.to(self.structure_head.weight.dtype)).float()


def coarse_voxels(coords_xyz: Tensor, cell: int = COARSE_CELL) -> tuple[Tensor, Tensor]:
    """One representative voxel per ``cell^3`` cell, and each voxel's representative.

    Returns ``(keep [K] row indices, owner [M] index into keep)``; the representative is the
    first voxel of the cell in row order, so the choice is deterministic.
    """
    c = coords_xyz.long() // cell
    key = (c[:, 0] * 4096 + c[:, 1]) * 4096 + c[:, 2]
    uniq, inverse = torch.unique(key, return_inverse=True)
    first = torch.full((uniq.shape[0],), coords_xyz.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(coords_xyz.shape[0]), reduce="amin")
    return first, inverse


# ---------------------------------------------------------------------------------------------
# Saving and loading

# Generators by name -> file (from the model table, `atoken.pretrained.registry`).
GENERATORS: dict[str, str] = {
    n: registry.MODELS[n].file for n in registry.names(role="generator", source="bundled")
}


def generator_path(name: str) -> Path:
    """File of a bundled generator (``atoken-tiny-gen``); raises if unknown or missing."""
    from atoken.pretrained.hub import locate

    if name not in GENERATORS:
        raise ValueError(f"unknown generator {name!r}; choose one of {list(GENERATORS)}")
    return locate(name)


def save_generator(model: FlowTransformer, path: str | Path, dtype: str = "float16", **meta):
    """Weights as safetensors, the config JSON in the metadata (``flow_config``)."""
    from safetensors.torch import save_file

    dt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    state = {}
    for k, v in model.state_dict().items():
        # normalisation stats stay float32: they scale every generated latent
        keep = not v.is_floating_point() or k in ("latent_mean", "latent_std")
        state[k] = v.detach().cpu().contiguous() if keep else v.detach().cpu().to(dt).contiguous()
    metadata = {"flow_config": model.config.to_json(), **{k: str(v) for k, v in meta.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path


def load_generator(
    path_or_name: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> FlowTransformer:
    """A generator from a safetensors file or a bundled name (``atoken-tiny-gen``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = generator_path(str(path_or_name)) if str(path_or_name) in GENERATORS else path_or_name
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generator weights not found: {str(path)!r}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "flow_config" not in meta:
        raise ValueError(f"{path} has no flow_config metadata: not a generator file")
    model = FlowTransformer(FlowConfig.from_json(meta["flow_config"]))
    state = load_file(str(path))
    model.template_coords = state["template_coords"].clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    for name in ("latent_mean", "latent_std"):
        getattr(model, name).copy_(state[name].float())
    model = model.to(device=device, dtype=dtype)
    model.latent_mean, model.latent_std = model.latent_mean.float(), model.latent_std.float()
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Generation


@dataclass
class Generated:
    """What `generate` returns: decoded media plus the latent tokens it came from."""

    kind: str
    prompt: str
    latent: SparseTensor  # tokenizer latent (denormalised), coords (b, t, x, y, z)
    frames: np.ndarray | None = None  # uint8 [T, H, W, 3] (images: T = 1)
    gaussians: Any = None  # atoken.core.gaussians.Gaussians for 3D
    template: str | None = None  # 3D structure chosen by the structure head
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def image(self) -> np.ndarray:
        """The first frame ``[H, W, 3]`` uint8."""
        if self.frames is None:
            raise ValueError("a 3D result has no frames; render its gaussians")
        return self.frames[0]


def layout(
    generator: FlowTransformer, kind: str, count: int = 1, *, template: int | None = None
) -> Tensor:
    """Token coords ``[N, 5]`` of ``count`` items to generate (3D: the template's coarse voxels)."""
    cfg = generator.config
    if kind == "image":
        h, w = cfg.image_grid
        grids = [(0, x, y, 0) for x in range(h) for y in range(w)]
    elif kind == "video":
        nt, h, w = cfg.video_grid
        grids = [(t, x, y, 0) for t in range(nt) for x in range(h) for y in range(w)]
    elif kind == "3d":
        if template is None:
            raise ValueError("3D layouts need a template index")
        full = generator.template(template)
        keep, _ = coarse_voxels(full)
        xyz = full[keep]
        one = torch.cat([torch.ones(len(xyz), 1, dtype=torch.int32), xyz], 1)
        return _batched(one, count)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return _batched(torch.tensor(grids, dtype=torch.int32), count)


def _batched(rows: Tensor, count: int) -> Tensor:
    out = torch.zeros(count * rows.shape[0], 5, dtype=torch.int32)
    out[:, 1:] = rows.repeat(count, 1)
    out[:, 0] = torch.arange(count).repeat_interleave(rows.shape[0])
    return out


@torch.no_grad()
def sample_latents(
    generator: FlowTransformer,
    text: Tensor,
    coords: Tensor,
    *,
    steps: int = 25,
    guidance: float = 4.0,
    seed: int = 0,
    method: str = "euler",
    progress: Progress | None = None,
) -> Tensor:
    """Tokenizer latents ``[N, L]`` for layout ``coords`` and text embeddings ``[B, text_dim]``.

    One forward pass per step evaluates the conditional and the null-caption branch together.
    """
    dev = generator.device
    batch = text.shape[0]
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(coords.shape[0], generator.config.latent_channels, generator=g)
    coords = coords.to(dev)
    text = text.to(dev)
    use_cfg = guidance != 1.0
    if use_cfg:
        both = coords.clone()
        both[:, 0] += batch
        coords2 = torch.cat([coords, both])
        text2 = torch.cat([text, text])
        drop = torch.cat(
            [torch.zeros(batch, dtype=torch.bool), torch.ones(batch, dtype=torch.bool)]
        )
        drop = drop.to(dev)

    def velocity(x: Tensor, t: float) -> Tensor:
        if not use_cfg:
            tt = torch.full((batch,), t, device=dev)
            return generator(x, coords, tt, text).float()
        tt = torch.full((2 * batch,), t, device=dev)
        v = generator(torch.cat([x, x]), coords2, tt, text2, drop).float()
        vc, vu = v.chunk(2)
        return guided_velocity(vc, vu, guidance)

    x = sample_flow(
        velocity,
        noise.to(dev),
        steps,
        method=method,
        shift=generator.config.shift,
        progress=progress,
    )
    return generator.denormalize(x)


def choose_template(generator: FlowTransformer, text: Tensor, seed: int | None = None) -> int:
    """The 3D structure for one text embedding ``[1, text_dim]``: argmax, or sampled with a seed."""
    logits = generator.structure_logits(text.to(generator.device))[0]
    if seed is None:
        return int(logits.argmax())
    g = torch.Generator().manual_seed(int(seed))
    return int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=g))


@torch.no_grad()
def generate(
    tokenizer,
    generator: FlowTransformer,
    prompt: str,
    kind: str = "image",
    *,
    steps: int = 25,
    guidance: float = 4.0,
    seed: int = 0,
    method: str = "euler",
    gs_decoder=None,
    text_tower=None,
    progress: Progress | None = None,
) -> Generated:
    """Prompt -> generated latent -> decoded image / video frames / 3D Gaussians.

    ``tokenizer`` decodes (its latent width must match the generator's); 3D needs
    ``gs_decoder`` (e.g. ``load_pretrained("atoken-tiny-gs")``) to turn tokens into Gaussians.
    """
    from atoken.core.patchify import detokenize, gs_input, to_uint8
    from atoken.text.towers import load_text_tower

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if tokenizer.config.latent_channels != generator.config.latent_channels:
        raise ValueError(
            f"generator makes {generator.config.latent_channels}-channel latents, the tokenizer "
            f"decodes {tokenizer.config.latent_channels}"
        )
    if kind == "3d" and gs_decoder is None:
        raise ValueError("3D generation needs a gs_decoder (load_pretrained('atoken-tiny-gs'))")
    tower = text_tower or load_text_tower(generator.config.text_tower)
    text = tower.encode([prompt])
    template = choose_template(generator, text) if kind == "3d" else None
    coords = layout(generator, kind, 1, template=template)
    lat = sample_latents(
        generator,
        text,
        coords,
        steps=steps,
        guidance=guidance,
        seed=seed,
        method=method,
        progress=progress,
    )
    info = {"steps": steps, "guidance": guidance, "seed": seed, "tokens": int(coords.shape[0])}
    if kind != "3d":
        latent = SparseTensor(lat.cpu(), coords)
        rec = tokenizer.decode(_decoder_input(tokenizer, latent))
        frames = detokenize(rec, [kind])[0]  # [T, 3, H, W]
        return Generated(kind, prompt, latent, to_uint8(frames.permute(0, 2, 3, 1)), info=info)
    full = generator.template(template)
    _, owner = coarse_voxels(full)
    full_coords = torch.cat([torch.zeros(len(full), 1, dtype=torch.int32), coords[owner, 1:]], 1)
    full_coords[:, 2:] = full
    latent = SparseTensor(lat.cpu()[owner], full_coords)
    rec = tokenizer.decode(_decoder_input(tokenizer, latent))
    (gaussians,) = gs_decoder(gs_input(rec).to(gs_decoder_device(gs_decoder)))
    info["voxels"] = len(full)
    name = generator.config.templates[template]
    return Generated(kind, prompt, latent, gaussians=gaussians.to("cpu"), template=name, info=info)


@torch.no_grad()
def pooled_feature(tokenizer, result: Generated) -> Tensor:
    """The tokenizer's pooled feature ``[1, C]`` of a generated result, for zero-shot scoring.

    Images and videos are re-encoded from their decoded frames; 3D from its decoded voxel
    colours (the first frame slot of each token, as `atoken.core.patchify.tokenize_3d` lays them out).
    """
    from atoken.core.patchify import VOXEL_CHANNELS, to_model_range, tokenize

    if result.frames is not None:
        item = result.frames[0] if result.kind == "image" else result.frames
        x = tokenize([to_model_range(item)])
    else:
        rec = tokenizer.decode(_decoder_input(tokenizer, result.latent))
        feats = rec.feats.float().clamp(-1, 1)
        feats[:, VOXEL_CHANNELS:] = 0
        x = SparseTensor(feats, rec.coords)
    return tokenizer.encode(x.to(tokenizer.device, tokenizer.dtype)).pooled.float().cpu()


def gs_decoder_device(gs_decoder) -> torch.device:
    """Device of a Gaussian decoder's parameters."""
    return next(gs_decoder.parameters()).device


def _decoder_input(tokenizer, latent: SparseTensor) -> SparseTensor:
    """Continuous latent -> what the decoder reads (FSQ codes for a discrete tokenizer)."""
    if tokenizer.is_discrete:
        codes, _ = tokenizer.quantize(latent.feats.to(tokenizer.device))
        return SparseTensor(codes, latent.coords)
    return latent.to(tokenizer.device, tokenizer.dtype)
