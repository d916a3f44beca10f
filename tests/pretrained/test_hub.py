"""load_pretrained: bundled and cached official checkpoints, clear errors, downloads."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

import atoken
from atoken.pretrained import registry
from atoken.pretrained.hub import available_models, load_pretrained, load_pretrained_gs, locate

from ..conftest import GOLDEN


def test_official_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATOKEN_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        load_pretrained("so-c")
    # a file in the cache under the official name loads with its preset's structure
    state = load_file(str(GOLDEN / "weights/tiny_c.safetensors"))
    torch.save(state, tmp_path / "atoken-soc.pt")
    monkeypatch.setitem(atoken.core.config.PRESETS, "so-c", atoken.core.config.PRESETS["tiny-c"])
    model = load_pretrained("so-c")
    assert model.config.latent_channels == 8
    assert "atoken-soc.pt" in available_models()["so-c"]


def test_download_flag_uses_the_downloader(tmp_path, monkeypatch):
    monkeypatch.setenv("ATOKEN_HOME", str(tmp_path))
    calls = []

    def fake_download(name, **kw):
        calls.append(name)
        dest = tmp_path / "3d_decode_gs.pt"
        shutil.copy(GOLDEN / "weights/tiny_gs.safetensors", tmp_path / "gs.safetensors")
        torch.save(load_file(str(tmp_path / "gs.safetensors")), dest)
        return dest

    monkeypatch.setattr("atoken.hub.download", fake_download)
    monkeypatch.setitem(atoken.core.config.PRESETS, "gs", atoken.core.config.PRESETS["tiny-gs"])
    gs = load_pretrained_gs("so-c", download=True)  # the decoder paired with So/C
    assert calls == ["gs"] and isinstance(gs, atoken.GaussianDecoder)


def test_one_table_says_what_goes_together():
    assert registry.sibling("atoken-tiny", True) == "atoken-tiny-d"
    assert registry.sibling("atoken-tiny-d", False) == "atoken-tiny"
    assert registry.sibling("so-c-s1", True) == "so-d" and registry.sibling("so-d", False) == "so-c"
    assert registry.gaussian_decoder_for("so-c-s2") == "gs"
    assert registry.gaussian_decoder_for("atoken-tiny-d") == "atoken-tiny-gs"
    assert registry.generator_for("atoken-tiny") == "atoken-tiny-gen"
    assert registry.MODELS["atoken-tiny-gen"].tokenizer == "atoken-tiny"
    # every sibling and pairing names an entry of the right role
    for spec in registry.MODELS.values():
        for other in (spec.continuous, spec.discrete):
            assert other is None or registry.MODELS[other].role == "autoencoder"
        if spec.gaussian_decoder:
            assert registry.MODELS[spec.gaussian_decoder].role == "gaussian-decoder"
        if spec.generator:
            assert registry.MODELS[spec.generator].role == "generator"
    # the downloader's file list is the table's official entries
    assert atoken.pretrained.download.OFFICIAL_WEIGHTS["so-c-s2"].filename == "atoken-soc-s2.pt"
    assert set(atoken.pretrained.download.OFFICIAL_WEIGHTS) == set(
        registry.names(source="official")
    )


def test_each_loader_returns_one_kind():
    with pytest.raises(ValueError, match="load_pretrained_gs"):
        load_pretrained("atoken-tiny-gs")
    with pytest.raises(ValueError, match="flow.load_generator"):
        load_pretrained("atoken-tiny-gen")
    with pytest.raises(ValueError, match="unknown model"):
        load_pretrained_gs("so-x")
    a, b = load_pretrained("random-tiny"), load_pretrained("random-tiny")
    assert isinstance(a, atoken.ATokenModel) and a.config.name == "random-tiny"
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # fixed seed
    assert isinstance(load_pretrained_gs("random-tiny"), atoken.GaussianDecoder)


def test_unknown_and_missing_bundled(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        locate("so-x")
    monkeypatch.setattr("atoken.pretrained.hub.ASSETS", tmp_path)
    with pytest.raises(FileNotFoundError, match="bundled"):
        locate("atoken-tiny")


def test_config_travels_in_safetensors_metadata(tmp_path):
    import json

    model = atoken.load(None, "tiny-d")
    path = atoken.save_checkpoint(
        model,
        tmp_path / "m.safetensors",
        metadata={"atoken_config": json.dumps(model.config.to_dict())},
    )
    again = atoken.load(path)  # no config argument
    assert again.config == model.config
    with pytest.raises(ValueError, match="no config"):
        atoken.load(atoken.save_checkpoint(model, tmp_path / "plain.safetensors"))


def test_variant_sharing_an_encoder_loads_whole(tmp_path):
    """A bundled variant may store only its decoder and name the file holding the encoder."""
    import json

    from safetensors.torch import save_file

    base = atoken.load(None, "tiny-d")
    atoken.save_checkpoint(base, tmp_path / "base.safetensors")
    variant = atoken.load(None, "tiny-d")
    state = {k: v for k, v in variant.state_dict().items() if not k.startswith("encoder.")}
    meta = {
        "atoken_config": json.dumps(variant.config.to_dict()),
        "encoder_from": "base.safetensors",
    }
    save_file(state, str(tmp_path / "variant.safetensors"), metadata=meta)
    loaded = atoken.load(tmp_path / "variant.safetensors")
    assert torch.equal(loaded.encoder.input_layer.weight, base.encoder.input_layer.weight)
    assert torch.equal(loaded.decoder.out_layer.weight, variant.decoder.out_layer.weight)
    (tmp_path / "base.safetensors").unlink()
    with pytest.raises(ValueError, match="shares its encoder"):
        atoken.load(tmp_path / "variant.safetensors")
