"""Trainer: schedule, EMA, weight transfer, PCA start, objective wiring, curriculum, DDP, resume."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from atoken import training
from atoken.core.checkpoint import load, read_state_dict
from atoken.core.model import ATokenModel
from atoken.core.sparse import SparseTensor
from atoken.training import data

GOLDEN_TINY_C = Path(__file__).parents[1] / "golden" / "weights" / "tiny_c.safetensors"


def tiny_model(latent: int = 32, quantizer: bool = False, width: int = 64) -> dict:
    """A config dict for a 1+1 block model (official encoder / decoder flags)."""
    enc = dict(
        channels=width,
        num_blocks=1,
        num_heads=2,
        mlp_channels=2 * width,
        use_bias=True,
        use_rms_norm=False,
        qk_rms_norm=False,
    )
    dec = dict(enc, use_bias=False, use_rms_norm=True, qk_rms_norm=True)
    return training.model_config(
        "tiny-c",
        {
            "encoder": enc,
            "decoder": dec,
            "latent_channels": latent,
            "use_quantizer": quantizer,
            "text_tower": None,
            "name": "test-tiny",
        },
    ).to_dict()


def base_config(tmp_path: Path, name: str, kinds=("image",), **over) -> dict:
    cfg = {
        "name": name,
        "output_dir": str(tmp_path / name),
        "model": tiny_model(),
        "steps": 30,
        "warmup_steps": 3,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "ema_decay": 0.99,
        "cpu": True,
        "progress": False,
        "log_every": 5,
        "data": {
            "token_budget": 40,
            # 48 px images (9 tokens): few images per step keeps the 224 px loss terms cheap
            "sources": [
                {"type": "synthetic", "kind": k, "voxels": 10, "side": 48 if k == "image" else 32}
                for k in kinds
            ],
        },
        "loss": {"image": {"feature_net": {"channels": [8, 16], "seed": 0}}},
        "semantic": {"text_tower": "random:64"},
    }
    return training._merge(cfg, over)


def fixed_batch(kinds, seed=123, budget=96) -> data.Batch:
    sources = [data.SyntheticSource(k, side=48 if k == "image" else 32, voxels=10) for k in kinds]
    stream = data.MixtureStream(sources, seed=seed)
    return next(data.TokenBudgetBatcher(stream, budget))


# ---------------------------------------------------------------------------------------------
# Pieces


def test_lr_schedule_values():
    f = lambda s: training.lr_factor(s, warmup=10, total=110, min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_param_groups_scale_the_encoder_and_skip_decay_on_vectors():
    model = ATokenModel(training.model_config(tiny_model()))
    module = training.TrainModule(model, 0.0, 0.0, True)
    groups = training.param_groups(
        module, lr=1.0, weight_decay=0.1, encoder_scale=0.1, freeze_encoder=False
    )
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(model.encoder.input_layer.weight)]["lr"] == pytest.approx(0.1)
    assert by_id[id(model.encoder.input_layer.weight)]["weight_decay"] == 0.1
    assert by_id[id(model.encoder.input_layer.bias)]["weight_decay"] == 0.0
    assert by_id[id(model.decoder.out_layer.weight)]["lr"] == 1.0
    assert by_id[id(model.encoder.pos_embedder.position_embedding.weight)]["weight_decay"] == 0.0
    assert by_id[id(module.logit_scale)]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(module.parameters()))
    frozen = training.param_groups(module, 1.0, 0.1, 0.1, freeze_encoder=True)
    assert not any(p is model.encoder.input_layer.weight for g in frozen for p in g["params"])


def test_ema_matches_hand_computation():
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = training.EMA(lin, decay=0.5)
    with torch.no_grad():
        lin.weight.fill_(3.0)
    ema.update(lin)  # step 1: d = min(0.5, 2/11) = 2/11
    d = 2 / 11
    assert float(ema.shadow["weight"]) == pytest.approx(d * 1.0 + (1 - d) * 3.0)
    for _ in range(20):
        ema.update(lin)
    assert float(ema.shadow["weight"]) == pytest.approx(3.0, abs=1e-4)


def test_ema_keeps_frozen_weights_bit_exact():
    lin = torch.nn.Linear(64, 64)
    ema = training.EMA(lin, decay=0.999)
    lin.weight.requires_grad_(False)  # frozen (stage 4 freezes the encoder)
    with torch.no_grad():
        lin.bias.add_(1.0)
    for _ in range(50):
        ema.update(lin)
    assert torch.equal(ema.shadow["weight"], lin.weight)
    assert not torch.equal(ema.shadow["bias"], lin.bias)  # trained weights are still averaged


def test_transfer_weights_grows_the_latent():
    small = ATokenModel(training.model_config(tiny_model(latent=32)))
    big = ATokenModel(training.model_config(tiny_model(latent=48)))
    training.init_weights(small, seed=1)
    training.init_weights(big, seed=2)
    before = big.proj.weight.clone()
    resized = training.transfer_weights(small.state_dict(), big)
    assert sorted(resized) == ["decoder.input_layer.weight", "proj.weight"]
    torch.testing.assert_close(big.proj.weight[:32], small.proj.weight[:32])  # mean rows
    torch.testing.assert_close(big.proj.weight[48:80], small.proj.weight[32:])  # logvar rows
    torch.testing.assert_close(big.proj.weight[32:48], before[32:48])  # new channels kept
    torch.testing.assert_close(
        big.decoder.input_layer.weight[:, :32], small.decoder.input_layer.weight
    )
    torch.testing.assert_close(big.encoder.input_layer.weight, small.encoder.input_layer.weight)
    wrong = ATokenModel(training.model_config(tiny_model(width=96)))
    with pytest.raises(ValueError, match="cannot be transferred"):
        training.transfer_weights(small.state_dict(), wrong)


def test_pca_init_reproduces_patch_pca():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:96] / 64.0
    img = np.stack([np.sin(4 * xx + c) * np.cos(3 * yy - c) for c in (0.0, 1.0, 2.0)], -1)
    img = np.clip((img * 0.5 + 0.5) * 255 + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    model = ATokenModel(training.model_config(tiny_model(latent=8)))
    training.init_weights(model)
    sample = data.image_sample(img)
    mean, basis = training.patch_pca(sample.feats[:, :768], 8)
    training.pca_init(model, mean, basis, constant=100.0)  # large: near-exact linear path
    ((target, rec),) = training.reconstruct_arrays(model, [img])
    pca = training.pca_reconstruct([img], 8)[0]
    from atoken.pipelines.metrics import psnr

    p_model, p_pca = psnr(target[0], rec[0]), psnr(target[0], pca)
    assert p_pca > 25
    assert abs(p_model - p_pca) < 0.2, (p_model, p_pca)


def test_pca_reconstruct_is_exact_with_all_components_and_fits_where_told():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    np.testing.assert_array_equal(training.pca_reconstruct([img], 768)[0], img)
    other = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    own = training.pca_reconstruct([img], 4)[0].astype(float)
    foreign = training.pca_reconstruct([img], 4, fit_on=[other])[0].astype(float)
    assert ((own - img) ** 2).mean() < ((foreign - img) ** 2).mean()


def test_random_text_tower():
    tower = training.RandomTextTower(32)
    e = tower.encode(["a red cube", "a red sphere", "blue dog runs"])
    assert e.shape == (3, 32)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])
    torch.testing.assert_close(training.RandomTextTower(32).encode(["a red cube"]), e[:1])


# ---------------------------------------------------------------------------------------------
# Objective wiring


def _objective(**semantic):
    loss = {"image": {"lpips": 0.0, "gram": 0.0, "perceptual": 0.0}}
    return training.Objective(loss, {"text_tower": "random:64", **semantic}, torch.device("cpu"))


def test_the_objective_can_use_effnet_lite0_features():
    from atoken.training.losses import EffNetFeatureNet

    loss = {"image": {"lpips": 1.0, "gram": 10.0, "perceptual": 0.0}}
    loss["image"]["feature_net"] = {"layout": "effnet-lite0"}
    obj = training.Objective(loss, {"text_tower": "random:64"}, torch.device("cpu"))
    nets = obj.image_loss.lpips_net, obj.image_loss.gram_net
    assert isinstance(nets[0], EffNetFeatureNet) and nets[0] is nets[1]
    assert obj.image_loss.embed_net is None and obj.image_loss.weights["gram"] == 10.0


def test_reconstruction_terms_use_the_right_channels():
    batch = fixed_batch(["image", "video", "3d"], budget=200)
    assert set(batch.kinds) == {"image", "video", "3d"}
    model = ATokenModel(training.model_config(tiny_model()))
    module = training.TrainModule(model, 0.0, 0.0, True)
    obj = _objective()
    target = batch.tokens.feats
    out = {
        "rec": target.clone(),
        "mean": torch.zeros(len(target), 32),
        "logvar": torch.zeros(len(target), 32),
        "pooled": torch.randn(batch.size, 64),
        "logit_scale": module.logit_scale,
        "logit_bias": module.logit_bias,
    }
    base = obj(out, batch, quantized=False)
    assert base["image_l1"] == 0 and base["video_l1"] == 0 and base["3d_l1"] == 0
    sl = batch.slices()
    kinds = batch.kinds
    rec = target.clone()
    for i, k in enumerate(kinds):
        if k in ("image", "3d"):
            rec[sl[i], 768:] += 1.0  # channels that images (frames 1-3) and 3D do not use
    terms = obj({**out, "rec": rec}, batch, False)
    assert terms["image_l1"] == 0 and terms["3d_l1"] == 0
    vid = kinds.index("video")
    rec[sl[vid], 2000] += 0.5  # a frame-2 channel counts for video
    terms = obj({**out, "rec": rec}, batch, False)
    n = sl[vid].stop - sl[vid].start
    assert float(terms["video_l1"]) == pytest.approx(
        0.5
        * n
        / (sum(sl[i].stop - sl[i].start for i, k in enumerate(kinds) if k == "video") * 3072),
        rel=1e-5,
    )
    # KL of a zero-mean, unit-variance posterior is zero; FSQ models have no KL
    assert float(base["kl"]) == 0.0
    assert float(obj(out, batch, True)["kl"]) == 0.0
    # semantic: SigLIP over every captioned item, with the module's scalars
    from atoken.training.losses import siglip_loss

    txt = obj.tower.encode(batch.captions)
    expected = siglip_loss(out["pooled"], txt, module.logit_scale, module.logit_bias)
    assert float(base["semantic"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_distillation_term_with_a_random_teacher():
    batch = fixed_batch(["image", "video"], budget=120)
    obj = _objective(image_mode="distill", teacher={"type": "conv", "dim": 64, "seed": 3})
    model = ATokenModel(training.model_config(tiny_model()))
    module = training.TrainModule(model, 1.0, -2.0, True)
    pooled = torch.nn.functional.normalize(torch.randn(batch.size, 64), dim=-1)
    out = {
        "rec": batch.tokens.feats,
        "mean": torch.zeros(len(batch.tokens), 32),
        "logvar": torch.zeros(len(batch.tokens), 32),
        "pooled": pooled,
        "logit_scale": module.logit_scale,
        "logit_bias": module.logit_bias,
    }
    terms = obj(out, batch, False)
    from atoken.core.patchify import unpatchify
    from atoken.training.losses import distillation_loss, image_text_logits, resize_224, siglip_loss

    img = [i for i, k in enumerate(batch.kinds) if k == "image"]
    vid = [i for i, k in enumerate(batch.kinds) if k == "video"]
    assert img and vid
    sl = batch.slices()
    txt = obj.tower.encode(batch.captions)
    pics = torch.stack(
        [
            resize_224(unpatchify(batch.tokens.feats[sl[i]], batch.tokens.coords[sl[i]])[0])
            for i in img
        ]
    )
    t_logits = image_text_logits(obj.teacher(pics), txt[img], math.log(100.0))
    s_logits = image_text_logits(pooled[img], txt[img], module.logit_scale)
    want = distillation_loss(s_logits, t_logits, 2.0) + siglip_loss(
        pooled[vid], txt[vid], module.logit_scale, module.logit_bias
    )
    assert float(terms["semantic"].detach()) == pytest.approx(float(want.detach()), rel=1e-4)
    with pytest.raises(ValueError, match="needs a semantic.teacher"):
        _objective(image_mode="distill")


def test_config_errors():
    with pytest.raises(ValueError, match="unknown training config keys"):
        training.load_train_config({"stepz": 3})
    with pytest.raises(ValueError, match="warmup_steps"):
        training.load_train_config({"steps": 10, "warmup_steps": 10})
    with pytest.raises(ValueError, match="mixed_precision"):
        training.load_train_config({"mixed_precision": "fp8"})
    cfg = training.load_train_config({"steps": 10, "warmup_steps": 1}, **{"data.token_budget": 99})
    assert cfg.data == {"token_budget": 99}


def test_stage_configs_parse():
    root = Path(__file__).parents[2] / "configs" / "train"
    files = sorted(root.glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        cfg = training.load_train_config(f)
        training.model_config(cfg.model, cfg.model_overrides)  # the model part resolves
        for src in cfg.data["sources"]:
            assert src["type"] in data.SOURCE_TYPES


# ---------------------------------------------------------------------------------------------
# Runs


def test_curriculum_every_stage_decreases_the_objective(tmp_path):
    """Stage 1 image (latent 32) -> 2 +video (latent 48) -> 3 +3D -> 4 FSQ, each from the last."""
    stages = [
        ("s1", ("image",), {"model": tiny_model(32)}),
        ("s2", ("image", "video"), {"model": tiny_model(48), "lr": 1e-3, "min_lr": 1e-4}),
        ("s3", ("image", "video", "3d"), {"model": tiny_model(48), "lr": 1e-3, "min_lr": 1e-4}),
        # fine-tuning through the straight-through FSQ wants a smaller step
        (
            "s4",
            ("image", "video", "3d"),
            {
                "model": tiny_model(48, quantizer=True),
                "lr": 1e-3,
                "min_lr": 1e-4,
                "loss": {"weights": {"kl": 0.0}},
            },
        ),
    ]
    previous = None
    for name, kinds, over in stages:
        cfg = base_config(tmp_path, name, kinds, **over)
        if previous is not None:
            cfg["init_from"] = str(previous)
        trainer = training.Trainer(training.load_train_config(cfg))
        batch = fixed_batch(kinds, budget=192)
        before = trainer.evaluate_batch(batch)
        result = trainer.fit()
        after = trainer.evaluate_batch(batch)
        # The full objective falls along the run (mean of the last third below the first) ...
        totals = [r["total"] for r in result.history]
        third = len(totals) // 3
        assert np.mean(totals[-third:]) < np.mean(totals[:third]), (name, totals)
        # ... and on a fixed batch (posterior mean, no sampling) the stage's new task improves:
        # the new modality's L1, or for FSQ the L1 of every modality through the quantizer.
        new = {
            "s1": ["image_l1"],
            "s2": ["video_l1"],
            "s3": ["3d_l1"],
            "s4": ["image_l1", "video_l1", "3d_l1"],
        }[name]
        assert sum(after[k] for k in new) < sum(before[k] for k in new), (name, before, after)
        steps = over.get("steps", 30)
        assert result.steps == steps and len(result.history) == steps
        rows = training.read_metrics(result.output_dir)
        assert rows[-1]["step"] == steps and "lr" in rows[-1]
        assert list((result.output_dir / "tb").glob("events.*"))
        model = training.load_trained(result.checkpoint)
        assert model.is_discrete == (name == "s4")
        assert model.config.latent_channels == (32 if name == "s1" else 48)
        # the exported (EMA) weights carry the EMA of the learned logit scale in their config
        assert model.config.logit_scale == pytest.approx(
            float(trainer.ema.shadow["logit_scale"]), abs=1e-5
        )
        previous = result.checkpoint


def test_finetune_golden_tiny_c_in_the_official_format(tmp_path):
    cfg = base_config(
        tmp_path,
        "ft",
        ("image",),
        model="tiny-c",
        init_from=str(GOLDEN_TINY_C),
        init_config="tiny-c",
        steps=4,
        warmup_steps=1,
        semantic={"text_tower": None},
    )
    trainer = training.Trainer(training.load_train_config(cfg))
    enc_lr = [
        g["lr"]
        for g in trainer.optimizer.param_groups
        if any(p is trainer.raw_module.model.encoder.input_layer.weight for p in g["params"])
    ]
    dec_lr = [
        g["lr"]
        for g in trainer.optimizer.param_groups
        if any(p is trainer.raw_module.model.decoder.out_layer.weight for p in g["params"])
    ]
    assert enc_lr == [pytest.approx(0.1 * dec_lr[0])]  # x0.1 for a pretrained encoder
    result = trainer.fit()
    tuned = load(result.raw_checkpoint, "tiny-c")  # plain official loader, strict keys
    original = read_state_dict(GOLDEN_TINY_C)
    state = tuned.state_dict()
    assert set(state) == set(original)
    assert not torch.equal(state["decoder.out_layer.weight"], original["decoder.out_layer.weight"])
    x = data.SyntheticSource("image").draw(np.random.default_rng(0))
    tok = SparseTensor(
        x.feats, torch.cat([torch.zeros(len(x.coords), 1, dtype=torch.int32), x.coords], 1)
    )
    rec, _ = tuned.reconstruct(tok)
    assert rec.feats.shape == tok.feats.shape and torch.isfinite(rec.feats).all()


def test_resume_continues_exactly(tmp_path):
    full = base_config(
        tmp_path, "full", ("image", "video"), steps=6, warmup_steps=1, save_every=3, keep_states=5
    )
    a = training.train_from_config(full)
    state3 = a.output_dir / "state" / "step-0000003"
    assert (state3 / "trainer.pt").is_file()
    b = training.train_from_config(full, output_dir=str(tmp_path / "resumed"), resume=str(state3))
    wa, wb = read_state_dict(a.raw_checkpoint), read_state_dict(b.raw_checkpoint)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)
    ea, eb = read_state_dict(a.checkpoint), read_state_dict(b.checkpoint)
    torch.testing.assert_close(ea["proj.weight"], eb["proj.weight"], rtol=0, atol=0)
    assert b.steps == 6 and len(b.history) == 3


def test_bf16_and_gradient_checkpointing_run(tmp_path):
    cfg = base_config(
        tmp_path,
        "bf16",
        ("image",),
        steps=3,
        warmup_steps=1,
        mixed_precision="bf16",
        gradient_checkpointing=True,
    )
    result = training.train_from_config(cfg)
    assert math.isfinite(result.last_loss)
    # a later run in the same process may switch back to full precision
    result = training.train_from_config(
        base_config(tmp_path, "fp32", ("image",), steps=2, warmup_steps=1)
    )
    assert math.isfinite(result.last_loss)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    training.set_local_rank_env(rank, world, port)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    trainer = training.Trainer(training.load_train_config(cfg))
    assert trainer.world == world and trainer.rank == rank
    result = trainer.fit()
    state = {k: v.detach().clone() for k, v in trainer.raw_module.state_dict().items()}
    torch.save({"state": state, "sources": result.sources_seen}, Path(out) / f"rank{rank}.pt")
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def test_two_process_data_parallel(tmp_path):
    import torch.multiprocessing as mp

    cfg = base_config(
        tmp_path, "ddp", ("image", "3d"), steps=5, warmup_steps=1, record_sources=True
    )
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert set(r0["state"]) == set(r1["state"])
    for k in r0["state"]:
        torch.testing.assert_close(r0["state"][k], r1["state"][k], rtol=0, atol=0, msg=k)
    assert r0["sources"] and r1["sources"]
    assert set(r0["sources"]).isdisjoint(r1["sources"])  # each rank saw its own data
    # and the weights did move away from the shared initialisation
    init = ATokenModel(training.model_config(cfg["model"]))
    training.init_weights(init, seed=0)
    moved = r0["state"]["model.decoder.out_layer.weight"] - init.decoder.out_layer.weight
    assert moved.abs().max() > 0
    assert training.load_trained(Path(cfg["output_dir"]) / "model.safetensors") is not None


def test_shared_encoder_checkpoint_round_trip(tmp_path):
    cfg = training.model_config(tiny_model(48))
    base = ATokenModel(cfg)
    training.init_weights(base, seed=1)
    discrete = ATokenModel(training.model_config(tiny_model(48, quantizer=True)))
    training.init_weights(discrete, seed=2)
    discrete.encoder.load_state_dict(base.encoder.state_dict())
    training.save_model(base, tmp_path / "base.safetensors")
    part = training.save_model(
        discrete, tmp_path / "d.safetensors", encoder_from="base.safetensors"
    )
    stored = read_state_dict(part)
    assert stored and not any(k.startswith("encoder.") for k in stored)
    loaded = training.load_trained(part)
    assert loaded.is_discrete
    for k, v in discrete.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0, msg=k)
    (tmp_path / "base.safetensors").unlink()
    with pytest.raises(ValueError, match="missing"):
        training.load_trained(part)


def test_next_stage_starts_from_the_learned_logit_scalars(tmp_path):
    first = training.train_from_config(
        base_config(tmp_path, "a", ("image",), steps=3, warmup_steps=1)
    )
    learned = training.trained_config(first.checkpoint)
    trainer = training.Trainer(
        training.load_train_config(
            base_config(
                tmp_path, "b", ("image",), steps=2, warmup_steps=1, init_from=str(first.checkpoint)
            )
        )
    )
    assert float(trainer.raw_module.logit_scale) == pytest.approx(learned.logit_scale)
    assert float(trainer.raw_module.logit_bias) == pytest.approx(learned.logit_bias)


def test_trunk_grad_scale_only_scales_the_semantic_gradient():
    batch = fixed_batch(["image"], budget=40)
    grads = {}
    for a in (1.0, 0.25, 0.0):
        torch.manual_seed(0)
        model = ATokenModel(training.model_config(tiny_model()))
        training.init_weights(model, seed=0)
        module = training.TrainModule(model, 0.0, 0.0, True, trunk_grad_scale=a)
        out = module(batch.tokens.feats, batch.tokens.coords, sample=False)
        out["pooled"].sum().backward()  # a purely semantic loss
        g = model.encoder.blocks[0].mlp.mlp[0].weight.grad
        grads[a] = torch.zeros(1) if g is None else g.clone()
        assert model.encoder.head.mlp.mlp[0].weight.grad.abs().sum() > 0  # the head always learns
    torch.testing.assert_close(grads[0.25], 0.25 * grads[1.0])
    assert grads[0.0].abs().max() == 0


def test_train_multiprocess_returns_rank0_result(tmp_path):
    cfg = base_config(tmp_path, "mp", ("image",), steps=2, warmup_steps=1)
    result = training.train_multiprocess(cfg, num_processes=2)
    assert result.steps == 2 and len(result.history) == 2
    assert training.load_trained(result.checkpoint).config.latent_channels == 32
    with pytest.raises(ValueError, match="num_processes"):
        training.train_multiprocess(cfg, num_processes=0)


def test_fsq_rotation_init_spreads_the_latent_and_keeps_the_decoder_input():
    from atoken.core.config import ATokenConfig
    from atoken.core.quantizers import fsq_bound

    torch.manual_seed(0)
    model = ATokenModel(ATokenConfig.from_dict(tiny_model(latent=48, quantizer=True)))
    training.init_weights(model, 0)
    # a latent with very unequal channel energies, as a PCA-started encoder gives
    hidden = torch.randn(4000, 64)
    with torch.no_grad():
        model.proj.weight[:48] *= torch.logspace(1, -1, 48)[:, None]
        lat = model.proj(hidden)[:, :48]
        before = model.decoder.input_layer(lat)
    spread = lat.pow(2).mean(0)
    assert float(spread.max() / spread.min()) > 100
    sigma = training.fsq_rotation_init(model, lat, std=0.01, seed=1)
    assert sigma == pytest.approx(float(lat.pow(2).mean().sqrt()), rel=1e-5)
    with torch.no_grad():
        z = model.proj(hidden)[:, :48]
        levels = model.quantizer._levels(z.device).repeat(8)
        codes = fsq_bound(z, levels) / (levels // 2)  # FSQ before rounding
        after = model.decoder.input_layer(codes)
    rms = z.pow(2).mean(0).sqrt()
    assert float(z.pow(2).mean().sqrt()) == pytest.approx(0.01, rel=1e-4)
    assert float(rms.max() / rms.min()) < 4  # 100 before: the rotation spreads the energy
    # in FSQ's near-linear range the decoder sees what it saw before
    err = (after - before).norm() / before.norm()
    assert float(err) < 0.01
    with pytest.raises(ValueError, match="quantizer"):
        training.fsq_rotation_init(ATokenModel(ATokenConfig.from_dict(tiny_model())), lat)


def test_encoder_train_frames_trains_only_the_later_frames_columns(tmp_path):
    """Issue 16: a frozen encoder whose input columns for frames 1-3 still learn leaves every
    other encoder weight, and so every image encoding, bit-exact."""
    first = training.train_from_config(
        base_config(tmp_path, "a", ("image",), steps=2, warmup_steps=1)
    )
    cfg = base_config(
        tmp_path,
        "b",
        ("image", "video"),
        steps=6,
        warmup_steps=1,
        init_from=str(first.checkpoint),
        freeze_encoder=True,
        encoder_train_frames=[1, 2, 3],
        weight_decay=0.5,  # the partly trained weight must not decay either
    )
    result = training.train_from_config(cfg)
    before, after = (
        training.load_trained(first.checkpoint),
        training.load_trained(result.checkpoint),
    )
    w0, w1 = before.encoder.input_layer.weight, after.encoder.input_layer.weight
    assert torch.equal(w0[:, :768], w1[:, :768])
    assert not torch.equal(w0[:, 768:], w1[:, 768:])
    a, b = before.encoder.state_dict(), after.encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "input_layer.weight")
    image = fixed_batch(["image"]).tokens
    with torch.no_grad():
        e0, e1 = before.encode(image), after.encode(image)
    assert torch.equal(e0.hidden, e1.hidden) and torch.equal(e0.pooled, e1.pooled)
    mask = training.input_frame_mask(after, [1, 2, 3])
    assert mask.shape == w1.shape and mask[:, 768:].all() and not mask[:, :768].any()
    with pytest.raises(ValueError, match="frames"):
        training.input_frame_mask(after, [4])
    with pytest.raises(ValueError, match="freeze_encoder"):
        training.load_train_config(base_config(tmp_path, "c", encoder_train_frames=[1]))


def test_temporal_mix_init_encodes_a_patch_as_one_mixed_picture():
    model = ATokenModel(training.model_config(tiny_model()))
    training.init_weights(model, 0)
    with torch.no_grad():  # an encoder that reads frame 0 only, as a PCA-started one nearly does
        model.encoder.input_layer.weight[:, 768:] = 0.0
    mixed = ATokenModel(model.config)
    mixed.load_state_dict(model.state_dict())
    w = [-0.75, 0.25, 0.5]
    training.temporal_mix_init(mixed, w)
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.uniform(-1, 1, (4, 32, 32, 3))).float()
    picture = frames[0] + sum(wk * frames[k] for k, wk in enumerate(w, start=1))

    def hidden(m, item):
        return m.encode(data.collate([item]).tokens).hidden

    with torch.no_grad():
        image = data.image_sample(frames[0])
        assert torch.equal(hidden(model, image), hidden(mixed, image))  # images: bit-exact
        still = data.video_sample(frames[:1].expand(4, -1, -1, -1))
        torch.testing.assert_close(hidden(mixed, still), hidden(model, image), atol=1e-4, rtol=0)
        video = data.video_sample(frames)
        as_picture = data.image_sample(picture)
        torch.testing.assert_close(
            hidden(mixed, video), hidden(model, as_picture), atol=1e-4, rtol=0
        )
    with pytest.raises(ValueError, match="summing to 0"):
        training.temporal_mix_init(mixed, [0.5, 0.25, 0.5])
    with pytest.raises(ValueError, match="3 weights"):
        training.temporal_mix_init(mixed, [-1.0, 1.0])
