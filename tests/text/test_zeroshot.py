"""Zero-shot scoring, labels, classify on the tiny model, retrieval, evaluation and figures."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import imageio.v2 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import save_file

import atoken
from atoken.text.towers import load_text_tower, make_tiny_siglip2
from atoken.text.zeroshot import (
    MAX_LABELS,
    TEMPLATES,
    classify,
    classify_features,
    classify_file,
    confusion_figure,
    encode_items,
    item_modality,
    label_embeddings,
    load_item,
    parse_labels,
    probability_figure,
    rank_items,
    rank_texts,
    read_labelled_items,
    sigmoid_probs,
    softmax_probs,
    templates_for,
    zero_shot_eval,
)

SCALE, BIAS = 4.8438, -15.5625
LABELS = ["dog", "cat", "red car", "bird"]


@pytest.fixture(scope="module")
def model():
    return atoken.load(None, "tiny-c")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, model):
    # the text width must equal the image feature width of the encoder
    width = model.config.encoder.channels
    return make_tiny_siglip2(tmp_path_factory.mktemp("siglip2"), width=width)


@pytest.fixture(scope="module")
def tower(tiny_dir):
    return load_text_tower(str(tiny_dir))


@pytest.fixture(scope="module")
def minilm():
    return load_text_tower("minilm")


def _image(h=40, w=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(h, w, 3, generator=g) * 2 - 1).numpy()


def _voxels(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.randperm(64**3, generator=g)[:n]
    xyz = torch.stack([coords // 4096, coords // 64 % 64, coords % 64], 1).sort(0).values
    return torch.rand(n, 768, generator=g).numpy(), xyz.int().numpy()


def _reference_text_features(tiny_dir, labels, templates):
    """Template ensembles computed straight from transformers, cleaning done by hand."""
    from transformers import AutoTokenizer, Siglip2TextModel

    tok = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    tok.padding_side = "right"
    text_model = Siglip2TextModel.from_pretrained(tiny_dir, local_files_only=True).eval()
    out = []
    for label in labels:
        # the only punctuation in our templates is "." and "-": cleaning = drop them, lower
        prompts = [t.format(label).replace(".", "").replace("-", "").lower() for t in templates]
        ids = tok(
            prompts, padding="max_length", max_length=64, truncation=True, return_tensors="pt"
        )
        with torch.no_grad():
            e = F.normalize(text_model(input_ids=ids["input_ids"]).pooler_output, dim=-1)
        out.append(F.normalize(e.mean(0), dim=0))
    return torch.stack(out)


class OracleEncoder(torch.nn.Module):
    """Stands in for a trained model: the dominant colour of an item picks a class embedding."""

    def __init__(self, class_embeddings, text_tower):
        super().__init__()
        self.class_embeddings = class_embeddings
        self.config = SimpleNamespace(text_tower=text_tower, logit_scale=SCALE, logit_bias=BIAS)
        self.logit_scale, self.logit_bias = SCALE, BIAS

    def encode(self, x):
        rgb = torch.stack([x.feats[s].reshape(-1, 3).mean(0) for s in x.item_slices()])
        return SimpleNamespace(pooled=self.class_embeddings[rgb.argmax(1)])


# --- scoring ---------------------------------------------------------------------------------


def test_sigmoid_and_softmax_match_hand_values():
    img = torch.tensor([[3.0, 0.0]])  # not unit length: cosine is taken
    txt = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.6, 0.8]])
    cos = [1.0, 0.0, 0.6]
    want = [1 / (1 + math.exp(-(math.exp(SCALE) * c + BIAS))) for c in cos]
    torch.testing.assert_close(sigmoid_probs(img, txt, SCALE, BIAS)[0], torch.tensor(want))
    logits = [math.exp(SCALE) * c for c in cos]
    z = sum(math.exp(v - max(logits)) for v in logits)
    soft = [math.exp(v - max(logits)) / z for v in logits]
    torch.testing.assert_close(softmax_probs(img, txt, SCALE)[0], torch.tensor(soft))
    assert math.exp(SCALE) == pytest.approx(126.95, abs=0.01)
    with pytest.raises(ValueError, match="same C"):
        sigmoid_probs(img, torch.ones(2, 3), SCALE, BIAS)


# --- labels ----------------------------------------------------------------------------------


def test_parse_labels_splits_cleans_and_deduplicates():
    assert parse_labels("cat, dog\nbird,,  red   car \r\n cat") == ["cat", "dog", "bird", "red car"]
    assert parse_labels(["golden retriever", " tabby cat "]) == ["golden retriever", "tabby cat"]
    assert parse_labels("猫, собака\nقطة, 🙂") == ["猫", "собака", "قطة", "🙂"]


def test_parse_labels_rejects_bad_input():
    for empty in ("", "  ,\n , ", []):
        with pytest.raises(ValueError, match="no labels"):
            parse_labels(empty)
    many = ", ".join(f"class {i}" for i in range(500))
    with pytest.raises(ValueError, match=f"500 labels; at most {MAX_LABELS}"):
        parse_labels(many)
    assert len(parse_labels(", ".join(f"c{i}" for i in range(MAX_LABELS)))) == MAX_LABELS
    with pytest.raises(ValueError, match="300 characters long; the limit is 200"):
        parse_labels("dog, " + "x" * 300)
    with pytest.raises(ValueError, match="strings"):
        parse_labels(["dog", 3])


def test_templates_validation():
    assert templates_for("3d") == list(TEMPLATES["3d"])
    assert templates_for(None) == list(TEMPLATES["image"])
    assert templates_for("video", ["{}"]) == ["{}"]
    with pytest.raises(ValueError, match="exactly one"):
        templates_for("image", ["a photo"])
    with pytest.raises(ValueError, match="unknown modality"):
        templates_for("audio")


def test_label_embeddings_are_the_renormalised_template_mean(tower, tiny_dir):
    got = label_embeddings(LABELS, tower, modality="image")
    want = _reference_text_features(tiny_dir, LABELS, TEMPLATES["image"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    other = label_embeddings(LABELS, tower, modality="3d")
    assert not torch.allclose(got, other, atol=1e-3)  # the modality picks the templates


def test_max_prompts_keeps_the_first_templates(tower):
    image = list(TEMPLATES["image"])
    capped = label_embeddings(LABELS, tower, modality="image", max_prompts=9)  # 9 // 4 = 2
    torch.testing.assert_close(capped, label_embeddings(LABELS, tower, templates=image[:2]))
    one = label_embeddings(LABELS, tower, modality="image", max_prompts=1)
    torch.testing.assert_close(one, label_embeddings(LABELS, tower, templates=image[:1]))
    with pytest.raises(ValueError, match="max_prompts"):
        label_embeddings(LABELS, tower, max_prompts=0)


# --- classify --------------------------------------------------------------------------------


def test_classify_image_matches_the_formula_by_hand(model, tower, tiny_dir):
    img = _image()
    probs = classify(model, img, LABELS, text_tower=tower)
    assert list(probs) == sorted(probs, key=probs.get, reverse=True)
    assert set(probs) == set(LABELS)

    with torch.no_grad():
        pooled = F.normalize(model.encode(atoken.tokenize([img])).pooled.float(), dim=-1)[0]
    text = _reference_text_features(tiny_dir, LABELS, TEMPLATES["image"])
    for label, t in zip(LABELS, text):
        cos = float(pooled @ t)
        want = 1 / (1 + math.exp(-(math.exp(SCALE) * cos + BIAS)))
        # exp(scale) ~ 127 amplifies float32 noise (text batches differ): allow 1e-3 on logits
        assert probs[label] == pytest.approx(want, rel=1e-3, abs=1e-9)

    soft = classify(model, img, ", ".join(LABELS), text_tower=tower, kind="softmax")
    logits = [math.exp(SCALE) * float(pooled @ t) for t in text]
    z = sum(math.exp(v - max(logits)) for v in logits)
    for label, v in zip(LABELS, logits):
        assert soft[label] == pytest.approx(math.exp(v - max(logits)) / z, rel=2e-3, abs=1e-6)
    assert sum(soft.values()) == pytest.approx(1.0, abs=1e-5)


def test_classify_video_and_3d_use_their_own_templates(model, tower):
    video = np.stack([_image(32, 32, seed=i) for i in range(8)])
    voxels = _voxels()
    assert item_modality(_image()) == "image"
    assert item_modality(video) == "video"
    assert item_modality(voxels) == "3d"
    assert item_modality(atoken.tokenize_3d(*voxels)) == "3d"
    for item, tokens, modality in [
        (video, atoken.tokenize([video]), "video"),
        (voxels, atoken.tokenize_3d(*voxels), "3d"),
    ]:
        got = classify(model, item, LABELS, text_tower=tower)
        with torch.no_grad():
            pooled = model.encode(tokens).pooled
        want = classify_features(pooled, LABELS, tower, SCALE, BIAS, modality)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-9)
        image_view = classify_features(pooled, LABELS, tower, SCALE, BIAS, "image")
        assert got != pytest.approx(image_view, rel=1e-3, abs=1e-12)


def test_classify_takes_the_text_tower_from_the_config(model, tower, tiny_dir):
    paired = atoken.load(
        model.state_dict(), dataclasses.replace(model.config, text_tower=str(tiny_dir))
    )
    img = _image(seed=3)
    assert classify(paired, img, LABELS) == pytest.approx(
        classify(model, img, LABELS, text_tower=tower)
    )
    unpaired = atoken.load(model.state_dict(), dataclasses.replace(model.config, text_tower=None))
    with pytest.raises(ValueError, match="text_tower"):
        classify(unpaired, img, LABELS)


def test_classify_rejects_bad_labels_and_mismatched_towers(model, tower, minilm):
    img = _image()
    with pytest.raises(ValueError, match="no labels"):
        classify(model, img, " , ", text_tower=tower)
    with pytest.raises(ValueError, match="at most 200"):
        classify(model, img, ",".join(f"c{i}" for i in range(500)), text_tower=tower)
    with pytest.raises(ValueError, match="limit is 200"):
        classify(model, img, "a" * 201, text_tower=tower)
    with pytest.raises(ValueError, match="duplicate"):
        classify(model, img, ["dog", "dog"], text_tower=tower)
    with pytest.raises(ValueError, match="384-dim.*96-dim"):
        classify(model, img, LABELS, text_tower=minilm)
    with pytest.raises(ValueError, match="one item"):
        classify_features(torch.ones(2, 96), LABELS, tower, SCALE, BIAS)


def test_non_latin_labels_work_with_both_towers(model, tower, minilm):
    labels = parse_labels("猫, собака, قطة, 🙂, chien")
    probs = classify(model, _image(), labels, text_tower=tower)  # unknown chars -> <unk>
    assert set(probs) == set(labels)
    feature = F.normalize(torch.randn(384), dim=0)
    probs = classify_features(feature, labels, minilm, SCALE, BIAS, "image")
    assert set(probs) == set(labels)
    assert all(0.0 <= p <= 1.0 and math.isfinite(p) for p in probs.values())


def test_encode_items_keeps_order_and_does_not_mix_items(model):
    items = [_image(48, 64, seed=1), _voxels(seed=2), _image(32, 32, seed=3)]
    batched = encode_items(model, items, batch_size=8)
    alone = torch.cat([encode_items(model, [x]) for x in items])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(batched[0], batched[2], atol=1e-3)
    with pytest.raises(ValueError, match="one batch item"):
        encode_items(model, [atoken.tokenize([_image(), _image(seed=1)])])


# --- retrieval -------------------------------------------------------------------------------


def test_rank_items_and_texts_find_the_matching_one(minilm):
    feats = minilm.encode(["a photo of a dog", "a red sports car", "a bowl of hot soup"])
    order, scores = rank_items("a fast automobile", feats, minilm)
    assert order.tolist()[0] == 1
    assert torch.all(scores[:-1] >= scores[1:])
    query = minilm.encode(["a fast automobile"])[0]
    torch.testing.assert_close(scores, (feats @ query)[order])

    order, scores = rank_texts(feats[2], ["a car", "tomato soup", "a puppy"], minilm)
    assert order.tolist()[0] == 1
    assert torch.all(scores[:-1] >= scores[1:])
    with pytest.raises(ValueError, match="empty"):
        rank_items("  ", feats, minilm)


# --- files and evaluation --------------------------------------------------------------------

COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def _write_dataset(root):
    """Six items: one green-folder image is red, so the expected accuracy is 5/6."""

    def png(path, colour):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 24), colour).save(path)

    png(root / "blue" / "b1.png", COLOURS["blue"])
    png(root / "blue" / "b2.png", COLOURS["blue"])
    png(root / "green" / "g1.png", COLOURS["green"])
    png(root / "green" / "g2.png", COLOURS["red"])
    frames = np.zeros((16, 32, 32, 3), np.uint8)
    frames[..., 0] = 230
    (root / "red").mkdir()
    iio.mimwrite(root / "red" / "r1.mp4", frames, fps=8, macro_block_size=16)
    feats = np.zeros((20, 768), np.float16)
    feats[:, 0::3] = 1.0  # red voxels, features in [0, 1] as the official packing writes
    coords = np.stack([np.arange(20), np.arange(20), np.zeros(20)], 1).astype(np.int32)
    save_file({"feats": feats, "coords": coords}, str(root / "red" / "r2.safetensors"))
    return [
        ("blue/b1.png", "blue"),
        ("blue/b2.png", "blue"),
        ("green/g1.png", "green"),
        ("green/g2.png", "green"),
        ("red/r1.mp4", "red"),
        ("red/r2.safetensors", "red"),
    ]


def test_zero_shot_eval_on_a_folder_and_on_listings(tmp_path, tower):
    rows = _write_dataset(tmp_path / "data")
    classes = ["blue", "green", "red"]
    # the oracle picks the class of the dominant channel, so order its embeddings R, G, B
    oracle = OracleEncoder(
        label_embeddings(["red", "green", "blue"], tower, templates=["{}"]), tower
    )
    calls = []
    result = zero_shot_eval(
        oracle,
        tmp_path / "data",
        templates=["{}"],
        batch_size=4,
        progress=lambda *a: calls.append(a),
    )
    assert result.labels == classes
    assert result.accuracy == pytest.approx(5 / 6)
    assert result.top5_accuracy is None
    np.testing.assert_array_equal(result.confusion, [[2, 0, 0], [0, 1, 1], [0, 0, 2]])
    assert [p.name for p in result.paths] == [r[0].split("/")[1] for r in rows]
    np.testing.assert_array_equal(result.predictions, [0, 0, 1, 2, 2, 2])
    assert calls == [(4, 6), (6, 6)]
    heat = result.figure().data[0]
    np.testing.assert_array_equal(np.asarray(heat.z), result.confusion)

    (tmp_path / "data" / "list.csv").write_text(
        "path,label\n" + "".join(f"{p},{label}\n" for p, label in rows)
    )
    (tmp_path / "data" / "list.json").write_text(
        json.dumps([{"path": p, "label": label} for p, label in rows])
    )
    for listing in ("list.csv", "list.json"):
        again = zero_shot_eval(oracle, tmp_path / "data" / listing, templates=["{}"])
        np.testing.assert_array_equal(again.confusion, result.confusion)
        np.testing.assert_allclose(again.probs, result.probs, rtol=1e-5, atol=1e-8)

    extra = zero_shot_eval(
        oracle, tmp_path / "data", labels=[*classes, "a", "b", "c"], templates=["{}"]
    )
    assert extra.confusion.shape == (6, 6) and extra.top5_accuracy is not None
    with pytest.raises(ValueError, match="missing from the label set"):
        zero_shot_eval(oracle, tmp_path / "data", labels=["blue", "red"], templates=["{}"])


def test_read_labelled_items_rejects_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        read_labelled_items(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        read_labelled_items(tmp_path / "empty")
    (tmp_path / "bad.csv").write_text("only_a_path.png\n")
    with pytest.raises(ValueError, match="path,label"):
        read_labelled_items(tmp_path / "bad.csv")


def test_load_item_and_classify_file(tmp_path, model, tower):
    path = tmp_path / "x.png"
    pixels = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    item, modality = load_item(path)
    assert modality == "image" and item.shape == (40, 56, 3)
    np.testing.assert_allclose(item, pixels / 255 * 2 - 1, atol=1e-6)
    big, _ = load_item(path, max_side=28)
    assert big.shape == (20, 28, 3)
    got = classify_file(model, path, "dog, cat", text_tower=tower)
    assert got == pytest.approx(classify(model, item, ["dog", "cat"], text_tower=tower))
    np.savez(tmp_path / "v.npz", feats768=np.full((5, 768), 0.5, np.float32), coords=np.eye(5, 3))
    (feats, coords), modality = load_item(tmp_path / "v.npz")
    assert modality == "3d" and feats.shape == (5, 768) and coords.shape == (5, 3)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_item(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="no such file"):
        load_item(tmp_path / "missing.png")


def test_load_video_takes_evenly_spaced_frames(tmp_path):
    frames = np.zeros((40, 32, 48, 3), np.uint8)
    frames[:] = (np.arange(40) * 6)[:, None, None, None]  # brightness encodes the frame index
    iio.mimwrite(tmp_path / "clip.mp4", frames, fps=10, macro_block_size=16)
    video, modality = load_item(tmp_path / "clip.mp4", num_frames=16)
    assert modality == "video" and video.shape == (16, 32, 48, 3)
    index = ((video.mean(axis=(1, 2, 3)) + 1) / 2 * 255) / 6
    want = np.linspace(0, 39, 16).round()
    np.testing.assert_allclose(index, want, atol=0.6)  # lossy codec: within a frame step
    short, _ = load_item(tmp_path / "clip.mp4", num_frames=64, max_side=24)
    assert short.shape == (40, 16, 24, 3)


def test_figures():
    fig = probability_figure({"cat": 0.2, "dog": 0.7, "car": 0.05}, top_k=2)
    bar = fig.data[0]
    assert list(bar.y) == ["cat", "dog"]  # highest on top (plotly draws y bottom-up)
    assert list(bar.x) == [0.2, 0.7]
    heat = confusion_figure(np.array([[3, 1], [0, 2]]), ["a", "b"]).data[0]
    np.testing.assert_array_equal(np.asarray(heat.z), [[3, 1], [0, 2]])
    with pytest.raises(ValueError, match=r"\[K, K\]"):
        confusion_figure(np.ones((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="no probabilities"):
        probability_figure({})
