"""atoken.training.flow: latent cache, config checks and bit-exact resume."""

from __future__ import annotations

import pytest
import torch

from atoken.cli import build_parser
from atoken.training.flow import GenTrainer, load_gen_config, load_latent_set

CONFIG = "configs/generator/atoken_tiny_gen.yaml"


def tiny_config(tmp_path, **over):
    over = {
        "output_dir": str(tmp_path / "run"),
        "data.cache_dir": str(tmp_path / "cache"),
        "data.sources": [
            {"type": "world", "kind": "image", "count": 12, "size": 32, "batch": 4},
            {
                "type": "world",
                "kind": "video",
                "count": 6,
                "size": 32,
                "frames": 8,
                "seed": 1,
                "batch": 2,
            },
        ],
        "model": {"width": 32, "depth": 1, "heads": 2},
        "steps": 6,
        "warmup_steps": 2,
        "progress": False,
        "threads": None,
        **over,
    }
    return load_gen_config(CONFIG, **over)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("latents")


def test_resume_is_bit_exact(tmp_path, cache_dir):
    straight = GenTrainer(tiny_config(tmp_path / "a", **{"data.cache_dir": str(cache_dir)}))
    straight.fit()

    cfg = tiny_config(tmp_path / "b", **{"data.cache_dir": str(cache_dir)})
    first = GenTrainer(cfg)
    for _ in range(3):
        first.train_step()
    first.save_state()
    second = GenTrainer(
        tiny_config(tmp_path / "b", resume=True, **{"data.cache_dir": str(cache_dir)})
    )
    assert second.step == 3
    second.fit()
    a, b = straight.raw_model.state_dict(), second.raw_model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight.ema.shadow.keys() == second.ema.shadow.keys()
    for k in straight.ema.shadow:
        assert torch.equal(straight.ema.shadow[k], second.ema.shadow[k]), k
    # and training moved the weights at all
    fresh = GenTrainer(tiny_config(tmp_path / "c", **{"data.cache_dir": str(cache_dir)}))
    assert not torch.equal(fresh.raw_model.in_proj.weight, straight.raw_model.in_proj.weight)


def test_cache_holds_training_pairs_only(tmp_path, cache_dir):
    from atoken.training import world

    trainer = GenTrainer(tiny_config(tmp_path, **{"data.cache_dir": str(cache_dir)}))
    files = sorted(cache_dir.glob("*.safetensors"))
    assert len(files) == 2
    sets = [load_latent_set(f) for f in files]
    kinds = sorted(s.kind for s in sets)
    assert kinds == ["image", "video"]
    for s in sets:
        assert s.text.shape == (len(s), 384)
        assert s.feats.shape[1] == 48 and int(s.offsets[-1]) == s.feats.shape[0]
        for cap in s.captions:
            label = cap.split(" of ", 1)[-1]
            assert not any(
                f"{c} " in label and sh in label
                for sh, c in world.combinations("image", "held_out")
            ), cap
    # video items span two latent frames, images one
    cfg = trainer.raw_model.config
    assert cfg.image_grid == (2, 2) and cfg.video_grid == (2, 2, 2)
    assert cfg.templates == []


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown generator config keys"):
        tiny_config(tmp_path, bogus=1)
    with pytest.raises(ValueError, match="cond_drop"):
        tiny_config(tmp_path, cond_drop=1.5)
    with pytest.raises(ValueError, match="source type"):
        tiny_config(tmp_path, **{"data.sources": [{"type": "web"}]})


def test_cli_subcommands_parse():
    args = build_parser().parse_args(["train-generator", CONFIG, "--set", "steps=5", "lr=3e-4"])
    assert args.config == CONFIG and args.set == ["steps=5", "lr=3e-4"]
    args = build_parser().parse_args(
        ["eval-generator", "--kinds", "image", "video", "--steps", "8"]
    )
    assert args.kinds == ["image", "video"] and args.steps == 8 and args.guidance == 4.0


def test_folder_source_reads_sidecar_captions(tmp_path):
    import numpy as np
    from PIL import Image

    from atoken.pretrained.hub import load_pretrained
    from atoken.text.towers import load_text_tower
    from atoken.training.flow import build_latent_set

    rng = np.random.default_rng(0)
    for name, caption in (("a", "a photo of a red circle."), ("b", "a green square"), ("c", None)):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
            tmp_path / f"{name}.png"
        )
        if caption:
            (tmp_path / f"{name}.txt").write_text(caption + "\n")
    tower = load_text_tower("minilm")
    ls = build_latent_set(
        {"type": "folder", "path": str(tmp_path), "size": 32}, load_pretrained("atoken-tiny"), tower
    )
    assert ls.captions == ["a photo of a red circle.", "a green square"]  # c has no caption
    assert ls.feats.shape == (2 * 4, 48) and ls.offsets.tolist() == [0, 4, 8]
    assert torch.allclose(ls.text, tower.encode(ls.captions))
