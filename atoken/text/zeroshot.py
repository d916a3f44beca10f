"""Zero-shot classification and retrieval with AToken's pooled features (§4).

The encoder's pooled feature ``[B, C]`` (L2-normalised) lives in the embedding space of a paired
text tower (`atoken.text.towers`). Scores follow SigLIP: ``logit = exp(logit_scale) * cos + logit_bias``
and ``p = sigmoid(logit)`` per label; `softmax_probs` gives the single-label view. Class names
become prompts through per-modality templates (ensembled: mean of unit embeddings, renormalised).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from atoken.core.patchify import to_model_range, tokenize, tokenize_3d
from atoken.core.sparse import SparseTensor, cat_sparse
from atoken.io.media import (
    IMAGE_EXTENSIONS,
    MESH_EXTENSIONS,
    VIDEO_EXTENSIONS,
    VOXEL_EXTENSIONS,
    iter_video_frames,
    probe_video,
    read_image,
    resize_max_side,
)
from atoken.text.towers import TextTower, load_text_tower

MAX_LABELS = 200
MAX_LABEL_CHARS = 200
MODALITIES = ("image", "video", "3d")
PROB_KINDS = ("sigmoid", "softmax")

# A handful of the CLIP / open_clip ImageNet prompt templates (the official release ships none,
# §4), plus video and 3D counterparts in the same style.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "image": (
        "a photo of a {}.",
        "a bad photo of a {}.",
        "a photo of many {}.",
        "a sculpture of a {}.",
        "a rendering of a {}.",
        "a cropped photo of the {}.",
        "a close-up photo of a {}.",
        "a bright photo of a {}.",
        "a photo of the large {}.",
        "a photo of the small {}.",
        "itap of a {}.",
        "art of the {}.",
    ),
    "video": (
        "a video of {}.",
        "a video of a {}.",
        "a clip of {}.",
        "a short video showing {}.",
        "footage of a {}.",
        "a frame from a video of a {}.",
    ),
    "3d": (
        "a 3D model of {}.",
        "a 3D model of a {}.",
        "a 3D render of a {}.",
        "a 3D object of a {}.",
        "a rendering of a {}.",
        "a 3D mesh of a {}.",
        "a 3D scan of a {}.",
    ),
}

ITEM_SUFFIXES = frozenset(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS | MESH_EXTENSIONS | VOXEL_EXTENSIONS)


# ---------------------------------------------------------------------------------------------
# Scoring


def _unit_pair(img: Tensor, txt: Tensor) -> tuple[Tensor, Tensor]:
    if img.dim() == 1:
        img = img[None]
    if img.dim() != 2 or txt.dim() != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(
            f"need item features [B, C] and text embeddings [K, C] with the same C, got "
            f"{tuple(img.shape)} and {tuple(txt.shape)}"
        )
    img = F.normalize(img.float(), dim=-1)
    txt = F.normalize(txt.to(img.device).float(), dim=-1)
    return img, txt


def cosine_logits(img: Tensor, txt: Tensor, logit_scale: float) -> Tensor:
    """``exp(logit_scale) * cos(img, txt)`` -> ``[B, K]`` (scale stored as a log, §4)."""
    img, txt = _unit_pair(img, txt)
    return math.exp(float(logit_scale)) * img @ txt.T


def sigmoid_probs(img: Tensor, txt: Tensor, logit_scale: float, logit_bias: float) -> Tensor:
    """SigLIP per-label probabilities ``sigmoid(exp(logit_scale) * cos + logit_bias)``, [B, K]."""
    return torch.sigmoid(cosine_logits(img, txt, logit_scale) + float(logit_bias))


def softmax_probs(img: Tensor, txt: Tensor, logit_scale: float) -> Tensor:
    """Single-label view: softmax over labels of ``exp(logit_scale) * cos`` ``[B, K]``."""
    return torch.softmax(cosine_logits(img, txt, logit_scale), dim=-1)


# ---------------------------------------------------------------------------------------------
# Labels and prompts


def parse_labels(
    text: str | Sequence[str],
    *,
    max_labels: int = MAX_LABELS,
    max_chars: int = MAX_LABEL_CHARS,
) -> list[str]:
    """Comma- or newline-separated class names -> a clean list (stripped, duplicates dropped)."""
    if isinstance(text, str):
        parts = text.replace("\r", "\n").replace("\n", ",").split(",")
    elif isinstance(text, Sequence):
        parts = []
        for t in text:
            if not isinstance(t, str):
                raise ValueError(f"labels must be strings, got {type(t).__name__}: {t!r}")
            parts.append(t)
    else:
        raise ValueError(f"labels must be a string or a list of strings, got {type(text).__name__}")
    labels = list(dict.fromkeys(" ".join(p.split()) for p in parts if p.strip()))
    if not labels:
        raise ValueError("no labels given: type class names separated by commas or new lines")
    if len(labels) > max_labels:
        raise ValueError(f"got {len(labels)} labels; at most {max_labels} are allowed")
    for label in labels:
        if len(label) > max_chars:
            raise ValueError(
                f"label {label[:40]!r}... is {len(label)} characters long; the limit is {max_chars}"
            )
    return labels


def _check_labels(labels: Sequence[str]) -> list[str]:
    if isinstance(labels, str):
        raise ValueError("labels must be a list; use parse_labels() to split a string")
    labels = list(labels)
    if not labels:
        raise ValueError("no labels given")
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"every label must be a non-empty string, got {label!r}")
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        raise ValueError(f"duplicate labels: {dup}")
    return labels


def templates_for(modality: str | None = None, templates: Sequence[str] | None = None) -> list[str]:
    """Prompt templates (each with one ``{}``) for a modality, or the caller's own."""
    if templates is None:
        modality = modality or "image"
        if modality not in TEMPLATES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {list(MODALITIES)}")
        return list(TEMPLATES[modality])
    if isinstance(templates, str):
        templates = [templates]
    templates = list(templates)
    if not templates:
        raise ValueError("templates must not be empty (use ['{}'] for the bare label)")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"each template needs exactly one '{{}}', got {t!r}")
    return templates


def label_embeddings(
    labels: Sequence[str],
    tower: TextTower,
    *,
    modality: str | None = None,
    templates: Sequence[str] | None = None,
    max_prompts: int | None = None,
) -> Tensor:
    """Template-ensembled label embeddings ``[K, D]``: mean of unit prompt vectors, renormalised.

    All prompts go through the tower in batches; its per-text cache makes repeated label sets
    cheap. ``max_prompts`` caps labels x templates by keeping only the first
    ``max(1, max_prompts // K)`` templates (the SigLIP2 text tower costs ~1.8 s a prompt on
    2 CPU cores).
    """
    labels = _check_labels(labels)
    temps = templates_for(modality, templates)
    if max_prompts is not None:
        if max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1, got {max_prompts}")
        temps = temps[: max(1, max_prompts // len(labels))]
    prompts = [t.format(label) for label in labels for t in temps]
    emb = tower.encode(prompts).reshape(len(labels), len(temps), -1)
    return F.normalize(emb.mean(1), dim=-1)


# ---------------------------------------------------------------------------------------------
# Items -> pooled features


def item_modality(item: Any) -> str:
    """Modality of an item: ``"image"``, ``"video"`` or ``"3d"``.

    Arrays: ``[H, W, 3]`` image, ``[T, H, W, 3]`` video; a ``(feats768, coords)`` pair is 3D; a
    SparseTensor is 3D when any z != 0 (images and videos have z = 0) and a video when t > 0.
    """
    if isinstance(item, SparseTensor):
        if item.coords.shape[1] == 5 and bool((item.coords[:, 4] != 0).any()):
            return "3d"
        return "video" if bool((item.coords[:, 1] > 0).any()) else "image"
    if isinstance(item, tuple) and len(item) == 2:
        return "3d"
    if isinstance(item, (np.ndarray, Tensor)):
        if item.ndim == 3:
            return "image"
        if item.ndim == 4:
            return "video" if item.shape[0] > 1 else "image"
    raise ValueError(
        "an item must be an image [H,W,3] or video [T,H,W,3] array in [-1, 1], a SparseTensor, "
        f"or a (feats768, coords) pair; got {type(item).__name__}"
    )


def _tokenize_group(items: list[Any]) -> SparseTensor:
    if isinstance(items[0], SparseTensor):
        return items[0] if len(items) == 1 else cat_sparse(items)
    if isinstance(items[0], tuple):
        return cat_sparse([tokenize_3d(f, c) for f, c in items])
    return tokenize(items)


def _model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype | None]:
    device, dtype = getattr(model, "device", None), getattr(model, "dtype", None)
    if isinstance(device, torch.device) and isinstance(dtype, torch.dtype):
        return device, dtype
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device, (p.dtype if p.is_floating_point() else None)
    return torch.device("cpu"), None


def encode_items(model: Any, items: Sequence[Any], *, batch_size: int = 8) -> Tensor:
    """Pooled, L2-normalised features ``[B, C]`` (float32, CPU) of mixed items.

    Items of one kind are batched together; 3D assets are never batched with images or videos,
    because the official temporal chunker re-bases t per batch (§1.4.2).
    """
    if isinstance(items, (np.ndarray, Tensor, SparseTensor)) or not items:
        raise ValueError("encode_items takes a non-empty list of items")
    device, dtype = _model_device_dtype(model)
    kinds = ["sparse" if isinstance(x, SparseTensor) else item_modality(x) for x in items]
    out: list[Tensor | None] = [None] * len(items)
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        # a SparseTensor may already hold several items; encode each one on its own
        step = 1 if kind == "sparse" else batch_size
        for s in range(0, len(idx), step):
            chunk = idx[s : s + step]
            x = _tokenize_group([items[i] for i in chunk]).to(device, dtype)
            with torch.inference_mode():
                pooled = model.encode(x).pooled
            pooled = F.normalize(pooled.float(), dim=-1).cpu()
            if kind == "sparse" and pooled.shape[0] != 1:
                raise ValueError(
                    f"a SparseTensor item must hold one batch item, got {pooled.shape[0]}"
                )
            assert pooled.shape[0] == len(chunk), (pooled.shape, len(chunk))
            for i, p in zip(chunk, pooled):
                out[i] = p
    return torch.stack(out)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Classification


def resolve_text_tower(model: Any, text_tower: TextTower | str | Path | None = None) -> TextTower:
    """The text tower to use: the caller's, or the one named by ``model.config.text_tower``."""
    if text_tower is None:
        text_tower = getattr(getattr(model, "config", None), "text_tower", None)
        if text_tower is None:
            raise ValueError(
                "this model names no paired text tower (config.text_tower is None); pass "
                "text_tower='siglip2', 'minilm' or a local directory"
            )
    return text_tower if isinstance(text_tower, TextTower) else load_text_tower(text_tower)


def model_logit_params(model: Any) -> tuple[float, float]:
    """(logit_scale, logit_bias) of a model, from the model or its config."""
    config = getattr(model, "config", None)
    scale = getattr(model, "logit_scale", None)
    bias = getattr(model, "logit_bias", None)
    scale = getattr(config, "logit_scale", None) if scale is None else scale
    bias = getattr(config, "logit_bias", None) if bias is None else bias
    if scale is None or bias is None:
        raise ValueError("the model has no logit_scale / logit_bias for zero-shot scoring")
    return float(scale), float(bias)


def _check_dims(features: Tensor, tower: TextTower) -> None:
    if features.shape[-1] != tower.dim:
        raise ValueError(
            f"text tower {tower.name!r} gives {tower.dim}-dim embeddings but the item features "
            f"are {features.shape[-1]}-dim; use the model's paired text tower"
        )


def label_logits(
    pooled: Tensor,
    labels: Sequence[str],
    tower: TextTower,
    logit_scale: float,
    logit_bias: float,
    modality: str | None = None,
    *,
    templates: Sequence[str] | None = None,
    max_prompts: int | None = None,
) -> Tensor:
    """SigLIP logits ``exp(logit_scale) * cos + logit_bias``, ``[B, K]``, for features ``[B, C]``.

    Rank with logits: float32 sigmoid probabilities saturate at 1 when cosines are high.
    """
    pooled = pooled[None] if pooled.dim() == 1 else pooled
    _check_dims(pooled, tower)
    txt = label_embeddings(
        labels, tower, modality=modality, templates=templates, max_prompts=max_prompts
    )
    return cosine_logits(pooled, txt, logit_scale) + float(logit_bias)


def logits_to_probs(logits: Tensor, logit_bias: float, kind: str = "sigmoid") -> Tensor:
    """``sigmoid(logits)`` per label, or the softmax over labels (the bias cancels there)."""
    if kind not in PROB_KINDS:
        raise ValueError(f"kind must be one of {list(PROB_KINDS)}, got {kind!r}")
    if kind == "softmax":
        return torch.softmax(logits - float(logit_bias), dim=-1)
    return torch.sigmoid(logits)


def label_probs(
    pooled: Tensor,
    labels: Sequence[str],
    tower: TextTower,
    logit_scale: float,
    logit_bias: float,
    modality: str | None = None,
    *,
    templates: Sequence[str] | None = None,
    max_prompts: int | None = None,
    kind: str = "sigmoid",
) -> Tensor:
    """Probabilities ``[B, K]`` of each label for each pooled feature ``[B, C]``."""
    if kind not in PROB_KINDS:
        raise ValueError(f"kind must be one of {list(PROB_KINDS)}, got {kind!r}")
    logits = label_logits(
        pooled,
        labels,
        tower,
        logit_scale,
        logit_bias,
        modality,
        templates=templates,
        max_prompts=max_prompts,
    )
    return logits_to_probs(logits, logit_bias, kind)


def classify_features(
    pooled: Tensor,
    labels: Sequence[str],
    tower: TextTower,
    logit_scale: float,
    logit_bias: float,
    modality: str | None = None,
    *,
    templates: Sequence[str] | None = None,
    max_prompts: int | None = None,
    kind: str = "sigmoid",
) -> dict[str, float]:
    """One item's pooled feature ``[C]`` or ``[1, C]`` -> {label: probability}, highest first."""
    if pooled.dim() == 2 and pooled.shape[0] != 1:
        raise ValueError(
            f"classify_features takes one item ([C] or [1, C]), got {tuple(pooled.shape)}; "
            "use label_probs for a batch"
        )
    if kind not in PROB_KINDS:
        raise ValueError(f"kind must be one of {list(PROB_KINDS)}, got {kind!r}")
    labels = _check_labels(labels)
    logits = label_logits(
        pooled,
        labels,
        tower,
        logit_scale,
        logit_bias,
        modality,
        templates=templates,
        max_prompts=max_prompts,
    )[0]
    probs = logits_to_probs(logits, logit_bias, kind)
    order = torch.argsort(logits, descending=True, stable=True).tolist()
    return {labels[i]: float(probs[i]) for i in order}


def classify(
    model: Any,
    item: Any,
    labels: Sequence[str] | str,
    *,
    text_tower: TextTower | str | Path | None = None,
    modality: str | None = None,
    templates: Sequence[str] | None = None,
    max_prompts: int | None = None,
    kind: str = "sigmoid",
) -> dict[str, float]:
    """Zero-shot classify one item -> {label: probability}, highest first.

    ``item``: image ``[H,W,3]`` / video ``[T,H,W,3]`` in [-1, 1], a one-item SparseTensor, or a
    3D ``(feats768 in [0, 1], coords [N, 3])`` pair. ``labels`` may be a comma/newline string.
    """
    labels = parse_labels(labels) if isinstance(labels, str) else _check_labels(labels)
    tower = resolve_text_tower(model, text_tower)
    modality = modality or item_modality(item)
    pooled = encode_items(model, [item])
    scale, bias = model_logit_params(model)
    return classify_features(
        pooled,
        labels,
        tower,
        scale,
        bias,
        modality,
        templates=templates,
        kind=kind,
        max_prompts=max_prompts,
    )


def classify_file(
    model: Any,
    path: str | Path,
    labels: Sequence[str] | str,
    **kwargs: Any,
) -> dict[str, float]:
    """Load an image / video / 3D file (`load_item`) and classify it (`classify` kwargs)."""
    item, modality = load_item(path)
    kwargs.setdefault("modality", modality)
    return classify(model, item, labels, **kwargs)


# ---------------------------------------------------------------------------------------------
# Retrieval


def _resolve_tower(text_tower: TextTower | str | Path) -> TextTower:
    return text_tower if isinstance(text_tower, TextTower) else load_text_tower(text_tower)


def rank_items(
    query_text: str, item_features: Tensor, text_tower: TextTower | str | Path
) -> tuple[Tensor, Tensor]:
    """Items ``[B, C]`` ranked by cosine similarity to a text query -> (order, sorted scores)."""
    if not isinstance(query_text, str) or not query_text.strip():
        raise ValueError("the query text is empty")
    tower = _resolve_tower(text_tower)
    feats = item_features[None] if item_features.dim() == 1 else item_features
    _check_dims(feats, tower)
    img, txt = _unit_pair(feats, tower.encode([query_text.strip()]))
    scores = (img @ txt.T)[:, 0].cpu()
    order = torch.argsort(scores, descending=True, stable=True)
    return order, scores[order]


def rank_texts(
    item_feature: Tensor, texts: Sequence[str], text_tower: TextTower | str | Path
) -> tuple[Tensor, Tensor]:
    """Texts ranked by cosine similarity to one item feature ``[C]`` -> (order, sorted scores)."""
    texts = _check_labels(texts)
    tower = _resolve_tower(text_tower)
    feat = item_feature[None] if item_feature.dim() == 1 else item_feature
    if feat.shape[0] != 1:
        raise ValueError(f"rank_texts takes one item feature, got {tuple(item_feature.shape)}")
    _check_dims(feat, tower)
    img, txt = _unit_pair(feat, tower.encode(texts))
    scores = (img @ txt.T)[0].cpu()
    order = torch.argsort(scores, descending=True, stable=True)
    return order, scores[order]


# ---------------------------------------------------------------------------------------------
# Files


def load_image(path: str | Path, *, max_side: int | None = 512) -> np.ndarray:
    """Image file -> float32 ``[H, W, 3]`` in [-1, 1] (`atoken.io.media.read_image`, with limits).

    Images larger than ``max_side`` are downscaled (aspect kept) so the token count stays small.
    """
    pixels = np.array(resize_max_side(read_image(path), max_side))  # writable for torch
    return to_model_range(pixels).numpy()


def load_video(path: str | Path, *, num_frames: int = 16, max_side: int | None = 512) -> np.ndarray:
    """Video file -> float32 ``[T, H, W, 3]`` in [-1, 1]: ``num_frames`` evenly spaced frames.

    Frames are streamed (`atoken.io.media.iter_video_frames`); only the chosen ones are kept.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    n = probe_video(path).num_frames
    wanted = set(np.linspace(0, n - 1, min(num_frames, n)).round().astype(int).tolist())
    last = max(wanted)
    frames = []
    for i, frame in enumerate(iter_video_frames(path, max_side=max_side)):
        if i in wanted:
            frames.append(frame)
        if i >= last:
            break
    if not frames:
        raise ValueError(f"could not decode frames from {str(path)!r}")
    return to_model_range(np.stack(frames)).numpy()


def load_voxels(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Packed 3D asset -> (feats ``[N, 768]`` in [0, 1], coords ``[N, 3]``).

    ``.safetensors`` / ``.npz`` with ``feats`` (or ``feats768``) and ``coords`` (or
    ``coords_xyz``), as written by the official multiview packing (§1.4.1). Mesh files are
    rendered and packed by ``atoken.threed.mesh_render.mesh_to_voxels``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in MESH_EXTENSIONS:
        from atoken.threed.mesh_render import (
            mesh_to_voxels,  # renders views: imported only when used
        )

        feats, coords = mesh_to_voxels(path)
        return np.asarray(feats, dtype=np.float32), np.asarray(coords)
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        data = load_file(str(path))
    elif suffix == ".npz":
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
    else:
        raise ValueError(f"{path.name}: not a packed 3D asset (.safetensors or .npz)")
    feats = data.get("feats", data.get("feats768"))
    coords = data.get("coords", data.get("coords_xyz"))
    if feats is None or coords is None:
        raise ValueError(
            f"{path.name} must hold 'feats' [N, 768] and 'coords' [N, 3]; found {sorted(data)}"
        )
    return np.asarray(feats, dtype=np.float32), np.asarray(coords)


def load_item(
    path: str | Path, *, max_side: int | None = 512, num_frames: int = 16
) -> tuple[Any, str]:
    """Load an image, video or 3D file -> (item for `classify`, modality)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return load_image(path, max_side=max_side), "image"
    if suffix in VIDEO_EXTENSIONS:
        return load_video(path, num_frames=num_frames, max_side=max_side), "video"
    if suffix in VOXEL_EXTENSIONS | MESH_EXTENSIONS:
        return load_voxels(path), "3d"
    raise ValueError(
        f"{path.name}: unsupported file type {suffix!r}; expected one of {sorted(ITEM_SUFFIXES)}"
    )


# ---------------------------------------------------------------------------------------------
# Evaluation


def read_labelled_items(source: str | Path) -> list[tuple[Path, str]]:
    """(path, label) pairs from a folder (one subfolder per class) or a CSV / JSON listing.

    CSV: rows ``path,label`` (a ``path,label`` header is optional). JSON: a list of
    ``{"path": ..., "label": ...}`` or ``[path, label]``, or a ``{path: label}`` mapping.
    Relative paths are taken from the listing's folder.
    """
    source = Path(source)
    if source.is_dir():
        pairs = []
        for sub in sorted(p for p in source.iterdir() if p.is_dir()):
            files = sorted(f for f in sub.rglob("*") if f.suffix.lower() in ITEM_SUFFIXES)
            pairs += [(f, sub.name) for f in files if f.is_file()]
        if not pairs:
            raise ValueError(f"{str(source)!r} has no class subfolders with readable items")
        return pairs
    if not source.is_file():
        raise ValueError(f"no such folder or listing: {str(source)!r}")
    root = source.parent
    raw: list[tuple[str, str]]
    if source.suffix.lower() == ".csv":
        with source.open(newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
            rows = rows[1:]
        bad = [r for r in rows if len(r) < 2]
        if bad:
            raise ValueError(f"{source.name}: every row needs path,label; got {bad[0]}")
        raw = [(r[0].strip(), r[1].strip()) for r in rows]
    elif source.suffix.lower() == ".json":
        data = json.loads(source.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            raw = [(str(k), str(v)) for k, v in data.items()]
        elif isinstance(data, list):
            raw = []
            for entry in data:
                if isinstance(entry, dict) and "path" in entry and "label" in entry:
                    raw.append((str(entry["path"]), str(entry["label"])))
                elif isinstance(entry, (list, tuple)) and len(entry) == 2:
                    raw.append((str(entry[0]), str(entry[1])))
                else:
                    raise ValueError(f"{source.name}: bad entry {entry!r}")
        else:
            raise ValueError(f"{source.name}: expected a list or a mapping")
    else:
        raise ValueError(f"{source.name}: a listing must be .csv or .json")
    if not raw:
        raise ValueError(f"{source.name} lists no items")
    pairs = []
    for p, label in raw:
        path = Path(p) if Path(p).is_absolute() else root / p
        if not label:
            raise ValueError(f"{source.name}: empty label for {p!r}")
        pairs.append((path, label))
    return pairs


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[K, K]`` int64: rows are true classes, columns predicted classes."""
    targets = np.asarray(targets, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (targets, predictions), 1)
    return m


@dataclass
class ZeroShotResult:
    """Outcome of `zero_shot_eval`."""

    accuracy: float
    top5_accuracy: float | None  # None with fewer than 6 labels
    labels: list[str]
    confusion: np.ndarray  # [K, K] counts, rows true, columns predicted
    paths: list[Path]
    targets: np.ndarray  # [N] label index
    predictions: np.ndarray  # [N] label index (argmax of the logits)
    logits: np.ndarray  # [N, K] SigLIP logits
    probs: np.ndarray  # [N, K] sigmoid probabilities

    def figure(self):
        """Plotly heatmap of the confusion matrix."""
        return confusion_figure(self.confusion, self.labels)


def zero_shot_eval(
    model: Any,
    source: str | Path,
    *,
    labels: Sequence[str] | None = None,
    text_tower: TextTower | str | Path | None = None,
    modality: str | None = None,
    templates: Sequence[str] | None = None,
    batch_size: int = 8,
    max_items: int | None = None,
    max_side: int | None = 512,
    num_frames: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> ZeroShotResult:
    """Zero-shot accuracy over labelled items (folder per class, or a CSV / JSON listing).

    The label set is ``labels`` (which must include every class present) or the sorted class
    names; underscores in names become spaces in the prompts. Items are classified by argmax
    of the logits, which neither logit scale nor bias changes.
    """
    pairs = read_labelled_items(source)
    if max_items is not None:
        pairs = pairs[:max_items]
    classes = sorted({label for _, label in pairs})
    names = _check_labels(list(labels)) if labels is not None else classes
    unknown = sorted(set(classes) - set(names))
    if unknown:
        raise ValueError(f"items carry labels missing from the label set: {unknown[:10]}")
    tower = resolve_text_tower(model, text_tower)
    index = {name: i for i, name in enumerate(names)}
    prompts = [n.replace("_", " ") for n in names]
    if len(set(prompts)) != len(prompts):
        prompts = names
    scale, bias = model_logit_params(model)
    logits = np.zeros((len(pairs), len(names)), dtype=np.float32)
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        loaded = [load_item(p, max_side=max_side, num_frames=num_frames) for p, _ in chunk]
        pooled = encode_items(model, [item for item, _ in loaded], batch_size=batch_size)
        mods = [modality or m for _, m in loaded]
        for m in dict.fromkeys(mods):
            rows = [i for i, x in enumerate(mods) if x == m]
            z = label_logits(pooled[rows], prompts, tower, scale, bias, m, templates=templates)
            logits[[s + i for i in rows]] = z.numpy()
        if progress is not None:
            progress(s + len(chunk), len(pairs))
    targets = np.array([index[label] for _, label in pairs], dtype=np.int64)
    predictions = logits.argmax(1)
    top5 = None
    if len(names) > 5:
        top = np.argsort(-logits, axis=1, kind="stable")[:, :5]
        top5 = float((top == targets[:, None]).any(1).mean())
    return ZeroShotResult(
        accuracy=float((predictions == targets).mean()),
        top5_accuracy=top5,
        labels=list(names),
        confusion=confusion_matrix(targets, predictions, len(names)),
        paths=[p for p, _ in pairs],
        targets=targets,
        predictions=predictions,
        logits=logits,
        probs=logits_to_probs(torch.from_numpy(logits), bias).numpy(),
    )


# ---------------------------------------------------------------------------------------------
# Figures for the app


def confusion_figure(matrix: np.ndarray, labels: Sequence[str]):
    """Plotly heatmap of a confusion matrix (rows true, columns predicted)."""
    import plotly.graph_objects as go

    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(labels):
        raise ValueError(f"need a [K, K] matrix for {len(labels)} labels, got {m.shape}")
    show_text = len(labels) <= 30
    fig = go.Figure(
        go.Heatmap(
            z=m,
            x=list(labels),
            y=list(labels),
            colorscale="Blues",
            text=m if show_text else None,
            texttemplate="%{text}" if show_text else None,
            hovertemplate="true %{y}<br>predicted %{x}<br>%{z}<extra></extra>",
        )
    )
    fig.update_layout(
        xaxis_title="predicted",
        yaxis_title="true",
        yaxis_autorange="reversed",
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
    )
    return fig


def probability_figure(probs: dict[str, float], *, top_k: int = 10):
    """Plotly horizontal bar chart of the ``top_k`` label probabilities, highest on top."""
    import plotly.graph_objects as go

    if not probs:
        raise ValueError("no probabilities to plot")
    items = sorted(probs.items(), key=lambda kv: -kv[1])[:top_k]
    labels = [k for k, _ in items][::-1]
    values = [v for _, v in items][::-1]
    fig = go.Figure(
        go.Bar(
            x=values,
            y=labels,
            orientation="h",
            text=[f"{v:.1%}" for v in values],
            textposition="auto",
        )
    )
    fig.update_layout(
        xaxis={"range": [0, 1], "title": "probability"},
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        height=max(200, 40 * len(labels) + 80),
    )
    return fig
