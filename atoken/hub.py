"""Models by name: the bundled checkpoints (``assets/`` of a checkout, ``atoken/_bundled/`` of an
installed wheel) and the official weights in the cache."""

from __future__ import annotations

from pathlib import Path

import torch

from atoken.checkpoint import load, load_gaussian_decoder
from atoken.download import OFFICIAL_WEIGHTS, cache_dir, cached_path, download
from atoken.gs_decoder import GaussianDecoder
from atoken.model import ATokenModel


def _assets_dir() -> Path:
    """Where the bundled checkpoints are: ``assets/`` of a checkout, else the installed package's
    ``atoken/_bundled/`` (the wheel maps ``assets/``'s checkpoints there, see pyproject.toml)."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "assets"
    if (checkout / "atoken-tiny.safetensors").is_file() and (
        here.parent / "pyproject.toml"
    ).is_file():
        return checkout
    return here / "_bundled"


ASSETS = _assets_dir()
# Our own checkpoints (trained with atoken.training; the config lives in the file's metadata).
BUNDLED: dict[str, str] = {
    "atoken-tiny": "atoken-tiny.safetensors",
    "atoken-tiny-d": "atoken-tiny-d.safetensors",
    "atoken-tiny-gs": "atoken-tiny-gs.safetensors",
}
MODEL_NAMES = [*BUNDLED, *OFFICIAL_WEIGHTS]


def bundled_path(name: str) -> Path | None:
    """Path of a bundled checkpoint if the file exists."""
    path = ASSETS / BUNDLED[name]
    return path if path.is_file() else None


def locate(
    name: str, *, download_missing: bool = False, progress: bool = True, callback=None
) -> Path:
    """Local file of a named model; downloads official weights only when asked."""
    if name in BUNDLED:
        path = bundled_path(name)
        if path is None:
            raise FileNotFoundError(f"bundled checkpoint {BUNDLED[name]} is missing from {ASSETS}")
        return path
    if name not in OFFICIAL_WEIGHTS:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    path = cached_path(name)
    if path is not None:
        return path
    if not download_missing:
        raise FileNotFoundError(
            f"official weights {OFFICIAL_WEIGHTS[name].filename} are not in the cache "
            f"{cache_dir()}; call load_pretrained({name!r}, download=True), run "
            f"`python -m atoken download {name}`, or pass --weights PATH "
            f"(licence: {OFFICIAL_WEIGHTS[name].licence})"
        )
    return download(name, progress=progress, callback=callback)


def load_pretrained(
    name: str,
    download: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> ATokenModel | GaussianDecoder:
    """A model by name: ``so-c``, ``so-d``, ``so-c-s1``, ``so-c-s2``, ``gs`` (official, from the
    cache or downloaded when ``download=True``) or a bundled ``atoken-tiny*`` checkpoint."""
    path = locate(name, download_missing=download)
    if name == "gs" or name.endswith("-gs"):
        config = OFFICIAL_WEIGHTS[name].preset if name in OFFICIAL_WEIGHTS else None
        return load_gaussian_decoder(path, config, device=device, dtype=dtype)
    config = OFFICIAL_WEIGHTS[name].preset if name in OFFICIAL_WEIGHTS else None
    return load(path, config, device=device, dtype=dtype)


def available_models() -> dict[str, str]:
    """Every known name with where it would load from (or why it cannot)."""
    out = {}
    for name in BUNDLED:
        p = bundled_path(name)
        out[name] = str(p) if p else "missing from assets/"
    for name, info in OFFICIAL_WEIGHTS.items():
        p = cached_path(name)
        out[name] = str(p) if p else f"not downloaded ({info.filename})"
    return out
