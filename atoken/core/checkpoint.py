"""Official checkpoints -> our modules: key table, safe file reading, strict loading, loaders.

Our modules carry the official parameter names, so the key table only strips wrapper prefixes
that other tools add. Files are read with ``safetensors`` or ``torch.load(weights_only=True)``
(never unpickling arbitrary objects). Full-size models are built on the meta device and the
checkpoint tensors are assigned in place, so nothing is allocated twice.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from atoken.core.config import PRESETS, ATokenConfig, GSDecoderConfig, resolve_config
from atoken.core.gs_decoder import GaussianDecoder
from atoken.core.model import ATokenModel

# (pattern, replacement) applied in order to every key of a file.
KEY_TABLE: list[tuple[str, str]] = [
    (r"^module\.", ""),  # DistributedDataParallel
    (r"^_orig_mod\.", ""),  # torch.compile
    (r"^model\.", ""),  # Lightning-style wrappers
]
# Keys that official files carry but inference does not use (training-only LPIPS of the GS file).
IGNORED_KEYS = re.compile(r"^lpips_loss\.")
CONFIG_KEY = "atoken_config"  # safetensors metadata: the ATokenConfig as JSON
GS_CONFIG_KEY = "gs_config"  # safetensors metadata: the GSDecoderConfig as JSON
ENCODER_FROM_KEY = "encoder_from"  # safetensors metadata: file whose encoder.* tensors to use
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class CheckpointError(ValueError):
    """A checkpoint does not fit the model (names missing/unexpected keys and shapes)."""


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``torch.float32`` / ``"bf16"`` / ... -> a torch dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` or ``.pt``/``.pth``/``.bin`` file (safe loading only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} could not be read as a tensor-only checkpoint (weights_only=True): {e}"
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return obj


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """:func:`read_state_dict`, plus the encoder of a sibling file when the metadata says
    ``encoder_from`` (bundled variants that share one encoder store it once)."""
    path = Path(path)
    state = read_state_dict(path)
    if path.suffix != ".safetensors":
        return state
    with safe_open(str(path), framework="pt") as f:
        base_name = (f.metadata() or {}).get(ENCODER_FROM_KEY)
    if base_name:
        base = path.parent / base_name
        if not base.is_file():
            raise CheckpointError(f"{path.name} shares its encoder with {base}, which is missing")
        shared = {k: v for k, v in read_state_dict(base).items() if k.startswith("encoder.")}
        state = {**shared, **state}
    return state


def rename_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Apply :data:`KEY_TABLE` and drop :data:`IGNORED_KEYS`."""
    out = {}
    for key, value in state.items():
        for pattern, repl in KEY_TABLE:
            key = re.sub(pattern, repl, key)
        if not IGNORED_KEYS.match(key):
            out[key] = value
    return out


def load_into(module: nn.Module, state: dict[str, Tensor], *, assign: bool = False) -> None:
    """Strictly load ``state`` into ``module``, raising one error that lists every problem."""
    state = rename_keys(state)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if wrong:
            lines.append(f"shape mismatches ({len(wrong)}): {_short(wrong)}")
        raise CheckpointError(
            "checkpoint does not match the model config:\n  " + "\n  ".join(lines)
        )
    module.load_state_dict(state, strict=True, assign=assign)


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


def _build(cls, config, device: str | torch.device, dtype: torch.dtype, weights):
    """Build on meta, then load weights (assign) or materialise random weights on ``device``."""
    device = torch.device(device)
    if weights is None:
        if device.type == "meta":
            with torch.device("meta"):
                return cls(config).to(dtype)
        with torch.device(device):
            model = cls(config)
        return model.to(dtype)
    with torch.device("meta"):
        model = cls(config)
    state = read_checkpoint(weights) if isinstance(weights, (str, Path)) else dict(weights)
    if isinstance(model, GaussianDecoder) and "offset_perturbation" not in rename_keys(state):
        raise CheckpointError("GS checkpoint lacks the persistent buffer 'offset_perturbation'")
    load_into(model, state, assign=True)
    if device.type == "meta":
        return model
    return model.to(device=device, dtype=dtype)


def config_from_checkpoint(path: str | Path) -> ATokenConfig | GSDecoderConfig | None:
    """The config stored in a safetensors file's metadata (``atoken_config``), if any."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    if CONFIG_KEY in meta:
        return ATokenConfig.from_dict(json.loads(meta[CONFIG_KEY]))
    if GS_CONFIG_KEY in meta:
        return GSDecoderConfig(**json.loads(meta[GS_CONFIG_KEY]))
    return None


def _config_for(weights, config):
    if config is not None:
        return resolve_config(config)
    cfg = config_from_checkpoint(weights) if isinstance(weights, (str, Path)) else None
    if cfg is None:
        raise ValueError(
            "no config given and the checkpoint carries none; pass a preset name "
            f"({sorted(PRESETS)}) or an official YAML file"
        )
    return cfg


def load(
    weights: str | Path | dict | None,
    config: str | Path | ATokenConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> ATokenModel:
    """An :class:`ATokenModel` from weights (path, state dict, or None = random) and a config.

    ``config`` is a preset name (``so-c``, ``so-d``, ``so-c-s1``, ``so-c-s2``, ``tiny-c``, ...),
    a path to an official YAML file, an :class:`ATokenConfig`, or None to use the config stored
    in a safetensors file's metadata. ``device="meta"`` builds a full-size model without
    allocating it.
    """
    cfg = _config_for(weights, config)
    if not isinstance(cfg, ATokenConfig):
        raise ValueError(
            f"config {config!r} describes a Gaussian decoder; use load_gaussian_decoder"
        )
    model = _build(ATokenModel, cfg, device, resolve_dtype(dtype), weights)
    return model.eval()


def load_gaussian_decoder(
    weights: str | Path | dict | None,
    config: str | Path | GSDecoderConfig | None = "gs",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> GaussianDecoder:
    """The 3D Gaussian decoder from weights and a config (preset ``gs``/``tiny-gs``, YAML, or
    None for the config in the file's metadata)."""
    cfg = _config_for(weights, config)
    if not isinstance(cfg, GSDecoderConfig):
        raise ValueError(f"config {config!r} is not a Gaussian decoder config")
    return _build(GaussianDecoder, cfg, device, resolve_dtype(dtype), weights).eval()


def save_checkpoint(module: nn.Module, path: str | Path, metadata: dict[str, str] | None = None):
    """Write ``module``'s state dict as safetensors in the official key format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path
