"""AToken demo: ``python app.py`` (``--help`` lists the options).

Safe to put in front of strangers by default: visitors pick models from the operator's list
(each for their own session), every request is checked against a work budget before the
expensive part starts, and outputs are swept. The operator opens more with flags:
``--allow-downloads``, ``--weights-dir``, ``--models``, budget and disk limits (README,
"Deploying publicly"). On a Hugging Face ZeroGPU Space this file is the entry point unchanged:
``spaces`` is imported before anything touches CUDA and the GPU handlers carry ``@spaces.GPU``.
"""

import spaces  # noqa: F401, I001 - must come before torch touches CUDA (ZeroGPU)

import argparse
import logging
import os
import sys
import time
from pathlib import Path


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "no")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (environment variables give the defaults on hosted deployments)."""
    p = argparse.ArgumentParser(description="AToken Gradio demo")
    p.add_argument(
        "--model",
        default=os.environ.get("ATOKEN_MODEL"),
        help="model name (atoken-tiny, so-c, ..., random-tiny); default: bundled",
    )
    p.add_argument("--weights", default=None, help="checkpoint path (.safetensors / .pt)")
    p.add_argument("--config", default=None, help="preset or YAML for --weights")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="create a public gradio.live link")
    p.add_argument(
        "--compile",
        action="store_true",
        help="warm up torch.compile'd attention at start (falls back to SDPA)",
    )
    p.add_argument("--max-file-size", default="200mb", help="largest upload Gradio accepts")
    p.add_argument("--concurrency", type=int, default=1, help="model calls running at once")
    p.add_argument(
        "--fixed-model",
        action="store_true",
        default=_env_flag("ATOKEN_FIXED_MODEL"),
        help="hide the model panel: every visitor runs the start model; env ATOKEN_FIXED_MODEL=1",
    )
    g = p.add_argument_group("what visitors may do (operator)")
    g.add_argument(
        "--models",
        default=os.environ.get("ATOKEN_MODELS"),
        help="comma-separated models visitors may pick (default: every one available here); "
        "env ATOKEN_MODELS",
    )
    g.add_argument(
        "--allow-downloads",
        action="store_true",
        default=_env_flag("ATOKEN_ALLOW_DOWNLOADS"),
        help="let visitors download official weights into this server's cache; "
        "env ATOKEN_ALLOW_DOWNLOADS=1",
    )
    g.add_argument(
        "--weights-dir",
        default=os.environ.get("ATOKEN_WEIGHTS_DIR"),
        help="offer the checkpoints in this folder by file name; env ATOKEN_WEIGHTS_DIR",
    )
    g.add_argument("--max-models", type=int, default=4, help="models kept loaded at once")
    g.add_argument(
        "--model-memory",
        type=float,
        default=None,
        help="GB the loaded models may take (default: 40%% of RAM, or 70%% of the GPU)",
    )
    g.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="latent tokens of one image request (default: 4096 on CPU, 16384 on GPU)",
    )
    g.add_argument(
        "--max-video-tokens",
        type=int,
        default=None,
        help="latent tokens of one video request (default: 16384 on CPU, 65536 on GPU)",
    )
    g.add_argument("--max-faces", type=int, default=None, help="mesh faces (default 1,000,000)")
    g.add_argument(
        "--output-cap", type=float, default=2.0, help="GB of session outputs kept on disk"
    )
    g.add_argument(
        "--session-ttl",
        type=float,
        default=60.0,
        help="minutes after which an idle session's outputs are swept",
    )
    return p.parse_args(argv)


def policy_from_args(args: argparse.Namespace):
    """The operator's :class:`~app.models.Policy` from the command line."""
    from app.models import Policy

    models = None
    if args.models:
        models = tuple(k.strip() for k in args.models.split(",") if k.strip())
    memory = None if args.model_memory is None else int(args.model_memory * 2**30)
    return Policy(
        models=models,
        allow_downloads=args.allow_downloads,
        weights_dir=Path(args.weights_dir).resolve() if args.weights_dir else None,
        max_models=args.max_models,
        max_bytes=memory,
    )


def limits_from_args(args: argparse.Namespace, device: str):
    """Upload limits and the work budget for the device, with the operator's overrides."""
    from dataclasses import replace

    from app.handlers import Limits
    from atoken.io.budget import Budget

    budget = Budget.for_device(device)
    overrides = {
        "max_tokens": args.max_tokens,
        "max_video_tokens": args.max_video_tokens,
        "max_faces": args.max_faces,
    }
    budget = replace(budget, **{k: v for k, v in overrides.items() if v is not None})
    limits = Limits(budget=budget)
    limits.video.max_frames = budget.max_frames
    limits.video.max_read_frames = budget.max_read_frames
    return limits


def compile_cache() -> Path:
    """A persistent torch.compile cache under the user cache (reused across restarts)."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = base / "atoken" / "inductor"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def main(argv: list[str] | None = None) -> None:
    """Load the model, optionally warm up compiled attention, and serve."""
    args = parse_args(argv)
    compile_cache()
    import torch

    from app import session
    from app.layout import build_demo
    from app.models import ModelManager
    from app.uploads import launch_options

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    try:
        manager = ModelManager(
            args.model,
            device=device,
            dtype=args.dtype,
            path=args.weights,
            config=args.config,
            policy=policy_from_args(args),
        )
    except (OSError, ValueError) as e:  # a wrong --weights / --config / --model: say which
        sys.exit(f"error: {e}")
    loaded = ", ".join(manager.preload())
    print(
        f"model {manager.key} ready in {time.perf_counter() - t0:.1f} s ({loaded})",
        file=sys.stderr,
    )
    if args.compile:

        def report(done: int, total: int, msg: str) -> None:
            print(f"[warm-up {done}/{total}] {msg}", file=sys.stderr, flush=True)

        note = manager.warm_up(report)
        print(f"attention: {manager.backend}{note}", file=sys.stderr)
    demo = build_demo(manager, limits_from_args(args, device), switchable=not args.fixed_model)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=64)
    session.OUTPUT_CAP = int(args.output_cap * 2**30)
    session.SESSION_TTL = args.session_ttl * 60
    session.start_sweeper(ttl=session.SESSION_TTL, cap=session.OUTPUT_CAP)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        show_error=True,
        **launch_options(args.max_file_size, blocks=demo),
    )


if __name__ == "__main__":
    main()
