"""One-call verbs on files and arrays: reconstruct images and (streamed) videos, token files.

These are what the command line and the app call. Videos are processed one temporal chunk
(``frames_batch_size`` = 16 frames) at a time: the official model encodes and decodes such
chunks independently, so streaming gives exactly the whole-video result while memory stays
bounded; the pooled feature is accumulated exactly with an online softmax.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from atoken.core.model import ATokenModel, Encoded
from atoken.core.patchify import detokenize, to_model_range, to_uint8, tokenize
from atoken.core.sparse import SparseTensor
from atoken.io.media import (
    MediaError,
    VideoInfo,
    VideoWriter,
    crop_to_grid,
    iter_video_frames,
    prepare_image,
    probe_video,
    side_by_side,
)
from atoken.pipelines.metrics import (
    MIN_SIDE,
    compression_ratio,
    perceptual_distance_per_frame,
    psnr,
    ssim,
)
from atoken.pipelines.visualize import PCABasis, fit_pca, pca_image

TOKEN_FORMAT = "atoken-tokens/1"
Progress = Callable[[int, int, str], None]  # (done, total, message)


def _frames_u8(rec: SparseTensor, kind: str) -> np.ndarray:
    """Decoder output of one item -> uint8 ``[T, H, W, 3]``."""
    frames = detokenize(rec, [kind])[0]  # [T, 3, H, W]
    return to_uint8(frames.permute(0, 2, 3, 1))


@dataclass
class ImageResult:
    """One reconstructed image with everything the app and the CLI show."""

    original: np.ndarray  # uint8 [H, W, 3]: the cropped model input
    reconstruction: np.ndarray  # uint8 [H, W, 3]
    encoded: Encoded
    latent: SparseTensor  # what the decoder saw (mean, sample or FSQ codes)
    indices: Tensor | None  # FSQ indices [N, groups] or None
    mode: str

    @property
    def grid(self) -> tuple[int, int]:
        """Tokens per column and per row."""
        return self.original.shape[0] // 16, self.original.shape[1] // 16

    @property
    def num_tokens(self) -> int:
        """Number of latent tokens."""
        return self.latent.feats.shape[0]

    def metrics(self) -> dict[str, float]:
        """PSNR / SSIM on the uint8 arrays, token count and compression ratio."""
        groups = None if self.indices is None else self.indices.shape[1]
        return {
            "psnr": psnr(self.original, self.reconstruction, data_range=255),
            "ssim": ssim(self.original, self.reconstruction, data_range=255),
            "tokens": self.num_tokens,
            "compression": compression_ratio(
                self.original.shape,
                self.num_tokens,
                latent_channels=self.latent.feats.shape[1],
                codebook_size=4096 if groups else None,
                num_codebooks=groups or 1,
            ),
        }


def choose_latent(
    model: ATokenModel,
    enc: Encoded,
    mode: str = "auto",
    *,
    seed: int | None = None,
    temperature: float = 1.0,
) -> tuple[SparseTensor, Tensor | None, str]:
    """The decoder input for a latent mode: ``auto`` (FSQ codes for So/D, else the mean),
    ``mean``, ``sample`` (seeded) or ``fsq``."""
    if mode == "auto":
        mode = "fsq" if model.is_discrete else "mean"
    if mode == "fsq":
        codes, indices = model.quantize(enc.mean)
        return SparseTensor(codes, enc.coords), indices, mode
    if mode == "mean":
        return enc.latent(), None, mode
    if mode == "sample":
        return enc.latent(sample=True, seed=seed, temperature=temperature), None, mode
    raise ValueError(f"latent mode must be auto, mean, sample or fsq; got {mode!r}")


@torch.no_grad()
def reconstruct_image(
    model: ATokenModel,
    image,
    *,
    max_side: int | None = None,
    mode: str = "auto",
    seed: int | None = None,
    temperature: float = 1.0,
) -> ImageResult:
    """Read/crop an image (path, bytes, PIL or uint8 array), encode, decode: an ImageResult."""
    original = prepare_image(image, max_side=max_side)
    x = tokenize([to_model_range(original)])
    enc = model.encode(x)
    latent, indices, mode = choose_latent(model, enc, mode, seed=seed, temperature=temperature)
    rec = model.decode(latent)
    return ImageResult(original, _frames_u8(rec, "image")[0], enc, latent, indices, mode)


@dataclass
class VideoResult:
    """Summary of a streamed video reconstruction."""

    fps: float
    num_frames: int
    size: tuple[int, int]  # (width, height) after crop
    psnr_per_frame: list[float]
    pooled: Tensor  # [1, C]
    files: dict[str, Path] = field(default_factory=dict)
    num_tokens: int = 0
    # (frame index, EfficientNet-Lite0 perceptual distance) of the frames scored
    perceptual_per_frame: list[tuple[int, float]] = field(default_factory=list)

    @property
    def mean_psnr(self) -> float:
        """Mean of the per-frame PSNRs (finite frames)."""
        vals = [v for v in self.psnr_per_frame if math.isfinite(v)]
        return float(np.mean(vals)) if vals else float("inf")

    @property
    def mean_perceptual(self) -> float | None:
        """Mean perceptual distance of the scored frames (None when none was scored)."""
        vals = [v for _, v in self.perceptual_per_frame]
        return float(np.mean(vals)) if vals else None


def chunk_frames(frames: Iterable[np.ndarray], size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Group frames into ``(clip, real)`` of ``size`` frames (``size`` a multiple of 4).

    The last clip is padded up to a multiple of 4 by repeating its last frame; ``real`` says how
    many of its frames are the video's, so every frame is reconstructed and the padding is
    dropped from the output. (The official tokenizer drops the trailing ``T mod 4`` frames of a
    video and pads a clip shorter than 4 with grey frames; a 250-frame clip came back with 248.)
    """
    buf: list[np.ndarray] = []
    for f in frames:
        buf.append(f)
        if len(buf) == size:
            yield np.stack(buf), size
            buf = []
    if buf:
        real = len(buf)
        buf += [buf[-1]] * (-real % 4)
        yield np.stack(buf), real


@dataclass
class VideoLimits:
    """Refuse videos beyond these before any model work (the app sets tighter ones)."""

    max_frames: int = 100_000  # frames the model sees, after the stride and the frame limit
    max_side: int = 4096
    max_duration: float = 24 * 3600.0
    max_read_frames: int = 100_000  # frames decoded from the file, before the stride


def check_video(
    path: str | Path,
    limits: VideoLimits | None = None,
    *,
    stride: int = 1,
    max_side: int | None = None,
    max_frames: int | None = None,
) -> VideoInfo:
    """Probe a video and refuse it, with the limit in the message, before any model work.

    The frames are counted in the file (:func:`probe_video`), so a header that lies about
    the frame rate or duration cannot slip past ``max_frames`` or ``max_read_frames``.
    """
    limits = limits or VideoLimits()
    if stride < 1:
        raise MediaError(f"frame stride must be >= 1, got {stride}")
    info = probe_video(path, count=True)
    if max(info.width, info.height) > limits.max_side and not max_side:
        raise MediaError(
            f"video is {info.width}x{info.height}; the limit is {limits.max_side} px per side "
            "(set a max side to downscale)"
        )
    if info.duration > limits.max_duration:
        raise MediaError(
            f"video lasts {info.duration:.1f} s; the limit is {limits.max_duration:.0f} s"
        )
    total = math.ceil(info.num_frames / stride)
    if max_frames:
        total = min(total, max_frames)
    if total > limits.max_frames:
        raise MediaError(
            f"video has {total} frames after stride {stride}; the limit is {limits.max_frames} "
            "(raise the stride or set a frame limit)"
        )
    # what iter_video_frames decodes: up to the last kept frame, skipped frames included
    read = min(info.num_frames, (max_frames - 1) * stride + 1) if max_frames else info.num_frames
    if read > limits.max_read_frames:
        raise MediaError(
            f"video has {info.num_frames} frames and {read} would be decoded at stride {stride}; "
            f"the limit is {limits.max_read_frames} decoded frames (set a lower frame limit)"
        )
    return info


def scored_frames(total: int, count: int) -> set[int]:
    """``count`` frame indices out of ``total`` (all when ``count >= total``, none when 0), evenly
    spaced from the first frame to the last. Even spacing by a fixed step would land on one
    position of every temporal patch (step 4: always the patch's first frame)."""
    if count <= 0 or total <= 0:
        return set()
    if count >= total:
        return set(range(total))
    if count == 1:
        return {0}
    return {round(j * (total - 1) / (count - 1)) for j in range(count)}


@torch.no_grad()
def reconstruct_video(
    model: ATokenModel,
    path: str | Path,
    out_dir: str | Path,
    *,
    stride: int = 1,
    max_side: int | None = None,
    max_frames: int | None = None,
    mode: str = "auto",
    seed: int | None = None,
    limits: VideoLimits | None = None,
    write_original: bool = True,
    write_side_by_side: bool = True,
    write_latent_pca: bool = True,
    perceptual_frames: int = 0,
    progress: Progress | None = None,
) -> VideoResult:
    """Stream a video through the model chunk by chunk, writing mp4s into ``out_dir``.

    Files: ``reconstruction.mp4`` always; ``original.mp4`` (the cropped input the model saw),
    ``side_by_side.mp4`` and ``latent_pca.mp4`` (one PCA frame per input frame) when asked.
    ``perceptual_frames``: score at most this many frames, evenly spaced from the first to the
    last (`scored_frames`; so they fall on every position inside the 4-frame temporal patches,
    not only on the first), with `atoken.pipelines.metrics.perceptual_distance` (0: none; frames
    under 32 px are never scored).
    """
    info = check_video(path, limits, stride=stride, max_side=max_side, max_frames=max_frames)
    total = math.ceil(info.num_frames / stride)
    if max_frames:
        total = min(total, max_frames)
    out_dir = Path(out_dir)
    fps = info.fps / stride
    chunk = model.config.frames_batch_size
    writers = {"reconstruction": VideoWriter(out_dir / "reconstruction.mp4", fps)}
    if write_original:
        writers["original"] = VideoWriter(out_dir / "original.mp4", fps)
    if write_side_by_side:
        writers["side_by_side"] = VideoWriter(out_dir / "side_by_side.mp4", fps)
    if write_latent_pca:
        writers["latent_pca"] = VideoWriter(out_dir / "latent_pca.mp4", fps)
    psnrs: list[float] = []
    perceptual: list[tuple[int, float]] = []
    chosen = scored_frames(total, perceptual_frames)
    state, basis = None, None
    done, tokens, size = 0, 0, (0, 0)
    # a hard stop while streaming, whatever the count said (a file may change under us)
    frames = iter_video_frames(
        path,
        stride=stride,
        max_side=max_side,
        max_frames=max_frames,
        max_read=(limits or VideoLimits()).max_read_frames,
    )
    try:
        for clip, n_real in chunk_frames(frames, chunk):
            clip = crop_to_grid(clip)
            x = tokenize([to_model_range(clip)])
            enc = model.encode(x, pool=False)
            state = model.pool_update(state, enc.hidden)
            latent, _, _ = choose_latent(
                model, enc, mode, seed=None if seed is None else seed + done
            )
            rec = _frames_u8(model.decode(latent), "video")[:n_real]
            tokens += x.feats.shape[0]
            size = (clip.shape[2], clip.shape[1])
            for i in range(n_real):
                psnrs.append(psnr(clip[i], rec[i], data_range=255))
                writers["reconstruction"].write(rec[i])
                if "original" in writers:
                    writers["original"].write(clip[i])
                if "side_by_side" in writers:
                    writers["side_by_side"].write(side_by_side(clip[i], rec[i]))
            scored = [i for i in range(n_real) if done + i in chosen]
            if scored and min(clip.shape[1:3]) >= MIN_SIDE:
                dist = perceptual_distance_per_frame(clip[scored], rec[scored], model.device)
                perceptual += [(done + i, d) for i, d in zip(scored, dist)]
            if "latent_pca" in writers:
                basis = basis or fit_pca(latent.feats)
                pca = _pca_frames(latent, basis, clip.shape[1:3])
                for i in range(n_real):
                    writers["latent_pca"].write(pca[min(i // 4, len(pca) - 1)])
            done += n_real
            if progress:
                progress(done, total, f"frames {done}/{total}")
    finally:
        for w in writers.values():
            w.close()
    if state is None:
        raise MediaError(f"{Path(path).name} has no decodable frames")
    return VideoResult(
        fps=fps,
        num_frames=done,
        size=size,
        psnr_per_frame=psnrs,
        pooled=model.pool_finish(state).cpu(),
        files={k: w.path for k, w in writers.items()},
        num_tokens=tokens,
        perceptual_per_frame=perceptual,
    )


def _pca_frames(latent: SparseTensor, basis: PCABasis, hw: tuple[int, int]) -> np.ndarray:
    img = pca_image(latent.feats, latent.coords, basis, upscale=16)
    return img[:, : hw[0], : hw[1]]


# -- token files ---------------------------------------------------------------------------


def model_descriptor(model: ATokenModel) -> dict:
    """What a token file records about the model that made it."""
    return {"name": model.config.name, "config": model.config.to_dict()}


@torch.no_grad()
def encode_file(
    model: ATokenModel,
    source: str | Path,
    out: str | Path,
    *,
    max_side: int | None = None,
    stride: int = 1,
    max_frames: int | None = None,
    mode: str = "auto",
    seed: int | None = None,
    max_read: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Encode an image or a video file into a ``.safetensors`` token file.

    ``max_read`` stops (with an error) once that many video frames were decoded.

    Tensors: ``latent [N, L]`` (mean, sample or FSQ codes), ``coords [N, 5]`` int32, ``pooled
    [1, C]``, and for FSQ ``indices [N, groups]`` int32. Metadata: format, kind, model, frame
    size, fps, frame count, latent mode.
    """
    from atoken.io.media import kind_of

    kind = kind_of(source)
    meta = {"format": TOKEN_FORMAT, "kind": kind, "model": json.dumps(model_descriptor(model))}
    if kind == "image":
        original = prepare_image(source, max_side=max_side)
        x = tokenize([to_model_range(original)])
        enc = model.encode(x)
        latent, indices, used = choose_latent(model, enc, mode, seed=seed)
        lat, coords, pooled = [latent.feats], [latent.coords], enc.pooled
        idx = [indices] if indices is not None else []
        meta.update(height=str(original.shape[0]), width=str(original.shape[1]), frames="1")
    elif kind == "video":
        info = probe_video(source)
        total = math.ceil(info.num_frames / stride)
        lat, coords, idx, state, t0, done = [], [], [], None, 0, 0
        used, hw = mode, (0, 0)
        frames = iter_video_frames(
            source, stride=stride, max_side=max_side, max_frames=max_frames, max_read=max_read
        )
        for clip, n_real in chunk_frames(frames, model.config.frames_batch_size):
            clip = crop_to_grid(clip)
            x = tokenize([to_model_range(clip)])
            enc = model.encode(x, pool=False)
            state = model.pool_update(state, enc.hidden)
            latent, indices, used = choose_latent(
                model, enc, mode, seed=None if seed is None else seed + done
            )
            c = latent.coords.clone()
            c[:, 1] += t0
            t0 = int(c[:, 1].max()) + 1
            lat.append(latent.feats)
            coords.append(c)
            if indices is not None:
                idx.append(indices)
            done += n_real
            hw = clip.shape[1:3]
            if progress:
                progress(min(done, total), total, f"frames {min(done, total)}/{total}")
        if state is None:
            raise MediaError(f"{Path(source).name} has no decodable frames")
        pooled = model.pool_finish(state)
        meta.update(
            height=str(hw[0]), width=str(hw[1]), frames=str(done), fps=str(info.fps / stride)
        )
    else:
        raise MediaError("encode takes an image or a video; for meshes use the 3D pipeline")
    meta["latent_mode"] = used
    tensors = {
        "latent": torch.cat(lat).float().cpu().contiguous(),
        "coords": torch.cat(coords).to(torch.int32).cpu().contiguous(),
        "pooled": pooled.float().cpu().contiguous(),
    }
    if idx:
        tensors["indices"] = torch.cat(idx).to(torch.int32).cpu().contiguous()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)
    return out


def read_token_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a token file, validated."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise ValueError(f"{path} is not a readable token file: {e}") from e
    if meta.get("format") != TOKEN_FORMAT or "coords" not in tensors:
        raise ValueError(f"{path} is not an atoken token file (format {meta.get('format')!r})")
    return tensors, meta


@torch.no_grad()
def decode_file(
    model: ATokenModel,
    tokens: str | Path,
    out: str | Path,
    *,
    progress: Progress | None = None,
) -> Path:
    """Decode a token file to an image (.png/...) or a video (.mp4), chunk by chunk."""
    from atoken.io.media import write_image

    tensors, meta = read_token_file(tokens)
    coords = tensors["coords"]
    if "indices" in tensors and model.is_discrete:
        latent = model.dequantize(tensors["indices"])
    else:
        latent = tensors["latent"]
    if latent.shape[1] != model.config.latent_channels:
        raise ValueError(
            f"tokens have {latent.shape[1]} channels but the model expects "
            f"{model.config.latent_channels}; decode with the model that encoded them "
            f"({json.loads(meta.get('model', '{}')).get('name', '?')})"
        )
    out = Path(out)
    if meta.get("kind") == "image":
        rec = model.decode(SparseTensor(latent, coords))
        return write_image(out, _frames_u8(rec, "image")[0])
    fps = float(meta.get("fps", 25))
    n_frames = int(meta.get("frames", 0)) or None
    t = coords[:, 1]
    size = model.config.frames_stride // model.patch_t
    written = 0
    starts = range(int(t.min()), int(t.max()) + 1, size)
    with VideoWriter(out, fps) as w:
        for start in starts:
            rows = (t >= start) & (t < start + size)
            c = coords[rows].clone()
            c[:, 1] -= start
            rec = _frames_u8(model.decode(SparseTensor(latent[rows], c)), "video")
            for frame in rec:
                if n_frames is None or written < n_frames:
                    w.write(frame)
                    written += 1
            if progress:
                progress(written, n_frames or written, f"frames {written}")
    return out
