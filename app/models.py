"""Which model the app runs: the bundled checkpoint, official weights, a path, or a random model.

One :class:`ModelManager` holds the running autoencoder (plus its continuous/discrete sibling
and the Gaussian decoder, loaded on first use) for every session. Until the bundled
``assets/atoken-tiny.safetensors`` exists, the app starts on an untrained random model and its
status line says so in bold.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from atoken.attention import attention_backend
from atoken.checkpoint import load, load_gaussian_decoder, resolve_dtype
from atoken.config import ATokenConfig, decoder_trunk, encoder_trunk
from atoken.download import OFFICIAL_WEIGHTS, cached_path, download
from atoken.gs_decoder import GaussianDecoder
from atoken.hub import BUNDLED, bundled_path, load_pretrained
from atoken.model import ATokenModel
from atoken.pipeline import reconstruct_image

# Untrained stand-ins shaped like a small AToken whose pooled feature (384 dims) pairs with the
# MiniLM text tower, so every tab runs end to end before the bundled checkpoint lands.
RANDOM_C = ATokenConfig(
    encoder=encoder_trunk(384, 2, 6, 768),
    decoder=decoder_trunk(128, 2, 4, 256),
    latent_channels=16,
    text_tower="minilm",
    name="random-tiny",
)
RANDOM_D = replace(RANDOM_C, latent_channels=48, use_quantizer=True, name="random-tiny-d")
RANDOM = {"random-tiny": RANDOM_C, "random-tiny-d": RANDOM_D}
CUSTOM = "custom"
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Entry:
    """A model the panel can offer."""

    key: str
    label: str
    source: str  # "bundled", "official", "random" or "path"
    available: bool
    note: str


def entries(custom_path: str | None = None) -> list[Entry]:
    """Every model the panel lists, with whether it can be loaded now."""
    out = []
    for key in BUNDLED:
        if key.endswith("-gs"):
            continue
        path = bundled_path(key)
        out.append(
            Entry(
                key,
                f"{key} (bundled)",
                "bundled",
                path is not None,
                str(path) if path else f"missing: assets/{BUNDLED[key]}",
            )
        )
    for key, info in OFFICIAL_WEIGHTS.items():
        if key == "gs":
            continue
        path = cached_path(key)
        note = str(path) if path else f"not downloaded; licence: {info.licence}"
        out.append(Entry(key, f"{key} (official)", "official", path is not None, note))
    for key in RANDOM:
        out.append(Entry(key, f"{key} (untrained, random)", "random", True, "random weights"))
    if custom_path:
        out.append(Entry(CUSTOM, f"custom: {Path(custom_path).name}", "path", True, custom_path))
    return out


def default_key(custom_path: str | None = None) -> str:
    """The model the app starts on: a given path, else the bundled checkpoint, else random."""
    if custom_path:
        return CUSTOM
    if bundled_path("atoken-tiny") is not None:
        return "atoken-tiny"
    return "random-tiny"


def sibling_key(key: str, discrete: bool) -> str | None:
    """The continuous or discrete counterpart of a model, if the family has one."""
    families = [("atoken-tiny", "atoken-tiny-d"), ("random-tiny", "random-tiny-d")]
    families += [(c, "so-d") for c in ("so-c", "so-c-s1", "so-c-s2")]
    for c, d in families:
        if key in (c, d):
            return d if discrete else ("so-c" if key == "so-d" else c)
    return None


def gs_key(key: str) -> str:
    """Name of the Gaussian decoder that pairs with a model."""
    if key.startswith("atoken-tiny"):
        return "atoken-tiny-gs"
    if key in OFFICIAL_WEIGHTS:
        return "gs"
    return "random-tiny-gs"


def _random_model(key: str, device: str, dtype: torch.dtype) -> ATokenModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load(None, RANDOM[key], device=device, dtype=dtype)


def build(
    key: str, device: str, dtype: torch.dtype, path: str | None = None, config: str | None = None
) -> ATokenModel:
    """Load one model by key (``custom`` uses ``path``/``config``)."""
    if key in RANDOM:
        return _random_model(key, device, dtype)
    if key == CUSTOM:
        if not path:
            raise ValueError("give a checkpoint path for the custom model")
        return load(path, config or None, device=device, dtype=dtype)
    model = load_pretrained(key, device=device, dtype=dtype)
    assert isinstance(model, ATokenModel)
    return model


def build_gs(key: str, device: str, dtype: torch.dtype) -> tuple[GaussianDecoder, str]:
    """The Gaussian decoder for a model key, and a note when it is untrained."""
    name = gs_key(key)
    if name == "atoken-tiny-gs" and bundled_path(name) is None:
        name = "random-tiny-gs"
    if name == "random-tiny-gs":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            dec = load_gaussian_decoder(None, "tiny-gs", device=device, dtype=dtype)
        return dec, "untrained random Gaussian decoder (tiny-gs)"
    dec = load_pretrained(name, device=device, dtype=dtype)
    assert isinstance(dec, GaussianDecoder)
    return dec, name


class ModelManager:
    """The running model (shared by all sessions), its siblings and settings."""

    def __init__(
        self,
        key: str | None = None,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        path: str | None = None,
        config: str | None = None,
        backend: str = "sdpa",
    ):
        self.lock = threading.RLock()
        self.custom_path, self.custom_config = path, config
        self.backend = backend
        self.backend_note = ""
        self.load(key or default_key(path), device=device, dtype=dtype)

    # -- loading ---------------------------------------------------------------------------
    def load(
        self,
        key: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        path: str | None = None,
        config: str | None = None,
    ) -> str:
        """Switch every session to another model; returns the new status line."""
        device = device or self.device
        dtype = dtype or self.dtype_name
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was chosen but no CUDA GPU is visible")
        if path:
            self.custom_path, self.custom_config = path, config
            key = CUSTOM
        t0 = time.perf_counter()
        model = build(key, device, resolve_dtype(dtype), self.custom_path, self.custom_config)
        with self.lock:
            self.key, self.model = key, model
            self.device, self.dtype_name = device, dtype
            self.siblings: dict[bool, ATokenModel] = {model.is_discrete: model}
            self.gs: tuple[GaussianDecoder, str] | None = None
            self.load_seconds = time.perf_counter() - t0
            self.generation = getattr(self, "generation", 0) + 1
        return self.status()

    @property
    def is_random(self) -> bool:
        """True while an untrained model runs."""
        return self.key in RANDOM

    def model_for(self, discrete: bool) -> tuple[ATokenModel, str, str]:
        """(model, latent mode, note) for continuous or discrete tokens.

        Uses the running model when it already is of that kind, else its sibling (loaded once);
        an FSQ model without a continuous sibling decodes its unquantized mean.
        """
        with self.lock:
            if discrete in self.siblings:
                model = self.siblings[discrete]
                return model, ("fsq" if discrete else "mean"), self._name(model)
            other = sibling_key(self.key, discrete)
            if other is not None and self._loadable(other):
                model = build(other, self.device, resolve_dtype(self.dtype_name))
                self.siblings[discrete] = model
                return model, ("fsq" if discrete else "mean"), other
            if not discrete:
                note = f"{self.key}: FSQ model decoding its unquantized mean"
                return self.model, "mean", note
        raise ValueError(
            f"{self.key} is continuous and has no discrete (FSQ) sibling available; load an FSQ "
            "model (so-d, atoken-tiny-d or random-tiny-d) in the model panel"
        )

    def gaussian_decoder(self) -> tuple[GaussianDecoder, str]:
        """The Gaussian decoder that pairs with the running model (loaded on first use)."""
        with self.lock:
            if self.gs is None:
                self.gs = build_gs(self.key, self.device, resolve_dtype(self.dtype_name))
            return self.gs

    def _loadable(self, key: str) -> bool:
        if key in RANDOM:
            return True
        if key in BUNDLED:
            return bundled_path(key) is not None
        return key in OFFICIAL_WEIGHTS and cached_path(key) is not None

    def _name(self, model: ATokenModel) -> str:
        return model.config.name or self.key

    def tag(self, discrete: bool) -> str:
        """Identifies results: latents from one tag can be reused only under the same tag."""
        return f"{self.generation}:{self.key}:{int(discrete)}"

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Attention backend of this manager for the calls inside the block."""
        with attention_backend(self.backend):
            yield

    # -- status ------------------------------------------------------------------------------
    def status(self) -> str:
        """The 'which model is running' line (markdown), loud for untrained models."""
        m = self.model
        params = sum(p.numel() for p in m.parameters()) / 1e6
        kind = "discrete FSQ" if m.is_discrete else "continuous KL"
        where = f"{self.device}, {self.dtype_name}, attention {self.backend}{self.backend_note}"
        line = f"**Running:** `{self.key}` ({kind}, {params:.1f} M parameters) on {where}"
        if self.is_random:
            return (
                f"### ⚠️ UNTRAINED MODEL: `{self.key}` has random weights\n"
                "The bundled checkpoint `assets/atoken-tiny.safetensors` is not there yet, so "
                "reconstructions, latents and labels below are noise. They show how the app "
                "works, not what AToken does. Load official or bundled weights in the panel.\n\n"
                + line
            )
        return line

    # -- compiled attention ------------------------------------------------------------------
    def warm_up(self, progress: Callable[[int, int, str], None] | None = None) -> str:
        """Compile the attention for two image sizes; fall back to SDPA on any failure."""
        sizes = [(64, 64), (48, 80)]
        t0 = time.perf_counter()
        try:
            with attention_backend("compiled"):
                for i, (h, w) in enumerate(sizes):
                    if progress:
                        progress(i, len(sizes), f"compiling attention for {w}x{h}")
                    reconstruct_image(self.model, np.full((h, w, 3), 128, np.uint8))
        except Exception as e:  # noqa: BLE001 - any compiler failure means "use SDPA"
            self.backend = "sdpa"
            self.backend_note = f" (compile failed: {type(e).__name__}; using SDPA)"
            return self.backend_note
        if progress:
            progress(len(sizes), len(sizes), "compiled")
        self.backend = "compiled"
        self.backend_note = f" (warmed up in {time.perf_counter() - t0:.1f} s)"
        return self.backend_note


def download_official(key: str, callback: Callable[[int, int | None], None] | None = None) -> Path:
    """Fetch official weights into the cache (resumable, verified)."""
    if key not in OFFICIAL_WEIGHTS:
        raise ValueError(
            f"{key!r} is not an official checkpoint; choose one of {list(OFFICIAL_WEIGHTS)}"
        )
    return download(key, progress=False, callback=callback)
