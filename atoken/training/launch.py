"""Running a stage on several local processes (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from atoken.training.config import load_train_config
from atoken.training.trainer import Trainer, TrainResult


def set_local_rank_env(rank: int, world: int, port: int) -> None:
    """The environment torch.distributed / accelerate read, for process ``rank`` of ``world``
    on this machine (rendezvous on 127.0.0.1:``port``)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )


def _spawned(rank: int, world: int, port: int, cfg: dict[str, Any], result_path: str) -> None:
    set_local_rank_env(rank, world, port)
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.get("threads") or 1))
    result = Trainer(load_train_config(cfg)).fit()
    if rank == 0:  # paths as strings: the parent reads it back with weights_only=True
        out = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
        torch.save(out, result_path)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train_multiprocess(
    path_or_dict: str | Path | Mapping[str, Any], num_processes: int = 2, **overrides
) -> TrainResult:
    """Data-parallel training in ``num_processes`` local CPU processes (gloo), no launcher needed.

    Each process runs ``threads`` threads (default 1), so 2 processes use 2 cores without
    OpenMP oversubscription. Returns rank 0's result.
    """
    import socket
    import tempfile

    import torch.multiprocessing as mp

    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    cfg = load_train_config(path_or_dict, **overrides)
    if num_processes == 1:
        return Trainer(cfg).fit()
    raw = cfg.to_dict()
    raw["cpu"] = True
    raw["threads"] = raw.get("threads") or 1
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "result.pt")
        mp.spawn(_spawned, args=(num_processes, port, raw, path), nprocs=num_processes, join=True)
        out = torch.load(path, weights_only=True)
    for key in ("output_dir", "checkpoint", "raw_checkpoint"):
        out[key] = Path(out[key])
    return TrainResult(**out)
