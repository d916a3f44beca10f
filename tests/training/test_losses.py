"""Tests for atoken/training/losses.py: each term against hand-computed values and its invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atoken.training.losses import (
    CallableFeatureNet,
    ConvFeatureNet,
    ImageReconstructionLoss,
    PooledEmbedder,
    atoken_objective,
    distillation_loss,
    gram_loss,
    gram_matrix,
    image_text_logits,
    kl_loss,
    l1_loss,
    lpips_distance,
    perceptual_cosine_loss,
    resize_224,
    siglip_loss,
)

SMALL = ((8, 16, 16), (1, 1, 1))  # a fast ConvFeatureNet layout for tests


def small_net(seed: int = 0) -> ConvFeatureNet:
    return ConvFeatureNet(*SMALL, seed=seed)


def stripes_and_checker(n: int = 64, period: int = 4):
    i = torch.arange(n)
    stripes = ((i // period) % 2).float().view(1, 1, 1, n).expand(1, 3, n, n) * 2 - 1
    checker = (((i.view(n, 1) // period) + (i.view(1, n) // period)) % 2).float()
    return stripes.contiguous(), (checker.expand(1, 3, n, n) * 2 - 1).contiguous()


# --- plain terms ------------------------------------------------------------------------------


def test_l1_hand_value_and_shape_check():
    x = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    y = torch.tensor([[0.0, 1.0], [0.5, 2.0]])
    assert l1_loss(x, y).item() == pytest.approx((1 + 3 + 0 + 2) / 4)
    with pytest.raises(ValueError, match="shapes differ"):
        l1_loss(x, y[:1])


def test_kl_closed_form():
    mean = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0], [0.0, math.log(2.0)]])
    tok0 = 0.5 * ((0 + 1 - 1 - 0) + (1 + 1 - 1 - 0))
    tok1 = 0.5 * ((4 + 1 - 1 - 0) + (0 + 2 - 1 - math.log(2.0)))
    assert kl_loss(mean, logvar).item() == pytest.approx((tok0 + tok1) / 2, rel=1e-6)
    assert kl_loss(torch.zeros(5, 3), torch.zeros(5, 3)).item() == 0.0


def test_kl_matches_torch_distributions():
    mean, logvar = torch.randn(7, 4), torch.randn(7, 4)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(7, 4), torch.ones(7, 4))
    ref = torch.distributions.kl_divergence(q, p).sum(-1).mean()
    torch.testing.assert_close(kl_loss(mean, logvar), ref, rtol=1e-5, atol=1e-6)


def test_gram_matrix_known_values():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)  # C=2, h=1, w=2
    expected = torch.tensor([[5.0, 11.0], [11.0, 25.0]]) / (2 * 1 * 2)
    torch.testing.assert_close(gram_matrix(f)[0], expected)


def test_gram_loss_hand_value():
    fx = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2), torch.ones(1, 1, 2, 2)]
    fy = [torch.zeros(1, 2, 1, 2), 2 * torch.ones(1, 1, 2, 2)]
    layer0 = (5**2 + 11**2 + 11**2 + 25**2) / 4**2  # G(y) = 0
    layer1 = (4.0 / 4 - 16.0 / 4) ** 2  # C=1: G = sum(f^2) / (1 * 2 * 2)
    assert gram_loss(fx, fy).item() == pytest.approx(layer0 + layer1, rel=1e-6)


def test_gram_loss_zero_for_identical_and_grows_with_noise():
    net = small_net()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert gram_loss(net(x), net(x)).item() == 0.0
    noise = torch.randn_like(x)
    values = [gram_loss(net(x), net(x + a * noise)).item() for a in (0.05, 0.2, 0.8)]
    assert 0 < values[0] < values[1] < values[2]


def test_gram_loss_is_a_texture_statistic():
    # Shifted stripes are the same texture (Gram ~ equal) though L1 is maximal; a checkerboard
    # is a different texture.
    net = small_net()
    stripes, checker = stripes_and_checker()
    shifted = torch.roll(stripes, 4, dims=3)
    assert l1_loss(stripes, shifted) > l1_loss(stripes, checker)
    same_texture = gram_loss(net(stripes), net(shifted)).item()
    other_texture = gram_loss(net(stripes), net(checker)).item()
    assert same_texture < 0.1 * other_texture


def test_lpips_hand_value_weights_and_scale_invariance():
    fx = [torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)]
    fy = [torch.tensor([0.0, 3.0]).view(1, 2, 1, 1)]  # unit vectors differ by (1, -1)
    assert lpips_distance(fx, fy).item() == pytest.approx(2.0)
    w = [torch.tensor([0.5, 2.0])]
    assert lpips_distance(fx, fy, w).item() == pytest.approx(2.5)
    f = [torch.rand(2, 4, 3, 3), torch.rand(2, 6, 2, 2)]
    assert lpips_distance(f, [3 * t for t in f]).item() == pytest.approx(0.0, abs=1e-6)
    g = [torch.rand(2, 4, 3, 3), torch.rand(2, 6, 2, 2)]
    per_sample = lpips_distance(f, g, reduction="none")
    assert per_sample.shape == (2,) and (per_sample > 0).all()
    torch.testing.assert_close(lpips_distance(f, g), per_sample.mean())
    with pytest.raises(ValueError, match="channels"):
        lpips_distance(fx, fy, [torch.ones(3)])


def test_lpips_zero_for_identical_images_and_positive_otherwise():
    net = small_net()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips_distance(net(x), net(x)).item() == 0.0
    assert lpips_distance(net(x), net(x.flip(-1))).item() > 0.0


def test_perceptual_cosine_loss():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 5.0], [2.0, 2.0], [-1.0, 0.0]])
    assert perceptual_cosine_loss(a, b).item() == pytest.approx((1.0 + 0.0 + 2.0) / 3)


def test_distillation_equals_manual_kl_at_t2():
    s = [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]]
    t = [[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    total = 0.0
    for srow, trow in zip(s, t):
        ps = [math.exp(v / 2) for v in srow]
        pt = [math.exp(v / 2) for v in trow]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        total += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    expected = total / 2 * 4
    student = torch.tensor(s, requires_grad=True)
    teacher = torch.tensor(t, requires_grad=True)
    loss = distillation_loss(student, teacher, temperature=2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_siglip_equals_manual_computation():
    img = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    txt = torch.tensor([[0.6, 0.8], [0.0, -2.0]])
    scale, bias = math.log(10.0), -1.0
    img_n = [[0.6, 0.8], [1.0, 0.0]]
    txt_n = [[0.6, 0.8], [0.0, -1.0]]
    total = 0.0
    for i in range(2):
        for j in range(2):
            z = 10.0 * sum(a * b for a, b in zip(img_n[i], txt_n[j])) + bias
            label = 1.0 if i == j else -1.0
            total += -math.log(1.0 / (1.0 + math.exp(-label * z)))
    assert siglip_loss(img, txt, scale, bias).item() == pytest.approx(total / 2, rel=1e-5)
    pairs = siglip_loss(img, txt, torch.tensor(scale), torch.tensor(bias), reduction="pairs")
    assert pairs.item() == pytest.approx(total / 4, rel=1e-5)


def test_siglip_gradients_reach_scale_and_bias():
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    siglip_loss(torch.randn(4, 8), torch.randn(4, 8), scale, bias).backward()
    assert scale.grad is not None and bias.grad is not None and bias.grad != 0


def test_image_text_logits_are_scaled_cosines():
    img, txt = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    out = image_text_logits(img, txt, math.log(5.0))
    torch.testing.assert_close(out, torch.tensor([[5.0 / math.sqrt(2.0), 0.0]]))


def test_resize_224_shape_constant_and_antialias():
    x = torch.full((2, 3, 300, 170), 0.25)
    y = resize_224(x)
    assert y.shape == (2, 3, 224, 224)
    torch.testing.assert_close(y, torch.full_like(y, 0.25))
    # 1-pixel stripes at 3x: plain bilinear sampling aliases them to +-1, antialiasing averages.
    j = torch.arange(672)
    stripes = ((j % 2).float() * 2 - 1).view(1, 1, 1, -1).expand(1, 3, 672, 672).contiguous()
    aliased = F.interpolate(stripes, size=(224, 224), mode="bilinear", align_corners=False)
    assert aliased.std() > 0.9 and resize_224(stripes).std() < 0.3
    assert resize_224(torch.rand(3, 50, 60)).shape == (3, 224, 224)


# --- feature networks -------------------------------------------------------------------------


def test_conv_feature_net_shapes_seed_and_frozen():
    net = ConvFeatureNet()  # default "small" layout
    x = (torch.rand(1, 3, 64, 48) * 2 - 1).requires_grad_()
    feats = net(x)
    assert [tuple(f.shape) for f in feats] == [
        (1, 32, 64, 48),
        (1, 64, 32, 24),
        (1, 128, 16, 12),
        (1, 256, 8, 6),
    ]
    assert all(not p.requires_grad for p in net.parameters())
    sum(f.sum() for f in feats).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.manual_seed(123)  # the global RNG must not matter
    a, b, c = small_net(7), small_net(7), small_net(8)
    assert torch.equal(a.convs[0].weight, b.convs[0].weight)
    assert not torch.equal(a.convs[0].weight, c.convs[0].weight)
    with pytest.raises(ValueError, match="equal length"):
        ConvFeatureNet((8, 16), (1,))


def test_conv_feature_net_safetensors_round_trip(tmp_path):
    net = ConvFeatureNet(*SMALL, input_norm="imagenet", seed=3)
    path = tmp_path / "net.safetensors"
    net.save_safetensors(path)
    loaded = ConvFeatureNet.from_safetensors(path)  # layout from the metadata
    assert loaded.channels == net.channels and loaded.input_norm == "imagenet"
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    for fa, fb in zip(net(x), loaded(x)):
        torch.testing.assert_close(fa, fb)


def test_conv_feature_net_loads_torchvision_style_keys(tmp_path):
    from safetensors.torch import save_file

    # torchvision-like indices: 0, 2 | 5 | 10 (pools/relus in between); "10" must sort after "5"
    shapes = {0: (4, 3), 2: (4, 4), 5: (6, 4), 10: (8, 6)}
    state = {}
    for idx, (co, ci) in shapes.items():
        state[f"features.{idx}.weight"] = torch.randn(co, ci, 3, 3)
        state[f"features.{idx}.bias"] = torch.randn(co)
    state["classifier.0.weight"] = torch.randn(10, 8)  # 2-D, ignored
    path = tmp_path / "vgg_like.safetensors"
    save_file(state, str(path))
    net = ConvFeatureNet.from_safetensors(path, channels=(4, 6, 8), convs_per_stage=(2, 1, 1))
    assert torch.equal(net.convs[3].weight, state["features.10.weight"])
    assert torch.equal(net.convs[2].bias, state["features.5.bias"])
    with pytest.raises(ValueError, match="expects 3 conv weights"):
        ConvFeatureNet.from_safetensors(path, channels=(4, 6, 8), convs_per_stage=(1, 1, 1))
    with pytest.raises(ValueError, match="does not match"):
        ConvFeatureNet.from_safetensors(path, channels=(4, 6, 9), convs_per_stage=(2, 1, 1))


def test_callable_feature_net_adapter():
    wrapped = CallableFeatureNet(lambda x: x * 2)
    out = wrapped(torch.ones(1, 3, 4, 4))
    assert isinstance(out, list) and len(out) == 1 and out[0].max() == 2
    with pytest.raises(ValueError, match="callable"):
        CallableFeatureNet(3)


# --- combined losses --------------------------------------------------------------------------


def test_image_reconstruction_loss_identical_is_zero_and_total_is_weighted():
    net = small_net()
    loss = ImageReconstructionLoss(net, net, PooledEmbedder(net))
    x = torch.rand(2, 3, 40, 56) * 2 - 1
    same = loss(x, x.clone())
    for k in ("l1", "lpips", "gram", "perceptual", "total"):
        assert same[k].item() == pytest.approx(0.0, abs=1e-6), k
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    out = loss(y, x)
    assert all(out[k].item() > 0 for k in ("l1", "lpips", "gram", "perceptual"))
    expected = out["l1"] + 10 * out["lpips"] + 1e3 * out["gram"] + out["perceptual"]
    torch.testing.assert_close(out["total"], expected)
    out["total"].backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in net.parameters())


def test_image_reconstruction_loss_terms_can_be_disabled_and_reweighted():
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    out = ImageReconstructionLoss()(y, x)
    assert out["lpips"] == 0 and out["gram"] == 0 and out["perceptual"] == 0
    torch.testing.assert_close(out["total"], l1_loss(y, x))
    net = small_net()
    out = ImageReconstructionLoss(gram_net=net, l1_weight=0.0, gram_weight=2.0)(y, x)
    torch.testing.assert_close(
        out["total"], 2.0 * gram_loss(net(resize_224(y)), net(resize_224(x)))
    )


def test_image_reconstruction_loss_native_size_list():
    net = small_net()
    loss = ImageReconstructionLoss(net, net)
    xs = [torch.rand(3, 32, 48) * 2 - 1, torch.rand(3, 64, 16) * 2 - 1]
    ys = [x + 0.1 for x in xs]
    ys[1] = xs[1] + 0.4
    out = loss(ys, xs)
    pixels = [x.numel() for x in xs]
    expected_l1 = (0.1 * pixels[0] + 0.4 * pixels[1]) / sum(pixels)  # per-pixel (patch) mean
    assert out["l1"].item() == pytest.approx(expected_l1, rel=1e-5)
    stacked_r = torch.stack([resize_224(y) for y in ys])
    stacked_t = torch.stack([resize_224(x) for x in xs])
    torch.testing.assert_close(out["gram"], gram_loss(net(stacked_r), net(stacked_t)))


def test_image_reconstruction_mse_term_hand_computed():
    # batch form: every pixel off by 0.5 -> mse 0.25; weight 2 and L1 off -> total 0.5
    x = torch.zeros(2, 3, 16, 16)
    out = ImageReconstructionLoss(l1_weight=0.0, mse_weight=2.0)(x + 0.5, x)
    assert out["mse"].item() == pytest.approx(0.25)
    assert out["total"].item() == pytest.approx(0.5)
    # list form: a per-pixel mean over both images, like L1
    xs = [torch.zeros(3, 32, 48), torch.zeros(3, 64, 16)]
    ys = [xs[0] + 0.1, xs[1] - 0.4]
    out = ImageReconstructionLoss(mse_weight=1.0)(ys, xs)
    pixels = [x.numel() for x in xs]
    expected = (0.01 * pixels[0] + 0.16 * pixels[1]) / sum(pixels)
    assert out["mse"].item() == pytest.approx(expected, rel=1e-5)
    assert out["total"].item() == pytest.approx(expected + out["l1"].item(), rel=1e-5)
    # off by default: the paper's objective is unchanged
    out = ImageReconstructionLoss()(ys, xs)
    assert out["total"].item() == pytest.approx(out["l1"].item(), rel=1e-6)


def test_image_reconstruction_loss_keeps_networks_in_eval():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Dropout(0.5))
    loss = ImageReconstructionLoss(lpips_net=CallableFeatureNet(net))
    loss.train()
    assert loss.training and not net.training
    x = torch.rand(1, 3, 32, 32)
    assert loss(x, x)["lpips"].item() == pytest.approx(0.0, abs=1e-6)  # no dropout noise


def test_atoken_objective_weights():
    rec, sem, kl = torch.tensor(2.0), torch.tensor(0.5), torch.tensor(1e6)
    out = atoken_objective({"total": rec, "l1": rec}, sem, kl)
    assert out["total"].item() == pytest.approx(0.2 * 2.0 + 0.5 + 1e-8 * 1e6)
    out = atoken_objective(rec, None, None, weights=(1.0, 1.0, 1.0))
    assert out["total"].item() == pytest.approx(2.0) and out["kl"].item() == 0.0
    with pytest.raises(ValueError, match="scalar"):
        atoken_objective(rec, torch.ones(3), None)


def test_gram_matrix_stays_float32_under_autocast():
    f = torch.randn(2, 8, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = gram_matrix(f)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, gram_matrix(f))


def test_vgg16_layout_loads_lpips_style_keys():
    # LPIPS / torchmetrics name VGG16 convs "net.slice{k}.{i}" with torchvision's feature indices.
    conv_idx = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    slices = [1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
    ref = ConvFeatureNet.preset("vgg16", seed=5)
    state = {}
    for conv, k, i in zip(ref.convs, slices, conv_idx):
        state[f"lpips_loss.net.slice{k}.{i}.weight"] = conv.weight
        state[f"lpips_loss.net.slice{k}.{i}.bias"] = conv.bias
    state["lpips_loss.lin0.model.1.weight"] = torch.ones(1, 64, 1, 1)  # 4-D but outside prefix
    net = ConvFeatureNet.preset("vgg16", input_norm="imagenet", seed=9)
    net.load_conv_state(state, prefix="lpips_loss.net.")
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(net.convs, ref.convs))
    feats = net(torch.zeros(1, 3, 32, 32))
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512, 512]


def test_effnet_feature_net_terms_are_zero_for_identical_images_and_grow_with_blur():
    from PIL import Image, ImageFilter
    from skimage import data as skdata

    from atoken.pipelines.metrics import effnet_taps
    from atoken.training.losses import EffNetFeatureNet

    photo = Image.fromarray(skdata.coffee()).resize((128, 96), Image.LANCZOS)

    def as_input(im: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 127.5 - 1.0

    net = EffNetFeatureNet()
    x = as_input(photo)
    # the network sees pixels exactly as the perceptual metric does
    for a, b in zip(net(x), effnet_taps(np.asarray(photo))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    loss = ImageReconstructionLoss(lpips_net=net, gram_net=net, perceptual_weight=0.0)
    same = loss(x, x)
    assert same["lpips"].item() == 0.0 and same["gram"].item() == 0.0
    terms = [loss(as_input(photo.filter(ImageFilter.GaussianBlur(r))), x) for r in (0.7, 2, 5)]
    for key in ("lpips", "gram"):
        values = [t[key].item() for t in terms]
        assert 0 < values[0] < values[1] < values[2], (key, values)
    blurred = as_input(photo.filter(ImageFilter.GaussianBlur(2))).requires_grad_()
    loss(blurred, x)["total"].backward()
    assert blurred.grad.abs().sum() > 0 and not any(p.requires_grad for p in net.parameters())
    assert not net.train().training  # stays in eval mode


def test_native_size_feature_terms_match_the_perceptual_metric_the_app_reports():
    """``feature_size=None`` trains on what `perceptual_distance` measures: for a list of
    images of different sizes the LPIPS-style term is the per-image metric (a mean over its
    five layers, here their sum) averaged over the images."""
    from PIL import Image, ImageFilter
    from skimage import data as skdata

    from atoken.pipelines.metrics import perceptual_distance
    from atoken.training.losses import EffNetFeatureNet

    photos = [
        Image.fromarray(skdata.coffee()).resize((96, 64), Image.LANCZOS),
        Image.fromarray(skdata.chelsea()).resize((64, 80), Image.LANCZOS),
    ]
    blurred = [p.filter(ImageFilter.GaussianBlur(1.5)) for p in photos]

    def as_input(im: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1.0

    net = EffNetFeatureNet()
    native = ImageReconstructionLoss(
        lpips_net=net, gram_weight=0.0, perceptual_weight=0.0, feature_size=None
    )
    got = native([as_input(b) for b in blurred], [as_input(p) for p in photos])["lpips"].item()
    want = (
        np.mean(
            [perceptual_distance(np.asarray(b), np.asarray(p)) for b, p in zip(blurred, photos)]
        )
        * 5
    )
    assert got == pytest.approx(want, rel=1e-3)
    squared = ImageReconstructionLoss(lpips_net=net, gram_weight=0.0, perceptual_weight=0.0)
    other = squared([as_input(b) for b in blurred], [as_input(p) for p in photos])["lpips"].item()
    assert abs(other - got) > 1e-3  # the 224x224 copies measure something else
    with pytest.raises(ValueError, match="feature_size"):
        ImageReconstructionLoss(lpips_net=net, feature_size=8)


def test_objective_reads_feature_size_native_or_pixels():
    from atoken.training.objective import _feature_size

    assert _feature_size("native") is None and _feature_size(None) is None
    assert _feature_size(256) == 256 and _feature_size("224") == 224
    with pytest.raises(ValueError, match="'native'"):
        _feature_size("big")
