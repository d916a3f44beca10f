"""Which models the app runs: the bundled checkpoint, official weights, a path, or a random model.

The operator decides which models visitors may pick (:class:`Policy`: command-line flags and
environment); each visitor's choice is a key kept in that visitor's session (``gr.State``), so
one visitor never changes what another runs. Loaded models (autoencoders, their
continuous/discrete siblings, Gaussian decoders) sit in one bounded, memory-aware
:class:`ModelCache` keyed by name: never two copies of one model, least recently used ones
evicted when the next would not fit. Until the bundled ``assets/atoken-tiny.safetensors``
exists, the app starts on an untrained random model and its status line says so in bold.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.session import ServerBusy
from atoken.core.attention import attention_backend
from atoken.core.checkpoint import load, resolve_dtype
from atoken.core.gs_decoder import GaussianDecoder
from atoken.core.model import ATokenModel
from atoken.pipelines.reconstruct import reconstruct_image
from atoken.pretrained import registry
from atoken.pretrained.download import cached_path, download
from atoken.pretrained.hub import bundled_path, is_available, load_pretrained, load_pretrained_gs

RANDOM_C = registry.RANDOM_TINY  # untrained stand-ins (the model table's random entries)
RANDOM = registry.names(source="random", role="autoencoder")
CUSTOM = "custom"
FILE_PREFIX = "file:"  # keys of checkpoints in the operator's --weights-dir
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Policy:
    """What the operator lets visitors do; nothing a visitor sends is used as a path."""

    models: tuple[str, ...] | None = None  # keys visitors may pick (None: all available)
    allow_downloads: bool = False  # the panel's "download official weights" button
    weights_dir: Path | None = None  # checkpoints in this folder are offered by file name
    max_models: int = 4  # loaded models kept at once (autoencoders and Gaussian decoders)
    max_bytes: int | None = None  # their memory; None: 40% of RAM (CPU) or 70% of the GPU


@dataclass(frozen=True)
class Entry:
    """A model the panel can offer."""

    key: str
    label: str
    source: str  # "bundled", "official", "random" or "path"
    available: bool
    note: str


def weights_dir_files(folder: Path | None) -> dict[str, Path]:
    """Checkpoint files in the operator's weights folder by key (``file:NAME``)."""
    if folder is None or not folder.is_dir():
        return {}
    return {
        FILE_PREFIX + p.name: p
        for p in sorted(folder.iterdir())
        if p.suffix in CHECKPOINT_SUFFIXES and p.is_file()
    }


def entries(custom_path: str | None = None, weights_dir: Path | None = None) -> list[Entry]:
    """Every model the panel lists (the autoencoders of atoken.pretrained.registry, then the operator's
    files), with whether it can be loaded now."""
    out = []
    for key in registry.names(role="autoencoder"):
        spec = registry.MODELS[key]
        ok = is_available(key)
        if spec.source == "bundled":
            label = f"{key} (bundled)"
            note = (
                f"bundled with the app (assets/{spec.file})"
                if ok
                else f"missing: assets/{spec.file} is not in this installation"
            )
        elif spec.source == "official":
            label = f"{key} (official)"
            note = "official weights, in this server's cache" if ok else "not downloaded"
        else:
            label = f"{key} (untrained, random)"
            note = "untrained, random weights: shows how the app works, not what AToken does"
        out.append(Entry(key, label, spec.source, ok, note))
    if custom_path:
        out.append(Entry(CUSTOM, f"custom: {Path(custom_path).name}", "path", True, custom_path))
    for key, path in weights_dir_files(weights_dir).items():
        out.append(
            Entry(key, path.name, "path", True, f"{path.name} in the server's weights folder")
        )
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
    return registry.sibling(key, discrete)


def gs_key(key: str) -> str:
    """Name of the Gaussian decoder that pairs with a model (atoken.pretrained.registry's pairing); an
    untrained one for the operator's own files and when the bundled atoken-tiny-gs is missing."""
    name = registry.gaussian_decoder_for(key) or "random-tiny-gs"
    if registry.MODELS[name].source == "bundled" and not is_available(name):
        return "random-tiny-gs"
    return name


def build(
    key: str, device: str, dtype: torch.dtype, path: str | None = None, config: str | None = None
) -> ATokenModel:
    """Load one model by key (``custom`` and ``file:NAME`` use ``path``/``config``)."""
    if key == CUSTOM or key.startswith(FILE_PREFIX):
        if not path:
            raise ValueError("give a checkpoint path for the custom model")
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {Path(path).name}")
        return load(path, config or None, device=device, dtype=dtype)
    return load_pretrained(key, device=device, dtype=dtype)


def build_gs(key: str, device: str, dtype: torch.dtype) -> tuple[GaussianDecoder, str]:
    """The Gaussian decoder for a model key, and a note when it is untrained."""
    name = gs_key(key)
    dec = load_pretrained_gs(name, device=device, dtype=dtype)
    if registry.MODELS[name].source == "random":
        return dec, f"untrained random Gaussian decoder ({registry.MODELS[name].preset})"
    return dec, name


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def default_model_memory(device: str) -> int:
    """Bytes the model cache may hold: 70% of the GPU's memory, or 40% of the RAM."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(0.7 * torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return int(0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class ModelCache:
    """Loaded models by name, bounded in count and bytes; the least recently used go first.

    Loads are serialised under one lock, so one name is never loaded twice at once. A model
    evicted while a request still runs on it is freed when that request ends (with the app's
    default of one model call at a time, that never overlaps a load).
    """

    def __init__(self, max_models: int, max_bytes: int):
        if max_models < 1 or max_bytes < 1:
            raise ValueError(f"model cache needs room: {max_models} models, {max_bytes} bytes")
        self.max_models, self.max_bytes = max_models, max_bytes
        self.lock = threading.RLock()
        self._items: OrderedDict[str, tuple[torch.nn.Module, int]] = OrderedDict()

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        """Loaded names, least recently used first."""
        return list(self._items)

    @property
    def used_bytes(self) -> int:
        """Bytes of the loaded models."""
        return sum(size for _, size in self._items.values())

    def get(self, name: str, build: Callable[[], torch.nn.Module], estimate: int = 0):
        """The cached model ``name``, built (after making room for ``estimate`` bytes) if absent."""
        with self.lock:
            if name in self._items:
                self._items.move_to_end(name)
                return self._items[name][0]
            if estimate > self.max_bytes:
                raise ServerBusy(
                    f"model {name} needs about {estimate / 2**30:.1f} GB; this server keeps at "
                    f"most {self.max_bytes / 2**30:.1f} GB of models"
                )
            self._make_room(estimate, slots=1)
            module = build()
            self._items[name] = (module, module_bytes(module))
            self._make_room(0, slots=0, keep=name)
            return module

    def _make_room(self, extra: int, *, slots: int, keep: str | None = None) -> None:
        evicted = False
        while self._items:
            over_count = len(self._items) + slots > self.max_models
            over_bytes = self.used_bytes + extra > self.max_bytes
            if not (over_count or over_bytes):
                break
            victim = next((n for n in self._items if n != keep), None)
            if victim is None:
                break
            del self._items[victim]
            evicted = True
        if evicted:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


class ModelManager:
    """The models visitors may run, loaded on demand into one shared, bounded cache.

    ``key`` is the model new sessions start on; each session then names its own model
    (checked against :meth:`entries`) in every call. Device and dtype are the operator's.
    """

    def __init__(
        self,
        key: str | None = None,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        path: str | None = None,
        config: str | None = None,
        backend: str = "sdpa",
        policy: Policy | None = None,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was chosen but no CUDA GPU is visible")
        self.policy = policy or Policy()
        self.custom_path, self.custom_config = path, config
        self.device, self.dtype_name = device, dtype
        self.backend, self.backend_note = backend, ""
        self.cache = ModelCache(
            self.policy.max_models, self.policy.max_bytes or default_model_memory(device)
        )
        t0 = time.perf_counter()
        self.key = self.check(key or default_key(path))
        self.get(self.key)
        self.load_seconds = time.perf_counter() - t0

    # -- which models -------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """The models visitors may pick (the operator's list, plus the start model)."""
        allowed = self.policy.models
        out = []
        for e in entries(self.custom_path, self.policy.weights_dir):
            if e.source == "official" and not e.available and not self.policy.allow_downloads:
                continue  # visitors could pick it but never load it
            if allowed is None or e.key in allowed or e.key == getattr(self, "key", None):
                out.append(e)
        return out

    def check(self, key) -> str:
        """``key`` if visitors may run it now, else ValueError naming the choices."""
        by_key = {e.key: e for e in self.entries()}
        if not isinstance(key, str) or key not in by_key:
            names = ", ".join(by_key)
            raise ValueError(f"unknown model {str(key)[:60]!r}; this server offers: {names}")
        entry = by_key[key]
        if not entry.available:
            if entry.source == "official":
                raise FileNotFoundError(
                    f"official weights for {key} are not in this server's cache"
                    + (" (download them first)" if self.policy.allow_downloads else "")
                )
            raise FileNotFoundError(f"{key} is not available on this server ({entry.note})")
        return key

    def _path(self, key: str) -> str | None:
        if key == CUSTOM:
            return self.custom_path
        if key.startswith(FILE_PREFIX):
            path = weights_dir_files(self.policy.weights_dir).get(key)
            return None if path is None else str(path)
        return None

    def _estimate(self, key: str) -> int:
        """Bytes a model will take, from its file (0 when unknown)."""
        path = self._path(key)
        source = registry.MODELS[key].source if key in registry.MODELS else None
        if source == "bundled":
            path = bundled_path(key)
        elif source == "official":
            path = cached_path(key)
        try:
            size = Path(path).stat().st_size if path else 0
        except OSError:
            size = 0
        return size if self.dtype_name == "float32" else size // 2

    def get(self, key: str) -> ATokenModel:
        """The autoencoder ``key`` (loaded into the cache on first use)."""
        path, config = self._path(key), self.custom_config if key == CUSTOM else None
        dtype = resolve_dtype(self.dtype_name)
        return self.cache.get(
            key, lambda: build(key, self.device, dtype, path, config), self._estimate(key)
        )

    def preload(self) -> list[str]:
        """Load what the start model's tabs use (its sibling, Gaussian decoder, text tower), so
        the first visitors wait less and memory reaches its working size at start."""
        from atoken.text.zeroshot import resolve_text_tower

        loaded = []
        for discrete in (False, True):
            try:
                loaded.append(self.model_for(discrete)[2])
            except ValueError:  # no sibling of that kind
                continue
        loaded.append(self.gaussian_decoder()[1])
        try:
            resolve_text_tower(self.model)
            loaded.append(f"text tower {self.model.config.text_tower}")
        except (ValueError, ImportError, OSError):  # no tower here: zero-shot says so later
            pass
        return loaded

    def load(self, key: str) -> str:
        """Check and load a visitor's choice (their session only); returns its status line."""
        self.get(self.check(key))
        return self.status(key)

    @property
    def model(self) -> ATokenModel:
        """The start model (new sessions run it)."""
        return self.get(self.key)

    def is_random(self, key: str | None = None) -> bool:
        """True for an untrained model."""
        return (key or self.key) in RANDOM

    def model_for(self, discrete: bool, key: str | None = None) -> tuple[ATokenModel, str, str]:
        """(model, latent mode, note) for continuous or discrete tokens of a session's model.

        Uses the model itself when it already is of that kind, else its sibling (cached);
        an FSQ model without a continuous sibling decodes its unquantized mean.
        """
        key = key or self.key
        model = self.get(key)
        if model.is_discrete == discrete:
            return model, ("fsq" if discrete else "mean"), model.config.name or key
        other = sibling_key(key, discrete)
        if other is not None and self._loadable(other):
            return self.get(other), ("fsq" if discrete else "mean"), other
        if not discrete:
            return model, "mean", f"{key}: FSQ model decoding its unquantized mean"
        raise ValueError(
            f"{key} is continuous and has no discrete (FSQ) sibling available; load an FSQ "
            "model (so-d, atoken-tiny-d or random-tiny-d) in the model panel"
        )

    def gaussian_decoder(self, key: str | None = None) -> tuple[GaussianDecoder, str]:
        """The Gaussian decoder that pairs with a session's model (cached)."""
        key = key or self.key
        name = gs_key(key)
        dtype = resolve_dtype(self.dtype_name)
        if registry.MODELS[name].source == "random":
            note = f"untrained random Gaussian decoder ({registry.MODELS[name].preset})"
        else:
            note = name
        dec = self.cache.get(f"gaussians:{name}", lambda: build_gs(key, self.device, dtype)[0])
        return dec, note

    def _loadable(self, key: str) -> bool:
        return key in registry.MODELS and is_available(key)

    def tag(self, discrete: bool, key: str | None = None) -> str:
        """Identifies results: latents from one tag can be reused only under the same tag."""
        return f"{key or self.key}:{int(discrete)}"

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Attention backend of this manager for the calls inside the block."""
        with attention_backend(self.backend):
            yield

    # -- status ------------------------------------------------------------------------------
    def status(self, key: str | None = None) -> str:
        """A session's 'which model is running' line (markdown), loud for untrained models."""
        key = key or self.key
        m = self.get(key)
        params = sum(p.numel() for p in m.parameters()) / 1e6
        kind = "discrete FSQ" if m.is_discrete else "continuous KL"
        where = f"{self.device}, {self.dtype_name}, attention {self.backend}{self.backend_note}"
        line = f"**Running:** `{key}` ({kind}, {params:.1f} M parameters) on {where}"
        if self.is_random(key):
            return (
                f"### ⚠️ UNTRAINED MODEL: `{key}` has random weights\n"
                "Reconstructions, latents and labels below are noise: they show how the app "
                "works, not what AToken does. Pick the bundled `atoken-tiny` (or official "
                "weights) in the model panel.\n\n" + line
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
    official = registry.names(source="official")
    if key not in official:
        raise ValueError(f"{key!r} is not an official checkpoint; choose one of {official}")
    return download(key, progress=False, callback=callback)
