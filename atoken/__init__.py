"""atoken: a pure-PyTorch AToken (arXiv 2509.14476): one tokenizer for images, videos and 3D."""

import importlib
import importlib.abc
import importlib.util
import sys

from atoken.core.attention import attention_backend
from atoken.core.cameras import Camera, orbit_cameras, turntable_cameras
from atoken.core.checkpoint import load, load_gaussian_decoder, save_checkpoint
from atoken.core.config import PRESETS, ATokenConfig, GSDecoderConfig, config_from_yaml
from atoken.core.gaussians import Gaussians
from atoken.core.gs_decoder import GaussianDecoder
from atoken.core.model import ATokenModel, Encoded
from atoken.core.patchify import detokenize, to_model_range, to_uint8, tokenize, tokenize_3d
from atoken.core.sparse import SparseTensor
from atoken.pretrained.hub import available_models, load_pretrained, load_pretrained_gs
from atoken.text.towers import load_text_tower
from atoken.text.zeroshot import classify, classify_file, parse_labels, zero_shot_eval
from atoken.threed.multiview import pack_views

__all__ = [
    "PRESETS",
    "ATokenConfig",
    "ATokenModel",
    "Camera",
    "Encoded",
    "GSDecoderConfig",
    "GaussianDecoder",
    "Gaussians",
    "SparseTensor",
    "available_models",
    "classify",
    "classify_file",
    "attention_backend",
    "config_from_yaml",
    "detokenize",
    "load",
    "load_gaussian_decoder",
    "load_pretrained",
    "load_pretrained_gs",
    "load_text_tower",
    "orbit_cameras",
    "pack_views",
    "parse_labels",
    "save_checkpoint",
    "to_model_range",
    "to_uint8",
    "tokenize",
    "tokenize_3d",
    "turntable_cameras",
    "zero_shot_eval",
]


# Before 0.2 every module sat directly in `atoken/`; these old paths still import (the same
# module objects as the new paths), so code written against them keeps working.
_OLD_PATHS = {
    "attention": "core.attention",
    "budget": "io.budget",
    "cameras": "core.cameras",
    "checkpoint": "core.checkpoint",
    "codecs": "pipelines.codecs",
    "config": "core.config",
    "data": "training.data",
    "download": "pretrained.download",
    "effnet": "pipelines.effnet",
    "evaluate": "training.evaluate",
    "flow": "pipelines.flow",
    "flow_eval": "training.flow_eval",
    "flow_training": "training.flow",
    "gaussians": "core.gaussians",
    "generation": "pipelines.generation",
    "gs_decoder": "core.gs_decoder",
    "gs_training": "training.gs",
    "hub": "pretrained.hub",
    "losses": "training.losses",
    "media": "io.media",
    "mesh": "threed.mesh",
    "mesh_count": "threed.mesh_count",
    "mesh_render": "threed.mesh_render",
    "metrics": "pipelines.metrics",
    "model": "core.model",
    "multiview": "threed.multiview",
    "patchify": "core.patchify",
    "pipeline": "pipelines.reconstruct",
    "pipeline3d": "pipelines.reconstruct3d",
    "quantizers": "core.quantizers",
    "rasterize": "threed.rasterize",
    "rate": "pipelines.rate",
    "registry": "pretrained.registry",
    "rope": "core.rope",
    "sparse": "core.sparse",
    "transformer": "core.transformer",
    "visualize": "pipelines.visualize",
    "world": "training.world",
    "zeroshot": "text.zeroshot",
}


class _OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``atoken.<old module>`` to its module in the subpackage layout."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, name = fullname.partition(".")
        if head == "atoken" and name in _OLD_PATHS:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("atoken." + _OLD_PATHS[spec.name.partition(".")[2]])

    def exec_module(self, module):
        pass  # already executed under its new name


def __getattr__(name: str):
    if name in _OLD_PATHS:  # `atoken.hub` etc. as attributes
        return importlib.import_module("atoken." + _OLD_PATHS[name])
    raise AttributeError(f"module 'atoken' has no attribute {name!r}")


if not any(isinstance(f, _OldPathFinder) for f in sys.meta_path):
    sys.meta_path.append(_OldPathFinder())
