"""Loading: presets vs the official parameter manifests, strict errors, file formats, dtypes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import atoken
from atoken.core.checkpoint import CheckpointError, read_state_dict

from ..conftest import GOLDEN

MANIFESTS = [
    ("atoken-soc.json", "so-c", "load"),
    ("atoken-sod.json", "so-d", "load"),
    ("atoken-soc-s1.json", "so-c-s1", "load"),
    ("3d_decode_gs.json", "gs", "gs"),
]


@pytest.mark.parametrize("manifest,preset,kind", MANIFESTS)
def test_meta_model_matches_official_manifest(manifest, preset, kind):
    m = json.loads((GOLDEN / "param_manifests" / manifest).read_text())
    loader = atoken.load if kind == "load" else atoken.load_gaussian_decoder
    model = loader(None, preset, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = {
        k: v["shape"]
        for k, v in m["state_dict"].items()
        if kind == "load" or v.get("used_by_forward_decoder")
    }
    assert ours == theirs
    if kind == "load":
        assert sum(v.numel() for v in model.state_dict().values()) == m["num_elements"]


def test_so_c_s2_shares_so_c_structure():
    a = atoken.load(None, "so-c-s2", device="meta").state_dict()
    b = atoken.load(None, "so-c", device="meta").state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_gs_checkpoint_lpips_keys_are_ignored(tmp_path):
    state = load_file(str(GOLDEN / "weights/tiny_gs.safetensors"))
    state["lpips_loss.net.slice1.0.weight"] = torch.zeros(64, 3, 3, 3)
    state["lpips_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    path = tmp_path / "gs.pt"
    torch.save(state, path)
    gs = atoken.load_gaussian_decoder(path, "tiny-gs")
    assert torch.equal(gs.input_layer.weight, state["input_layer.weight"])


def test_strict_loading_names_missing_and_unexpected(tmp_path):
    state = load_file(str(GOLDEN / "weights/tiny_c.safetensors"))
    del state["decoder.out_norm.weight"]
    state["encoder.extra_thing"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as e:
        atoken.load(path, "tiny-c")
    assert "decoder.out_norm.weight" in str(e.value) and "encoder.extra_thing" in str(e.value)


def test_wrong_config_gives_shape_mismatch():
    with pytest.raises(CheckpointError, match="shape mismatches"):
        atoken.load(GOLDEN / "weights/tiny_c.safetensors", "tiny-d")


def test_pt_files_load_with_weights_only_and_prefixes(tmp_path):
    state = load_file(str(GOLDEN / "weights/tiny_c.safetensors"))
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v.to(torch.bfloat16) for k, v in state.items()}, path)
    model = atoken.load(path, "tiny-c")
    assert model.dtype == torch.float32
    assert torch.equal(model.proj.weight, state["proj.weight"].to(torch.bfloat16).float())


class Evil:
    """An arbitrary object: unpickling it would run module code."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(path)


def test_missing_file_and_bad_config(tmp_path):
    with pytest.raises(FileNotFoundError):
        atoken.load(tmp_path / "nope.pt", "tiny-c")
    with pytest.raises(ValueError, match="preset"):
        atoken.load(None, "so-x")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        atoken.load(junk, "tiny-c")


def test_official_yaml_matches_preset():
    assert (
        atoken.config_from_yaml(GOLDEN / "configs/tiny_c.yaml").encoder
        == atoken.PRESETS["tiny-c"].encoder
    )
    d = atoken.config_from_yaml(GOLDEN / "configs/tiny_d.yaml")
    assert d.use_quantizer and d.codebook_size == 4096 and d.quantizer_num_codebooks == 8
    gs = atoken.config_from_yaml(GOLDEN / "configs/tiny_gs.yaml")
    assert isinstance(gs, atoken.GSDecoderConfig) and gs.channels == 64 and gs.num_gaussians == 32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_runs_with_float32_islands(dtype):
    t = load_file(str(GOLDEN / "cases/c_image.safetensors"))
    model = atoken.load(GOLDEN / "weights/tiny_c.safetensors", "tiny-c", dtype=dtype)
    assert model.dtype == dtype
    x = atoken.tokenize([t["input/item0"]])
    enc = model.encode(x)
    assert enc.mean.dtype == torch.float32  # posterior in float32
    rec = model.decode(enc.latent())
    assert rec.feats.dtype == dtype
    # close to the float32 golden within half-precision tolerance
    err = (rec.feats.float() - t["dec/rec_mean"]).abs().max().item()
    assert err < 0.25, err


def test_save_checkpoint_round_trip(tmp_path):
    model = atoken.load(None, "tiny-d")
    path = atoken.save_checkpoint(model, tmp_path / "m.safetensors")
    again = atoken.load(path, "tiny-d")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
