"""Training AToken on accelerate: the adversarial-free objective and the 4-stage curriculum.

One config (YAML or dict, see `TrainConfig` and ``configs/train/``) describes a stage: the
model (a preset, an official YAML, or a config dict, optionally started from a checkpoint with
``init_from`` + ``init_config``), the data sources (`atoken.training.data`), the loss and the optimiser.
`train_from_config` runs it on whatever accelerate sees: one CPU, one GPU, or several processes
(``accelerate launch`` / ``torchrun``; gloo on CPU, NCCL on GPU).

Objective (§3.5): ``0.2 * reconstruction + 1.0 * semantic + 1e-8 * KL``.

* Reconstruction: images use `atoken.training.losses.ImageReconstructionLoss` (L1 at native size, and on
  224x224 resizes an LPIPS-style term, a Gram term and a CLIP-style term, weights 1 / 10 / 1e3 /
  1) on frame 0 of the decoded tokens; videos use L1 over all frames; 3D uses L1 on the decoded
  voxel features (the first 768 channels), not on rendered Gaussians: the GS decoder is a
  separate, frozen module downstream of these features, and rendering on CPU would dominate
  the step. Modalities are mixed by their share of the batch's tokens.
* Semantic: the SigLIP sigmoid loss between pooled features and caption embeddings of a frozen
  text tower, for every captioned item; for images the paper's distillation (KL at T = 2 of a
  frozen teacher's image-text logits into ours) replaces it when a teacher is configured.
  ``logit_scale`` / ``logit_bias`` are trainable scalars and are written into the exported
  config. With data parallelism the sigmoid loss is computed per rank (no all-gather).
* KL of the diagonal posterior (continuous models); FSQ models (stage 4) quantise the posterior
  mean with a straight-through estimator and have no KL.

Optimiser: AdamW (0.9, 0.95), weight decay 0.1 on matrices only, linear warm-up then cosine
decay to ``min_lr``; the encoder's learning rate is scaled by ``encoder_lr_scale`` (default 0.1
when starting from a checkpoint, as the paper does for a pretrained encoder). An EMA of the
weights (decay ``min(ema_decay, (1 + t) / (10 + t))``, so short runs are not dominated by the
initial weights) is what gets exported.

Outputs in ``output_dir``: ``model.safetensors`` (EMA) and ``model_raw.safetensors`` (last
weights), both in the official key format with the config JSON in the metadata
(``atoken_config``), ``metrics.csv``, TensorBoard events under ``tb/``, and resumable states
under ``state/step-XXXXXXX/``.
"""

from __future__ import annotations

import copy
import csv
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from atoken.training import data as data_mod
from atoken.training.config import TrainConfig, load_train_config
from atoken.training.export import export_config, save_model
from atoken.training.init import (
    build_stage_model,
    frame0_patches,
    fsq_rotation_init,
    input_frame_mask,
    patch_pca,
    pca_init,
    stream_latents,
    temporal_mix_init,
)
from atoken.training.objective import Objective, TrainModule
from atoken.training.schedule import EMA, lr_factor, param_groups


@dataclass
class TrainResult:
    """Where a run wrote its outputs and how it went."""

    output_dir: Path
    checkpoint: Path
    raw_checkpoint: Path
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    history: list[dict[str, float]]
    sources_seen: list[str] = field(default_factory=list)


def _release_precision(mixed_precision: str) -> None:
    """Let a new stage in the same process use another precision than the previous one.

    accelerate keeps one process-wide state and refuses a second ``mixed_precision``; the
    process-group part (PartialState) is kept.
    """
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and str(current) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


# the columns of a run's metrics.csv
LOG_COLUMNS = (
    "step",
    "seconds",
    "lr",
    "total",
    "reconstruction",
    "semantic",
    "kl",
    "image_l1",
    "image_lpips",
    "image_gram",
    "image_perceptual",
    "image_mse",
    "video_l1",
    "3d_l1",
    "siglip",
    "distill",
    "logit_scale",
    "logit_bias",
    "tokens",
    "items",
    "tokens_per_s",
)


def latest_state(output_dir: Path) -> Path | None:
    """The newest resumable state folder (``output_dir/state/step-*``), None if there is none."""
    states = sorted((Path(output_dir) / "state").glob("step-*"))
    return states[-1] if states else None


def prune_states(output_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest state folders."""
    states = sorted((Path(output_dir) / "state").glob("step-*"))
    for old in states[: max(0, len(states) - keep)]:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


class Trainer:
    """Runs one stage with accelerate (see the module docstring)."""

    def __init__(self, cfg: TrainConfig) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        _release_precision(cfg.mixed_precision)
        self.accelerator = Accelerator(
            cpu=cfg.cpu,
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum,
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.out = Path(cfg.output_dir)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        torch.manual_seed(cfg.seed + 1000 * self.rank)
        self.generator = torch.Generator(device=acc.device).manual_seed(cfg.seed + 17 + self.rank)

        model, source_cfg = build_stage_model(cfg)
        pretrained = source_cfg is not None
        self.stream = self._build_stream()
        if cfg.pca_init and not pretrained:
            count = int(cfg.pca_init.get("patches", 20000))
            # Its own draws (the training stream is untouched), optionally from some sources only.
            probe = self._build_stream(seed_offset=1, only=cfg.pca_init.get("sources"))
            mean, basis = patch_pca(frame0_patches(probe, count), model.config.latent_channels)
            pca_init(model, mean, basis, float(cfg.pca_init.get("constant", 10.0)))
        if cfg.temporal_init and pretrained:
            temporal_mix_init(model, cfg.temporal_init)
        if cfg.fsq_init and pretrained and model.quantizer is not None:
            probe = self._build_stream(seed_offset=2)
            lat = stream_latents(model, probe, int(cfg.fsq_init.get("tokens", 20000)))
            fsq_rotation_init(
                model, lat, float(cfg.fsq_init.get("std", 0.75)), int(cfg.fsq_init.get("seed", 0))
            )
        if cfg.gradient_checkpointing:
            model.set_gradient_checkpointing(True)
        sem = dict(cfg.semantic)
        # Start the logit scalars from the config, else from the previous stage, else SigLIP's.
        scale0 = source_cfg.logit_scale if source_cfg is not None else math.log(10.0)
        bias0 = source_cfg.logit_bias if source_cfg is not None else -10.0
        self.module = TrainModule(
            model,
            float(sem.get("logit_scale", scale0)),
            float(sem.get("logit_bias", bias0)),
            bool(sem.get("learn_logit", True)),
            float(sem.get("trunk_grad_scale", 1.0)),
        )
        enc_scale = (
            cfg.encoder_lr_scale
            if cfg.encoder_lr_scale is not None
            else (0.1 if pretrained else 1.0)
        )
        masks = {}
        if cfg.encoder_train_frames:
            mask = input_frame_mask(model, cfg.encoder_train_frames)
            weight = model.encoder.input_layer.weight
            weight.register_hook(lambda g, m=mask: g * m.to(g.device, g.dtype))
            masks["model.encoder.input_layer.weight"] = mask
        self.optimizer = torch.optim.AdamW(
            param_groups(
                self.module,
                cfg.lr,
                cfg.weight_decay,
                enc_scale,
                cfg.freeze_encoder,
                cfg.lr_scales,
                partly_trained=masks,
            ),
            lr=cfg.lr,
            betas=cfg.betas,
            weight_decay=cfg.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr / cfg.lr),
        )
        self.ema = EMA(self.module, cfg.ema_decay, masks)
        self.module, self.optimizer = acc.prepare(self.module, self.optimizer)
        self.objective = Objective(cfg.loss, sem, acc.device)
        self.quantized = model.quantizer is not None
        self.batches = data_mod.TokenBudgetBatcher(
            self.stream, int(cfg.data.get("token_budget", 4096)), cfg.data.get("max_items")
        )
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.sources_seen: list[str] = []
        if cfg.resume:
            self.resume(cfg.resume)

    # -- data ----------------------------------------------------------------------------
    def _build_stream(
        self, seed_offset: int = 0, only: Sequence[int] | None = None
    ) -> data_mod.MixtureStream:
        if not hasattr(self, "_sources"):
            sources_cfg = list(self.cfg.data.get("sources") or [])
            if not sources_cfg:
                raise ValueError("data.sources is empty: list at least one source")
            base = self.cfg.data.get("base_dir")
            self._sources, self._weights = [], []
            for spec in sources_cfg:
                spec = dict(spec)
                self._weights.append(float(spec.pop("weight", 1.0)))
                self._sources.append(data_mod.build_source(spec, base))
        keep = range(len(self._sources)) if only is None else [int(i) for i in only]
        if not keep or max(keep) >= len(self._sources):
            raise ValueError(f"source indices {list(keep)} do not fit {len(self._sources)} sources")
        return data_mod.MixtureStream(
            [self._sources[i] for i in keep],
            [self._weights[i] for i in keep],
            seed=self.cfg.seed + 7919 * seed_offset,
            rank=self.rank,
        )

    # -- state ---------------------------------------------------------------------------
    @property
    def raw_module(self) -> TrainModule:
        """The TrainModule without DDP wrapping."""
        return self.accelerator.unwrap_model(self.module)

    def state_dir(self, step: int) -> Path:
        """Folder of the resumable state at ``step``."""
        return self.out / "state" / f"step-{step:07d}"

    def save_state(self) -> Path:
        """Write a resumable state (model, optimiser, schedule, EMA, data RNG of every rank)."""
        acc = self.accelerator
        d = self.state_dir(self.step)
        acc.wait_for_everyone()
        if acc.is_main_process:
            d.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "module": self.raw_module.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "ema": self.ema.state_dict(),
                    "step": self.step,
                    "torch_rng": torch.get_rng_state(),
                },
                d / "trainer.pt",
            )
        acc.wait_for_everyone()
        torch.save(
            {
                "stream": self.stream.state_dict(),
                "generator": self.generator.get_state(),
                # plain tensors and strings, so resuming needs no unpickling (weights_only)
                "pending": None if self.batches.pending is None else asdict(self.batches.pending),
            },
            d / f"data_rank{self.rank}.pt",
        )
        acc.wait_for_everyone()
        if acc.is_main_process:
            prune_states(self.out, self.cfg.keep_states)
        return d

    def resume(self, where: str | bool) -> None:
        """Restore the latest state in ``output_dir/state`` (``True``/"auto") or a given folder."""
        if where is True or where == "auto":
            d = latest_state(self.out)
            if d is None:
                return  # nothing to resume: a fresh start
        else:
            d = Path(str(where))
        if not (d / "trainer.pt").is_file():
            raise ValueError(f"no resumable state in {str(d)!r} (expected trainer.pt)")
        blob = torch.load(d / "trainer.pt", map_location="cpu", weights_only=True)
        self.raw_module.load_state_dict(blob["module"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self.ema.load_state_dict(blob["ema"])
        self.step = int(blob["step"])
        torch.set_rng_state(blob["torch_rng"])
        f = d / f"data_rank{self.rank}.pt"
        if f.is_file():  # absent when resuming with more ranks than the run had
            state = torch.load(f, map_location="cpu", weights_only=True)
            self.stream.load_state_dict(state["stream"])
            self.generator.set_state(state["generator"])
            pending = state["pending"]
            self.batches.pending = None if pending is None else data_mod.Sample(**pending)

    # -- loop ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_batch(self, batch: data_mod.Batch, use_ema: bool = False) -> dict[str, float]:
        """Loss terms on a batch without updating anything (posterior mean, eval mode)."""
        module = self.raw_module
        if use_ema:
            module = copy.deepcopy(module)
            self.ema.copy_to(module)
        was_training = module.training
        module.eval()
        device = self.accelerator.device
        batch = data_mod.Batch(batch.tokens.to(device), batch.kinds, batch.captions, batch.sources)
        try:
            with self.accelerator.autocast():
                out = module(batch.tokens.feats, batch.tokens.coords, False)
                terms = self.objective(out, batch, self.quantized)
        finally:
            module.train(was_training)
        return {k: float(v) for k, v in terms.items()}

    def train_step(self, batch: data_mod.Batch) -> dict[str, float]:
        """One optimiser step (or one accumulation micro-step) on a batch."""
        acc = self.accelerator
        device = acc.device
        batch = data_mod.Batch(batch.tokens.to(device), batch.kinds, batch.captions, batch.sources)
        with acc.accumulate(self.module):
            with acc.autocast():
                out = self.module(
                    batch.tokens.feats,
                    batch.tokens.coords,
                    self.objective.sample_posterior,
                    self.generator,
                )
                terms = self.objective(out, batch, self.quantized)
            loss = terms["total"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {float(loss)} at step {self.step}")
            acc.backward(loss)
            if acc.sync_gradients and self.cfg.grad_clip:
                acc.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        row = {k: float(v.detach()) for k, v in terms.items()}
        row["tokens"] = float(len(batch.tokens))
        row["items"] = float(batch.size)
        return row

    def fit(self) -> TrainResult:
        """Run to ``steps`` optimiser steps, logging, saving states and exporting weights."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        writer = self._tensorboard() if acc.is_main_process else None
        csv_path = self.out / "metrics.csv"
        self._csv_columns: list[str] | None = None
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (cfg.progress and acc.is_main_process),
            desc=cfg.name,
            dynamic_ncols=True,
        )
        t0 = time.time()
        last = time.time()
        micro = 0
        try:
            while self.step < cfg.steps:
                batch = next(self.batches)
                if cfg.record_sources:
                    self.sources_seen += batch.sources
                row = self.train_step(batch)
                micro += 1
                if micro % cfg.grad_accum:
                    continue
                self.scheduler.step()
                self.ema.update(self.raw_module)
                self.step += 1
                now = time.time()
                row.update(
                    step=float(self.step),
                    lr=float(self.scheduler.get_last_lr()[-1]),
                    seconds=now - t0,
                    tokens_per_s=row["tokens"] / max(now - last, 1e-9),
                    logit_scale=float(self.raw_module.logit_scale.detach()),
                    logit_bias=float(self.raw_module.logit_bias.detach()),
                )
                last = now
                self.history.append(row)
                bar.update(1)
                if acc.is_main_process and (
                    self.step % cfg.log_every == 0 or self.step == cfg.steps
                ):
                    bar.set_postfix(loss=f"{row['total']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                    self._log(csv_path, writer, row)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_state()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        seconds = time.time() - t0
        ckpt, raw = self.export()
        if cfg.save_every:
            self.save_state()
        losses = [r["total"] for r in self.history] or [float("nan")]
        return TrainResult(
            self.out,
            ckpt,
            raw,
            self.step,
            seconds,
            losses[0],
            losses[-1],
            self.history,
            self.sources_seen,
        )

    def export(self) -> tuple[Path, Path]:
        """Write ``model.safetensors`` (EMA weights) and ``model_raw.safetensors``."""
        acc = self.accelerator
        acc.wait_for_everyone()
        ema_path, raw_path = self.out / "model.safetensors", self.out / "model_raw.safetensors"
        if acc.is_main_process:
            module = self.raw_module
            meta = {"step": str(self.step), "stage": self.cfg.name}
            cfg_raw = export_config(module.model, module)
            save_model(module.model, raw_path, cfg_raw, self.cfg.export_dtype, meta)
            ema_module = copy.deepcopy(module).float()
            self.ema.copy_to(ema_module)
            save_model(
                ema_module.model,
                ema_path,
                export_config(ema_module.model, ema_module),
                self.cfg.export_dtype,
                meta,
            )
        acc.wait_for_everyone()
        return ema_path, raw_path

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(log_dir=str(self.out / "tb"))

    def _log(self, csv_path: Path, writer, row: dict[str, float]) -> None:
        if self._csv_columns is None:  # once per run: a resumed run keeps its file's columns
            if csv_path.exists():
                with csv_path.open(newline="") as f:
                    self._csv_columns = next(csv.reader(f), None) or list(LOG_COLUMNS)
            else:
                self._csv_columns = list(LOG_COLUMNS)
                with csv_path.open("w", newline="") as f:
                    csv.writer(f).writerow(self._csv_columns)
        with csv_path.open("a", newline="") as f:
            csv.writer(f).writerow(
                ["" if k not in row else f"{row[k]:.6g}" for k in self._csv_columns]
            )
        if writer is not None:
            for k, v in row.items():
                if k not in ("step", "seconds"):
                    writer.add_scalar(f"train/{k}", v, int(row["step"]))


def train_from_config(path_or_dict: str | Path | Mapping[str, Any], **overrides) -> TrainResult:
    """Run one training stage from a YAML path or a mapping; keyword overrides win (dotted ok).

    Runs in this process, on whatever accelerate sees (use ``accelerate launch`` / ``torchrun``
    for several processes or machines, or `train_multiprocess` for several local CPU processes).
    """
    cfg = load_train_config(path_or_dict, **overrides)
    return Trainer(cfg).fit()


def read_metrics(output_dir: str | Path) -> list[dict[str, float]]:
    """Rows of a run's ``metrics.csv`` as floats (empty cells skipped)."""
    path = Path(output_dir) / "metrics.csv"
    if not path.is_file():
        raise ValueError(f"no metrics.csv in {str(output_dir)!r}")
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
