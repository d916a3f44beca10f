"""Command line: ``python -m atoken {reconstruct,encode,decode,classify,train,eval,download,models}``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from atoken.core.attention import BACKENDS, attention_backend
from atoken.core.checkpoint import load, load_gaussian_decoder
from atoken.io.media import MediaError, kind_of
from atoken.pretrained import registry
from atoken.pretrained.hub import (
    MODEL_NAMES,
    available_models,
    bundled_path,
    load_pretrained,
    load_pretrained_gs,
)

DEFAULT_MODEL = "atoken-tiny"


def default_model_name() -> str:
    """The bundled checkpoint when present, else the official So/C (from the cache)."""
    return DEFAULT_MODEL if bundled_path(DEFAULT_MODEL) else "so-c"


def add_model_args(p: argparse.ArgumentParser, *, gs: bool = False) -> None:
    """Options choosing the model, device, dtype and attention backend."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help=f"model name {registry.names(role='autoencoder')} (default: bundled atoken-tiny)",
    )
    g.add_argument("--weights", default=None, help="checkpoint path (.pt / .safetensors)")
    g.add_argument(
        "--config", default=None, help="preset name or official YAML (default: from the file)"
    )
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--attention", default="sdpa", choices=sorted(BACKENDS))
    if gs:
        g.add_argument("--gs-weights", default=None, help="Gaussian decoder checkpoint")
        g.add_argument("--gs-config", default=None, help="Gaussian decoder preset or YAML")


def load_model(args: argparse.Namespace):
    """The autoencoder the options describe."""
    if args.weights:
        return load(args.weights, args.config, device=args.device, dtype=args.dtype)
    name = args.model or default_model_name()
    return load_pretrained(name, device=args.device, dtype=args.dtype)


def load_gs_decoder(args: argparse.Namespace):
    """The Gaussian decoder paired with the chosen model (atoken.pretrained.registry's pairing)."""
    if args.gs_weights:
        return load_gaussian_decoder(
            args.gs_weights, args.gs_config, device=args.device, dtype=args.dtype
        )
    name = args.model or default_model_name()
    return load_pretrained_gs(name, device=args.device, dtype=args.dtype)


class Bar:
    """A tqdm bar fed by ``(done, total, message)`` callbacks."""

    def __init__(self, desc: str):
        self.bar = tqdm(desc=desc, unit="frame", file=sys.stderr)

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if total and self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def apply_budget(args: argparse.Namespace) -> None:
    """Check the input against the default work budget before any decoding or model work.

    "Keep size" images over the token budget are downscaled (said on stderr); anything else
    over budget raises MediaError naming the limit. ``--no-budget`` skips this on purpose.
    """
    if args.no_budget:
        return
    from atoken.io.budget import Budget, check_video_budget, plan_image

    budget = Budget.for_device(args.device)
    kind = kind_of(args.input)
    try:
        if kind == "image":
            plan = plan_image(args.input, args.max_side, budget)
            if plan.note:
                print(f"note: {plan.note}", file=sys.stderr)
            args.max_side = plan.max_side
        elif kind == "video":
            from atoken.pipelines.reconstruct import VideoLimits, check_video

            limits = VideoLimits(
                max_frames=budget.max_frames, max_read_frames=budget.max_read_frames
            )
            info = check_video(
                args.input,
                limits,
                stride=args.stride,
                max_side=args.max_side,
                max_frames=args.max_frames,
            )
            check_video_budget(
                info.num_frames,
                info.width,
                info.height,
                budget,
                stride=args.stride,
                max_side=args.max_side,
                max_frames=args.max_frames,
            )
        elif Path(args.input).suffix.lower() != ".zip":
            from atoken.threed.mesh_count import count_mesh_elements

            counts = count_mesh_elements(args.input)
            if counts.faces > budget.max_faces or counts.vertices > budget.max_vertices:
                raise MediaError(
                    f"the mesh has {counts.faces} faces and {counts.vertices} vertices; the "
                    f"limit is {budget.max_faces} faces and {budget.max_vertices} vertices"
                )
    except MediaError as e:
        raise MediaError(f"{e} [work budget: --no-budget lifts it]") from e


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from atoken.pipelines.reconstruct import reconstruct_image, reconstruct_video

    kind = kind_of(args.input)
    apply_budget(args)
    model = load_model(args)
    if kind == "image":
        res = reconstruct_image(
            model, args.input, max_side=args.max_side, mode=args.mode, seed=args.seed
        )
        from atoken.io.media import write_image

        write_image(args.output, res.reconstruction)
        report = res.metrics()
    elif kind == "video":
        out = Path(args.output)
        bar = Bar("reconstruct")
        try:
            res = reconstruct_video(
                model,
                args.input,
                out.parent / (out.stem + "_files"),
                stride=args.stride,
                max_side=args.max_side,
                max_frames=args.max_frames,
                mode=args.mode,
                seed=args.seed,
                progress=bar,
            )
        finally:
            bar.close()
        out.parent.mkdir(parents=True, exist_ok=True)
        res.files["reconstruction"].replace(out)
        report = {
            "frames": res.num_frames,
            "psnr": res.mean_psnr,
            "tokens": res.num_tokens,
            "files": {k: str(v) for k, v in res.files.items() if k != "reconstruction"},
        }
    else:
        from atoken.pipelines.reconstruct3d import reconstruct_asset

        gs = load_gs_decoder(args)
        res = reconstruct_asset(
            model,
            gs,
            args.input,
            args.output,
            num_views=args.views,
            resolution=args.resolution,
            turntable=args.turntable,
            mode=args.mode,
            seed=args.seed,
        )
        report = res.summary()
    print(json.dumps({"output": str(args.output), **report}, default=float))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from atoken.io.budget import Budget
    from atoken.pipelines.reconstruct import encode_file

    apply_budget(args)
    model = load_model(args)
    bar = Bar("encode")
    try:
        out = encode_file(
            model,
            args.input,
            args.output,
            max_side=args.max_side,
            stride=args.stride,
            max_frames=args.max_frames,
            mode=args.mode,
            seed=args.seed,
            max_read=None if args.no_budget else Budget.for_device(args.device).max_read_frames,
            progress=bar,
        )
    finally:
        bar.close()
    print(out)
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from atoken.pipelines.reconstruct import decode_file, read_token_file

    if not args.weights and not args.model:
        _, meta = read_token_file(args.tokens)
        name = json.loads(meta.get("model", "{}")).get("name", "")
        if name in MODEL_NAMES:
            args.model = name
    model = load_model(args)
    bar = Bar("decode")
    try:
        out = decode_file(model, args.tokens, args.output, progress=bar)
    finally:
        bar.close()
    print(out)
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from atoken.text.zeroshot import classify_file, parse_labels

    model = load_model(args)
    probs = classify_file(model, args.input, parse_labels(args.labels))
    if args.json:
        print(json.dumps(probs))
    else:
        for label, p in probs.items():
            print(f"{p:7.4f}  {label}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from atoken.training.trainer import train_from_config

    train_from_config(args.config, **parse_overrides(args.set))
    return 0


def cmd_train_generator(args: argparse.Namespace) -> int:
    from atoken.training.flow import train_generator

    res = train_generator(args.config, **parse_overrides(args.set))
    print(f"{res.steps} steps in {res.seconds / 60:.1f} min -> {res.checkpoint}")
    return 0


def cmd_eval_generator(args: argparse.Namespace) -> int:
    from atoken.training.flow_eval import evaluate_generator

    report = evaluate_generator(
        args.generator,
        kinds=tuple(args.kinds),
        samples=args.samples,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(json.dumps(report, default=_jsonable, indent=1))
    return 0


def parse_overrides(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings -> typed overrides: each value is read as YAML (``steps=5`` is the
    int 5, ``lr=3e-4`` a float, ``freeze_encoder=true`` a bool, ``temporal_init=[-1,1]`` a
    list), as it would be in the config file."""
    import yaml

    out = {}
    for kv in pairs:
        key, sep, value = kv.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"error: --set takes KEY=VALUE, got {kv!r}")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise SystemExit(f"error: --set {key}: cannot read {value!r}: {e}") from e
        # PyYAML reads "3e-4" as a string (YAML 1.1 floats need a dot): take it as the number
        if isinstance(parsed, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", parsed):
            parsed = float(parsed)
        out[key.strip()] = parsed
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from atoken.training.evaluate import evaluate_folder

    model = load_model(args)
    report = evaluate_folder(
        model,
        args.folder,
        zero_shot=args.zero_shot,
        max_side=args.max_side,
        pca_components=args.pca,
        codecs=args.codecs,
    )
    if not args.per_item:
        report.pop("per_item", None)
    print(json.dumps(report, default=_jsonable, indent=1))
    return 0


def _jsonable(obj):
    """JSON fallback for numpy / torch values in reports."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return float(obj) if isinstance(obj, (int, float)) else str(obj)


def cmd_download(args: argparse.Namespace) -> int:
    from atoken.pretrained.download import OFFICIAL_WEIGHTS, download

    for name in args.names:
        print(f"{name}: {OFFICIAL_WEIGHTS[name].licence}", file=sys.stderr)
        print(download(name, url=args.url))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    for name, where in available_models().items():
        print(f"{name:16s} {where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m atoken``."""
    p = argparse.ArgumentParser(prog="python -m atoken", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def media_opts(q):
        q.add_argument(
            "--max-side", type=int, default=None, help="downscale so the longer side <= this"
        )
        q.add_argument("--stride", type=int, default=1, help="keep every n-th video frame")
        q.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
        q.add_argument(
            "--mode",
            default="auto",
            choices=["auto", "mean", "sample", "fsq"],
            help="latent fed to the decoder (auto: FSQ codes for So/D, else the mean)",
        )
        q.add_argument("--seed", type=int, default=None, help="seed for --mode sample")
        q.add_argument(
            "--no-budget",
            action="store_true",
            help="lift the default work budget (tokens, pixels, frames, faces: atoken.io.budget)",
        )

    q = sub.add_parser("reconstruct", help="image/video/mesh -> reconstruction")
    q.add_argument("input")
    q.add_argument("output")
    media_opts(q)
    q.add_argument("--views", type=int, default=None, help="3D: rendered views")
    q.add_argument("--resolution", type=int, default=None, help="3D: render resolution")
    q.add_argument("--turntable", default=None, help="3D: write a turntable mp4 here")
    add_model_args(q, gs=True)
    q.set_defaults(func=cmd_reconstruct)

    q = sub.add_parser("encode", help="image/video -> token file (.safetensors)")
    q.add_argument("input")
    q.add_argument("output")
    media_opts(q)
    add_model_args(q)
    q.set_defaults(func=cmd_encode)

    q = sub.add_parser("decode", help="token file -> image/video")
    q.add_argument("tokens")
    q.add_argument("output")
    add_model_args(q)
    q.set_defaults(func=cmd_decode)

    q = sub.add_parser("classify", help="zero-shot classification of an image/video/mesh")
    q.add_argument("input")
    q.add_argument("--labels", required=True, help='comma-separated, e.g. "cat, dog, car"')
    q.add_argument("--json", action="store_true", help='print {"label": probability, ...}')
    add_model_args(q)
    q.set_defaults(func=cmd_classify)

    q = sub.add_parser("train", help="train or fine-tune from a stage config (YAML)")
    q.add_argument("config")
    q.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    q.set_defaults(func=cmd_train)

    q = sub.add_parser(
        "train-generator", help="train a text-to-latent flow generator from a config (YAML)"
    )
    q.add_argument("config")
    q.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    q.set_defaults(func=cmd_train_generator)

    q = sub.add_parser(
        "eval-generator", help="prompt-following on held-out world captions, as JSON"
    )
    q.add_argument("--generator", default="atoken-tiny-gen", help="bundled name or .safetensors")
    q.add_argument("--kinds", nargs="+", default=["image"], choices=["image", "video", "3d"])
    q.add_argument("--samples", type=int, default=16, help="samples per held-out pair")
    q.add_argument("--steps", type=int, default=25, help="ODE steps")
    q.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_eval_generator)

    q = sub.add_parser(
        "eval",
        help="PSNR/SSIM/perceptual/Frechet distances (+ PCA, codecs, zero-shot) over a folder",
    )
    q.add_argument("folder", help="images and videos to reconstruct")
    q.add_argument(
        "--zero-shot",
        default=None,
        help="folder with one subfolder per class (or a CSV/JSON listing) to classify",
    )
    q.add_argument(
        "--pca",
        type=int,
        default=None,
        help="also report a per-patch PCA baseline with this many components",
    )
    q.add_argument(
        "--codecs",
        action="store_true",
        help="also count the tokens' bits and encode each image with JPEG/WebP/AVIF at them",
    )
    q.add_argument("--max-side", type=int, default=512)
    q.add_argument("--per-item", action="store_true", help="include per-item metrics")
    add_model_args(q)
    q.set_defaults(func=cmd_eval)

    q = sub.add_parser("download", help="fetch official weights into the cache ($ATOKEN_HOME)")
    q.add_argument("names", nargs="+", choices=["so-c", "so-d", "so-c-s1", "so-c-s2", "gs"])
    q.add_argument("--url", default=None, help="override the source URL")
    q.set_defaults(func=cmd_download)

    q = sub.add_parser("models", help="list known models and where they load from")
    q.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; errors about inputs print one line instead of a traceback."""
    args = build_parser().parse_args(argv)
    try:
        with attention_backend(getattr(args, "attention", "sdpa")):
            return args.func(args)
    except (MediaError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
