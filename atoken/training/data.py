"""Training data: images, videos and 3D assets as token samples, mixed and batched by tokens.

A *source* draws `Sample`s (the tokens of one item plus its kind and optional caption) from a
``numpy.random.Generator``; `MixtureStream` picks sources by weight, and `TokenBudgetBatcher`
packs consecutive samples of any modality into `Batch`es of at most ``token_budget`` tokens
(variable-size sparse items, as in §3.5). Each data-parallel rank owns its own generator
(seeded with ``(seed, rank)``), so ranks see different data without a sampler.

Sources:

* `ImageFolderSource`: image files, random rescale / crop / flip; captions from sidecars.
* `VideoFolderSource`: video files decoded a clip at a time (only the frames a clip needs).
* `VoxelFolderSource`: packed 3D voxel features (``feats [M, 768]`` in [0, 1] + ``coords
  [M, 3]`` in ``.safetensors`` / ``.npz``, the multiview packer's output) or meshes (packed
  once); each draw keeps a random subset of at most ``max_tokens`` voxels.
* `ArraySource`: in-memory photos (e.g. scikit-image's) with the same augmentation.
* `WorldSource` / `TextureSource`: the generated world of `atoken.training.world`.
* `SyntheticSource`: small random items for tests.

Captions: a ``<stem>.txt`` next to a file, or ``captions.json`` (``{relative path: caption}``)
/ ``captions.csv`` (``path,caption`` rows) in the folder root; items without one get None.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from atoken.core.patchify import PATCH, TOKEN_CHANNELS, patchify, prepare_clip, tokenize_3d
from atoken.core.sparse import SparseTensor
from atoken.io.media import (  # noqa: F401 - the readers, also used as data.<name>
    IMAGE_EXTENSIONS,
    MESH_FORMATS,
    VIDEO_EXTENSIONS,
    VOXEL_EXTENSIONS,
    count_frames,
    read_frames,
    read_image,
)
from atoken.text.zeroshot import load_voxels
from atoken.training import world

KINDS = ("image", "video", "3d")
MAX_COORD = 4095  # official 12-bit coordinate packing


@dataclass
class Sample:
    """Tokens of one item: ``feats [n, 3072]`` in [-1, 1], ``coords [n, 4]`` int32 (t, x, y, z)."""

    kind: str
    feats: Tensor
    coords: Tensor
    caption: str | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.feats.dim() != 2 or self.feats.shape[1] != TOKEN_CHANNELS:
            raise ValueError(f"feats must be [n, {TOKEN_CHANNELS}], got {tuple(self.feats.shape)}")
        if self.coords.shape != (self.feats.shape[0], 4):
            raise ValueError(
                f"coords must be [n, 4] (t, x, y, z) matching feats, got {tuple(self.coords.shape)}"
            )
        if self.feats.shape[0] == 0:
            raise ValueError("a sample needs at least one token")

    @property
    def num_tokens(self) -> int:
        """Number of tokens."""
        return self.feats.shape[0]


@dataclass
class Batch:
    """Samples packed into one SparseTensor (``b`` = position in the batch)."""

    tokens: SparseTensor
    kinds: list[str]
    captions: list[str | None]
    sources: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Number of items."""
        return len(self.kinds)

    def slices(self) -> list[slice]:
        """Row range of each item."""
        return self.tokens.item_slices()


def collate(samples: Sequence[Sample]) -> Batch:
    """Concatenate samples into a `Batch` (rows of an item stay contiguous)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    feats, coords = [], []
    for b, s in enumerate(samples):
        c = torch.empty(s.num_tokens, 5, dtype=torch.int32)
        c[:, 0] = b
        c[:, 1:] = s.coords
        feats.append(s.feats)
        coords.append(c)
    return Batch(
        SparseTensor(torch.cat(feats), torch.cat(coords)),
        [s.kind for s in samples],
        [s.caption for s in samples],
        [s.source for s in samples],
    )


# ---------------------------------------------------------------------------------------------
# Items -> samples


def _float_pixels(pixels: np.ndarray | Tensor) -> Tensor:
    """uint8 (0..255) or float ([-1, 1]) pixels -> float32 tensor in [-1, 1]."""
    t = pixels if isinstance(pixels, Tensor) else torch.from_numpy(np.array(pixels))
    if t.dtype == torch.uint8:
        return t.float() / 127.5 - 1.0
    if not t.is_floating_point():
        raise ValueError(f"pixels must be uint8 or float in [-1, 1], got {t.dtype}")
    return t.float()


def image_sample(pixels, caption: str | None = None, source: str = "") -> Sample:
    """An image ``[H, W, 3]`` (uint8 or [-1, 1] floats) -> a `Sample` (official crop rules)."""
    x = _float_pixels(pixels)
    if x.dim() != 3 or x.shape[-1] != 3:
        raise ValueError(f"an image must be [H, W, 3], got {tuple(x.shape)}")
    return _clip_sample("image", x, caption, source)


def video_sample(frames, caption: str | None = None, source: str = "") -> Sample:
    """A video ``[T, H, W, 3]`` -> a `Sample` (T truncated to a multiple of 4, padded if < 4)."""
    x = _float_pixels(frames)
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"a video must be [T, H, W, 3], got {tuple(x.shape)}")
    return _clip_sample("video", x, caption, source)


def _clip_sample(kind: str, x: Tensor, caption: str | None, source: str) -> Sample:
    feats, grid = patchify(prepare_clip(x, PATCH), PATCH)
    coords = torch.zeros(grid.shape[0], 4, dtype=torch.int32)
    coords[:, :3] = grid
    if int(coords.max()) > MAX_COORD:
        raise ValueError(f"item too large: coordinates exceed {MAX_COORD}")
    return Sample(kind, feats.float().contiguous(), coords, caption, source)


def subsample_voxels(
    feats: Tensor, coords: Tensor, max_tokens: int | None, rng: np.random.Generator | None
) -> tuple[Tensor, Tensor]:
    """Keep a random subset of at most ``max_tokens`` voxels, in their original order."""
    n = feats.shape[0]
    if max_tokens is None or n <= max_tokens:
        return feats, coords
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    rng = rng or np.random.default_rng(0)
    keep = np.sort(rng.choice(n, size=max_tokens, replace=False))
    idx = torch.from_numpy(keep)
    return feats[idx], coords[idx]


def voxel_sample(
    feats768,
    coords_xyz,
    caption: str | None = None,
    source: str = "",
    *,
    max_tokens: int | None = None,
    rng: np.random.Generator | None = None,
) -> Sample:
    """A packed 3D asset (``[M, 768]`` in [0, 1], ``[M, 3]``) -> a `Sample` (t = 1 as officially).

    ``max_tokens`` keeps a random subset of the voxels: a 64^3 asset has ~10-20k occupied voxels,
    too many for full attention in a CPU training step.
    """
    f = (
        torch.as_tensor(np.asarray(feats768, dtype=np.float32))
        if not isinstance(feats768, Tensor)
        else feats768.float()
    )
    c = (
        torch.as_tensor(np.asarray(coords_xyz))
        if not isinstance(coords_xyz, Tensor)
        else coords_xyz
    )
    f, c = subsample_voxels(f, c, max_tokens, rng)
    tok = tokenize_3d(f, c)
    return Sample("3d", tok.feats.contiguous(), tok.coords[:, 1:].contiguous(), caption, source)


# ---------------------------------------------------------------------------------------------
# Augmentation


@dataclass(frozen=True)
class CropPolicy:
    """Random rescale + crop + flip of images and video frames.

    Crop sides are multiples of 16 in ``[min_side, max_side]``; the item is first scaled by a
    random factor in ``[min_scale, max_scale]`` of the largest scale that still fits
    ``max_side`` (and up if it would be smaller than the crop).
    """

    min_side: int = 64
    max_side: int = 256
    min_scale: float = 0.25
    max_scale: float = 1.0
    flip: bool = True
    square: bool = False

    def __post_init__(self) -> None:
        if self.min_side < 16 or self.min_side % 16 or self.max_side % 16:
            raise ValueError(
                f"crop sides must be multiples of 16 and >= 16, got {self.min_side}..{self.max_side}"
            )
        if self.max_side < self.min_side:
            raise ValueError(f"max_side {self.max_side} < min_side {self.min_side}")
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(
                f"need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}"
            )

    def draw(self, rng: np.random.Generator, height: int, width: int) -> dict[str, Any]:
        """Random parameters for an item of ``height x width``: scaled size, crop box, flip."""
        sides = np.arange(self.min_side, self.max_side + 1, 16)
        ch = int(rng.choice(sides))
        cw = ch if self.square else int(rng.choice(sides))
        # Largest scale keeps the whole item within max_side; sample below it (more context).
        s_full = min(1.0, self.max_side / max(height, width))
        s = s_full * float(rng.uniform(self.min_scale, self.max_scale))
        s = max(s, ch / height, cw / width)  # never smaller than the crop
        sh, sw = max(ch, round(height * s)), max(cw, round(width * s))
        top = int(rng.integers(sh - ch + 1))
        left = int(rng.integers(sw - cw + 1))
        return {
            "size": (sh, sw),
            "box": (top, left, ch, cw),
            "flip": bool(self.flip and rng.random() < 0.5),
        }

    @staticmethod
    def apply(frames: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        """Apply `draw`'s parameters to uint8 frames ``[T, H, W, 3]``."""
        sh, sw = params["size"]
        top, left, ch, cw = params["box"]
        out = []
        for f in frames:
            im = Image.fromarray(f)
            if (sh, sw) != (f.shape[0], f.shape[1]):
                im = im.resize((sw, sh), Image.BICUBIC if sh > f.shape[0] else Image.LANCZOS)
            a = np.asarray(im)[top : top + ch, left : left + cw]
            out.append(a[:, ::-1] if params["flip"] else a)
        return np.ascontiguousarray(np.stack(out))


@dataclass(frozen=True)
class ColourJitter:
    """Random colour changes of uint8 frames: greyscale, channel order, saturation, gamma.

    Cheap diversity for a small photo set (e.g. a greyscale photo or another palette).
    """

    grey: float = 0.0
    permute: float = 0.0
    saturation: tuple[float, float] = (1.0, 1.0)
    gamma: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        if not (0 <= self.grey <= 1 and 0 <= self.permute <= 1):
            raise ValueError(f"grey / permute are probabilities, got {self.grey}, {self.permute}")
        for name in ("saturation", "gamma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be a range 0 < lo <= hi, got {(lo, hi)}")

    def apply(self, frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Jitter uint8 frames ``[..., 3]`` (one draw for the whole clip)."""
        x = frames.astype(np.float32) / 255.0
        if rng.random() < self.permute:
            x = x[..., rng.permutation(3)]
        grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
        if rng.random() < self.grey:
            x = np.repeat(grey[..., None], 3, -1)
        elif self.saturation != (1.0, 1.0):
            sat = rng.uniform(*self.saturation)
            x = np.clip(grey[..., None] + sat * (x - grey[..., None]), 0, 1)
        if self.gamma != (1.0, 1.0):
            x = x ** rng.uniform(*self.gamma)
        return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Sources


class Source:
    """Draws samples from a random generator; ``kind`` is the modality it produces."""

    kind: str = "image"
    name: str = ""

    def draw(self, rng: np.random.Generator) -> Sample:  # pragma: no cover - interface
        """One random sample."""
        raise NotImplementedError

    def __len__(self) -> int:
        """Number of distinct underlying items (0 for generators)."""
        return 0


def _read_captions(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    js, cs = root / "captions.json", root / "captions.csv"
    if js.is_file():
        data = json.loads(js.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{js}: expected a mapping {{relative path: caption}}")
        out.update({str(k): str(v) for k, v in data.items()})
    if cs.is_file():
        with cs.open(newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                if len(row) >= 2 and row[0].strip().lower() != "path":
                    out[row[0].strip()] = row[1].strip()
    return out


def _list_files(root: str | Path, suffixes: frozenset[str], what: str) -> tuple[Path, list[Path]]:
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{what} folder not found: {str(root)!r}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise ValueError(f"no {what} files ({', '.join(sorted(suffixes))}) under {str(root)!r}")
    return root, files


def _caption_for(path: Path, root: Path, table: dict[str, str]) -> str | None:
    side = path.with_suffix(".txt")
    if side.is_file():
        return side.read_text(encoding="utf-8").strip() or None
    rel = path.relative_to(root).as_posix()
    return table.get(rel, table.get(path.name))


def as_rgb_u8(image: np.ndarray) -> np.ndarray:
    """Grey, RGB or RGBA uint8 (or bool) arrays -> uint8 ``[H, W, 3]``."""
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {a.dtype}")
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"expected [H, W], [H, W, 3] or [H, W, 4] pixels, got {a.shape}")
    return np.ascontiguousarray(a[..., :3])


class ArraySource(Source):
    """In-memory uint8 images with random rescale / crop / flip (``crop=None``: whole images)."""

    kind = "image"

    def __init__(
        self,
        images: Sequence[np.ndarray],
        captions: Sequence[str | None] | None = None,
        names: Sequence[str] | None = None,
        crop: CropPolicy | None = CropPolicy(),
        jitter: ColourJitter | None = None,
    ) -> None:
        if not images:
            raise ValueError("ArraySource needs at least one image")
        self.images = [as_rgb_u8(im) for im in images]
        self.captions = list(captions) if captions is not None else [None] * len(self.images)
        self.names = list(names) if names is not None else [f"array{i}" for i in range(len(images))]
        if len(self.captions) != len(self.images) or len(self.names) != len(self.images):
            raise ValueError("captions / names must have one entry per image")
        self.crop, self.jitter = crop, jitter
        self.name = "arrays"

    def __len__(self) -> int:
        return len(self.images)

    def draw(self, rng: np.random.Generator) -> Sample:
        """A random crop of a random image."""
        i = int(rng.integers(len(self.images)))
        img = self.images[i]
        if self.crop is None:
            return image_sample(img, self.captions[i], self.names[i])
        params = self.crop.draw(rng, img.shape[0], img.shape[1])
        out = CropPolicy.apply(img[None], params)[0]
        if self.jitter is not None:
            out = self.jitter.apply(out, rng)
        return image_sample(out, self.captions[i], f"{self.names[i]}@{params['box']}")


class ImageFolderSource(ArraySource):
    """Image files under a folder (recursive), decoded once and kept in memory as uint8."""

    def __init__(
        self,
        root: str | Path,
        crop: CropPolicy | None = CropPolicy(),
        max_items: int | None = None,
        jitter: ColourJitter | None = None,
        captions: dict[str, str] | None = None,
    ) -> None:
        root, files = _list_files(root, IMAGE_EXTENSIONS, "image")
        files = files[:max_items] if max_items else files
        table = {**_read_captions(root), **(captions or {})}
        super().__init__(
            [read_image(f) for f in files],
            [_caption_for(f, root, table) for f in files],
            [str(f) for f in files],
            crop,
            jitter,
        )
        self.name = str(root)


class VideoFolderSource(Source):
    """Video files under a folder; each draw decodes one clip and crops / rescales it."""

    kind = "video"

    def __init__(
        self,
        root: str | Path,
        frames: int = 16,
        stride: int = 1,
        crop: CropPolicy | None = CropPolicy(64, 128),
        cache_frames: bool = True,
        captions: dict[str, str] | None = None,
    ) -> None:
        if frames < 1 or stride < 1:
            raise ValueError(f"frames and stride must be >= 1, got {frames}, {stride}")
        root, self.files = _list_files(root, VIDEO_EXTENSIONS, "video")
        table = {**_read_captions(root), **(captions or {})}
        self.captions = [_caption_for(f, root, table) for f in self.files]
        self.lengths = [count_frames(f) for f in self.files]
        self.frames, self.stride, self.crop = frames, stride, crop
        self.name = str(root)
        # Small videos can be kept decoded; clips then cost no decoding at all.
        self._cache: dict[int, np.ndarray] = {}
        self.cache_frames = cache_frames

    def __len__(self) -> int:
        return len(self.files)

    def _clip(self, i: int, start: int) -> np.ndarray:
        if self.cache_frames:
            if i not in self._cache:
                self._cache[i] = read_frames(self.files[i], 0, self.lengths[i])
            idx = np.minimum(start + self.stride * np.arange(self.frames), self.lengths[i] - 1)
            return self._cache[i][idx]
        return read_frames(self.files[i], start, self.frames, self.stride)

    def draw(self, rng: np.random.Generator) -> Sample:
        """A random clip of a random video."""
        i = int(rng.integers(len(self.files)))
        span = (self.frames - 1) * self.stride + 1
        start = int(rng.integers(max(1, self.lengths[i] - span + 1)))
        clip = self._clip(i, start)
        tag = f"{self.files[i]}#{start}"
        if self.crop is not None:
            params = self.crop.draw(rng, clip.shape[1], clip.shape[2])
            clip = CropPolicy.apply(clip, params)
            tag += f"@{params['box']}"
        return video_sample(clip, self.captions[i], tag)


def _read_voxels_cached(path: Path, cache_dir: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Meshes are rendered and packed once; the packed result is kept under ``cache_dir``."""
    if cache_dir is None or path.suffix.lower() not in MESH_FORMATS:
        return load_voxels(path)
    cached = Path(cache_dir) / f"{path.stem}{path.suffix.replace('.', '_')}.safetensors"
    if not cached.is_file():
        save_voxels(cached, *load_voxels(path))
    return load_voxels(cached)


def save_voxels(path: str | Path, feats, coords) -> Path:
    """Write a packed 3D asset as safetensors (float16 feats, int32 coords)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "feats": np.asarray(feats, dtype=np.float16),
            "coords": np.asarray(coords, dtype=np.int32),
        },
        str(path),
    )
    return path


class VoxelFolderSource(Source):
    """3D assets under a folder (packed voxels or meshes), subsampled to ``max_tokens`` voxels."""

    kind = "3d"

    def __init__(
        self,
        root: str | Path,
        max_tokens: int | None = 512,
        captions: dict[str, str] | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        root, files = _list_files(root, VOXEL_EXTENSIONS | set(MESH_FORMATS), "3D")
        table = {**_read_captions(root), **(captions or {})}
        self.assets = [_read_voxels_cached(f, cache_dir) for f in files]
        self.captions = [_caption_for(f, root, table) for f in files]
        self.names = [str(f) for f in files]
        self.max_tokens = max_tokens
        self.name = str(root)

    def __len__(self) -> int:
        return len(self.assets)

    def draw(self, rng: np.random.Generator) -> Sample:
        """A random voxel subset of a random asset."""
        i = int(rng.integers(len(self.assets)))
        f, c = self.assets[i]
        return voxel_sample(
            f, c, self.captions[i], self.names[i], max_tokens=self.max_tokens, rng=rng
        )


class WorldSource(Source):
    """Captioned scenes of the generated world (`atoken.training.world`) for one modality and split.

    3D assets are rendered once per pool entry (``pool`` random orientations per shape and
    colour pair, cached under ``cache_dir`` when given) and subsampled per draw.
    """

    def __init__(
        self,
        kind: str = "image",
        split: str = "train",
        crop: CropPolicy | None = CropPolicy(64, 128, square=True),
        frames: int = 16,
        max_tokens: int | None = 512,
        pool: int = 2,
        cache_dir: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.split, self.crop, self.frames = kind, split, crop, frames
        self.max_tokens = max_tokens
        self.name = f"world:{kind}:{split}"
        self._assets: list[tuple[world.WorldSpec, np.ndarray, np.ndarray]] = []
        if kind == "3d":
            rng = np.random.default_rng(seed)
            for shape, colour in world.combinations("3d", split):
                for _ in range(pool):
                    spec = world.WorldSpec("3d", shape, colour, seed=int(rng.integers(2**31)))
                    self._assets.append((spec, *_cached_voxels(spec, cache_dir)))

    def __len__(self) -> int:
        return len(self._assets)

    def _side(self, rng: np.random.Generator) -> int:
        if self.crop is None:
            return 128
        return int(rng.choice(np.arange(self.crop.min_side, self.crop.max_side + 1, 16)))

    def draw(self, rng: np.random.Generator) -> Sample:
        """A random scene with its caption."""
        if self.kind == "3d":
            spec, f, c = self._assets[int(rng.integers(len(self._assets)))]
            spec = world.WorldSpec("3d", spec.shape, spec.colour, seed=int(rng.integers(2**31)))
            return voxel_sample(
                f,
                c,
                spec.caption(),
                f"{self.name}:{spec.label}",
                max_tokens=self.max_tokens,
                rng=rng,
            )
        spec = world.sample_spec(rng, self.kind, self.split)
        size = self._side(rng)
        if self.kind == "image":
            return image_sample(
                world.render_image(spec, size), spec.caption(), f"{self.name}:{spec.seed}"
            )
        clip = world.render_video(spec, size, self.frames)
        return video_sample(clip, spec.caption(), f"{self.name}:{spec.seed}")


def _cached_voxels(
    spec: world.WorldSpec, cache_dir: str | Path | None
) -> tuple[np.ndarray, np.ndarray]:
    if cache_dir is not None:
        path = Path(cache_dir) / f"{spec.shape}_{spec.colour}_{spec.seed}.safetensors"
        if path.is_file():
            return load_voxels(path)
    f, c = world.render_voxels(spec)
    f, c = np.asarray(f, dtype=np.float32), np.asarray(c)
    if cache_dir is not None:
        save_voxels(path, f, c)
        f = f.astype(np.float16).astype(np.float32)  # identical to what a cached read returns
    return f, c


class TextureSource(Source):
    """Caption-free generated images with natural-image statistics (`world.texture_image`)."""

    kind = "image"

    def __init__(self, crop: CropPolicy = CropPolicy(64, 256)) -> None:
        self.crop = crop
        self.name = "textures"

    def draw(self, rng: np.random.Generator) -> Sample:
        """A random texture image."""
        sides = np.arange(self.crop.min_side, self.crop.max_side + 1, 16)
        h = int(rng.choice(sides))
        w = h if self.crop.square else int(rng.choice(sides))
        seed = int(rng.integers(2**31))
        img = world.texture_image(np.random.default_rng(seed), h, w)
        return image_sample(img, None, f"textures:{seed}")


class SyntheticSource(Source):
    """Tiny random items for tests: smooth colour images / moving videos / voxel blobs.

    Captions (when ``captions`` is True) name the dominant colour, so a semantic loss has
    something to learn.
    """

    COLOURS = ("red", "green", "blue")

    def __init__(
        self,
        kind: str = "image",
        side: int = 32,
        frames: int = 8,
        voxels: int = 24,
        captions: bool = True,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if side < 16 or side % 16:
            raise ValueError(f"side must be a multiple of 16, got {side}")
        self.kind, self.side, self.frames, self.voxels = kind, side, frames, voxels
        self.captions = captions
        self.name = f"synthetic:{kind}"

    def draw(self, rng: np.random.Generator) -> Sample:
        """A random synthetic item."""
        k = int(rng.integers(3))
        caption = f"a {self.kind} that is mostly {self.COLOURS[k]}" if self.captions else None
        seed = int(rng.integers(2**31))
        g = np.random.default_rng(seed)
        tag = f"{self.name}:{seed}"
        base = np.full(3, -0.6)
        base[k] = 0.7
        if self.kind == "3d":
            n = self.voxels
            coords = g.choice(16**3, size=n, replace=False)
            xyz = np.stack(np.unravel_index(np.sort(coords), (16, 16, 16)), -1) + 24
            feats = (base[None, :] + 0.2 * g.standard_normal((n, 256, 3))) * 0.5 + 0.5
            return voxel_sample(np.clip(feats, 0, 1).reshape(n, 768), xyz, caption, tag)
        s = self.side
        yy, xx = np.mgrid[0:s, 0:s] / s
        grad = np.stack(
            [np.sin(3 * xx + g.uniform(0, 6)) * np.cos(2 * yy + g.uniform(0, 6))] * 3, -1
        )
        img = base + 0.3 * grad + 0.05 * g.standard_normal((s, s, 3))
        if self.kind == "image":
            return image_sample(torch.from_numpy(np.clip(img, -1, 1)).float(), caption, tag)
        shift = int(g.integers(1, 3))
        clip = np.stack([np.roll(img, shift * t, axis=1) for t in range(self.frames)])
        return video_sample(torch.from_numpy(np.clip(clip, -1, 1)).float(), caption, tag)


# ---------------------------------------------------------------------------------------------
# Mixing and batching


class MixtureStream:
    """Endless samples: each draw picks a source with probability proportional to its weight."""

    def __init__(
        self,
        sources: Sequence[Source],
        weights: Sequence[float] | None = None,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        if not sources:
            raise ValueError("MixtureStream needs at least one source")
        w = np.ones(len(sources)) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (len(sources),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"weights must be {len(sources)} non-negative numbers with a positive sum"
            )
        self.sources, self.p = list(sources), w / w.sum()
        self.rng = np.random.default_rng([int(seed), int(rank)])

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        i = int(self.rng.choice(len(self.sources), p=self.p))
        return self.sources[i].draw(self.rng)

    def state_dict(self) -> dict[str, Any]:
        """Generator state (for resuming)."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`."""
        self.rng.bit_generator.state = state["rng"]


class TokenBudgetBatcher:
    """Packs consecutive samples into batches of at most ``token_budget`` tokens.

    A sample that does not fit starts the next batch (nothing is dropped); a single sample
    larger than the budget is rejected with a ValueError naming both numbers.
    """

    def __init__(self, samples: Iterator[Sample], token_budget: int, max_items: int | None = None):
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.samples, self.budget, self.max_items = samples, token_budget, max_items
        self.pending: Sample | None = None  # drawn but not yet batched (part of a resume state)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        items: list[Sample] = []
        total = 0
        while True:
            s = self.pending if self.pending is not None else next(self.samples, None)
            self.pending = None
            if s is None:
                if items:
                    return collate(items)
                raise StopIteration
            if s.num_tokens > self.budget:
                raise ValueError(
                    f"a {s.kind} sample from {s.source!r} has {s.num_tokens} tokens, more than the "
                    f"token budget {self.budget}; lower its size or raise the budget"
                )
            if total + s.num_tokens > self.budget or (
                self.max_items and len(items) >= self.max_items
            ):
                self.pending = s
                return collate(items)
            items.append(s)
            total += s.num_tokens


# ---------------------------------------------------------------------------------------------
# Config -> sources


def _crop_from(spec: dict[str, Any], default: CropPolicy | None) -> CropPolicy | None:
    if spec.get("crop") is False:
        return None
    keys = ("min_side", "max_side", "min_scale", "max_scale", "flip", "square")
    args = {k: spec[k] for k in keys if k in spec}
    if not args:
        return default
    base = default or CropPolicy()
    return CropPolicy(**{**{k: getattr(base, k) for k in keys}, **args})


def _jitter_from(spec: dict[str, Any]) -> ColourJitter | None:
    j = spec.get("jitter")
    if not j:
        return None
    j = dict(j)
    for k in ("saturation", "gamma"):
        if k in j:
            j[k] = tuple(j[k])
    return ColourJitter(**j)


def skimage_photos(names: Sequence[str]) -> list[np.ndarray]:
    """scikit-image's bundled photos by name (only those that ship in the wheel load offline)."""
    import skimage.data

    out = []
    for n in names:
        fn = getattr(skimage.data, str(n), None)
        if fn is None or not callable(fn):
            raise ValueError(f"scikit-image has no bundled image {n!r}")
        out.append(as_rgb_u8(fn()))
    return out


SOURCE_TYPES = (
    "image_folder",
    "video_folder",
    "voxel_folder",
    "skimage",
    "world",
    "textures",
    "synthetic",
)


def build_source(spec: dict[str, Any], base_dir: str | Path | None = None) -> Source:
    """One source from its config mapping (``type`` plus options; paths relative to base_dir)."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in SOURCE_TYPES:
        raise ValueError(f"data source type must be one of {SOURCE_TYPES}, got {kind!r}")

    def path(key: str = "path") -> Path:
        if key not in spec:
            raise ValueError(f"data source {kind!r} needs {key!r}")
        p = Path(str(spec[key])).expanduser()
        return p if p.is_absolute() or base_dir is None else Path(base_dir) / p

    if kind == "image_folder":
        return ImageFolderSource(
            path(),
            _crop_from(spec, CropPolicy()),
            spec.get("max_items"),
            _jitter_from(spec),
            spec.get("captions"),
        )
    if kind == "video_folder":
        return VideoFolderSource(
            path(),
            int(spec.get("frames", 16)),
            int(spec.get("stride", 1)),
            _crop_from(spec, CropPolicy(64, 128)),
            captions=spec.get("captions"),
        )
    if kind == "voxel_folder":
        return VoxelFolderSource(
            path(), spec.get("max_tokens", 512), spec.get("captions"), spec.get("cache_dir")
        )
    if kind == "skimage":
        names = list(spec.get("names", ()))
        return ArraySource(
            skimage_photos(names),
            names=[f"skimage:{n}" for n in names],
            crop=_crop_from(spec, CropPolicy()),
            jitter=_jitter_from(spec),
        )
    if kind == "world":
        cache = spec.get("cache_dir")
        if cache is not None:
            cache = path("cache_dir")
        return WorldSource(
            spec.get("kind", "image"),
            spec.get("split", "train"),
            _crop_from(spec, CropPolicy(64, 128, square=True)),
            int(spec.get("frames", 16)),
            spec.get("max_tokens", 512),
            int(spec.get("pool", 2)),
            cache,
            int(spec.get("seed", 0)),
        )
    if kind == "textures":
        return TextureSource(_crop_from(spec, CropPolicy(64, 256)) or CropPolicy(64, 256))
    return SyntheticSource(
        spec.get("kind", "image"),
        int(spec.get("side", 32)),
        int(spec.get("frames", 8)),
        int(spec.get("voxels", 24)),
        bool(spec.get("captions", True)),
    )
