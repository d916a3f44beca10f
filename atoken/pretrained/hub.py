"""Models by name: the bundled checkpoints (``assets/`` of a checkout, ``atoken/_bundled/`` of an
installed wheel), the official weights in the cache, and the untrained random stand-ins. Which
names exist and what goes with what is :mod:`atoken.pretrained.registry`'s table."""

from __future__ import annotations

from pathlib import Path

import torch

from atoken.core.checkpoint import load, load_gaussian_decoder
from atoken.core.gs_decoder import GaussianDecoder
from atoken.core.model import ATokenModel
from atoken.pretrained import registry
from atoken.pretrained.download import cache_dir, cached_path, download


def _assets_dir() -> Path:
    """Where the bundled checkpoints are: ``assets/`` of a checkout, else the installed package's
    ``atoken/_bundled/`` (the wheel maps ``assets/``'s checkpoints there, see pyproject.toml)."""
    here = Path(__file__).resolve().parents[1]  # the atoken package
    checkout = here.parent / "assets"
    if (checkout / "atoken-tiny.safetensors").is_file() and (
        here.parent / "pyproject.toml"
    ).is_file():
        return checkout
    return here / "_bundled"


ASSETS = _assets_dir()
# Our own checkpoints by name -> file in ASSETS (config in the file's metadata).
BUNDLED: dict[str, str] = {n: registry.MODELS[n].file for n in registry.names(source="bundled")}
MODEL_NAMES = list(registry.PRETRAINED)


def bundled_path(name: str) -> Path | None:
    """Path of a bundled checkpoint if the file exists."""
    path = ASSETS / BUNDLED[name]
    return path if path.is_file() else None


def locate(
    name: str, *, download_missing: bool = False, progress: bool = True, callback=None
) -> Path:
    """Local file of a named model; downloads official weights only when asked."""
    spec = registry.spec(name)
    if spec.source == "bundled":
        path = bundled_path(name)
        if path is None:
            raise FileNotFoundError(f"bundled checkpoint {spec.file} is missing from {ASSETS}")
        return path
    if spec.source != "official":
        raise ValueError(f"{name} is an untrained random model with no file; use build({name!r})")
    path = cached_path(name)
    if path is not None:
        return path
    if not download_missing:
        raise FileNotFoundError(
            f"official weights {spec.file} are not in the cache {cache_dir()}; call "
            f"load_pretrained({name!r}, download=True), run `python -m atoken download {name}`, "
            f"or pass --weights PATH (licence: {spec.licence})"
        )
    return download(name, progress=progress, callback=callback)


def is_available(name: str) -> bool:
    """True when a named model can be loaded now without a download."""
    spec = registry.spec(name)
    if spec.source == "random":
        return True
    if spec.source == "bundled":
        return bundled_path(name) is not None
    return cached_path(name) is not None


LOADERS = {
    "autoencoder": "atoken.load_pretrained",
    "gaussian-decoder": "atoken.load_pretrained_gs",
    "generator": "atoken.pipelines.flow.load_generator",
}


def _expect(name: str, role: str) -> registry.ModelSpec:
    spec = registry.spec(name)
    if spec.role != role:
        raise ValueError(f"{name} is a {spec.role}; load it with {LOADERS[spec.role]}({name!r})")
    return spec


def _random(spec: registry.ModelSpec, device, dtype):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(registry.RANDOM_SEED)
        if spec.role == "gaussian-decoder":
            return load_gaussian_decoder(None, spec.preset, device=device, dtype=dtype)
        return load(None, spec.preset, device=device, dtype=dtype)


def load_pretrained(
    name: str,
    download: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> ATokenModel:
    """An autoencoder by name: ``so-c``, ``so-d``, ``so-c-s1``, ``so-c-s2`` (official, from the
    cache or downloaded when ``download=True``), the bundled ``atoken-tiny`` / ``atoken-tiny-d``,
    or an untrained ``random-tiny`` / ``random-tiny-d`` (fixed seed)."""
    spec = _expect(name, "autoencoder")
    if spec.source == "random":
        return _random(spec, device, dtype)
    return load(locate(name, download_missing=download), spec.preset, device=device, dtype=dtype)


def load_pretrained_gs(
    name: str,
    download: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> GaussianDecoder:
    """A 3D Gaussian decoder by its own name (``gs``, ``atoken-tiny-gs``, ``random-tiny-gs``) or
    by the name of the autoencoder it pairs with (``so-c`` gives ``gs``)."""
    spec = registry.spec(name)
    if spec.role == "generator":
        _expect(name, "gaussian-decoder")
    if spec.role == "autoencoder":
        if spec.gaussian_decoder is None:
            raise ValueError(f"{name} has no Gaussian decoder")
        spec = registry.spec(spec.gaussian_decoder)
    if spec.source == "random":
        return _random(spec, device, dtype)
    path = locate(spec.name, download_missing=download)
    return load_gaussian_decoder(path, spec.preset, device=device, dtype=dtype)


def available_models() -> dict[str, str]:
    """Every named model with a file, with where it would load from (or why it cannot)."""
    out = {}
    for name in registry.PRETRAINED:
        spec = registry.MODELS[name]
        if spec.source == "bundled":
            p = bundled_path(name)
            out[name] = str(p) if p else "missing from assets/"
        else:
            p = cached_path(name)
            out[name] = str(p) if p else f"not downloaded ({spec.file})"
    return out
