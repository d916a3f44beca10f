"""atoken: a pure-PyTorch AToken (arXiv 2509.14476): one tokenizer for images, videos and 3D."""

from atoken.attention import attention_backend
from atoken.cameras import Camera, orbit_cameras, turntable_cameras
from atoken.checkpoint import load, load_gaussian_decoder, save_checkpoint
from atoken.config import PRESETS, ATokenConfig, GSDecoderConfig, config_from_yaml
from atoken.gaussians import Gaussians
from atoken.gs_decoder import GaussianDecoder
from atoken.hub import available_models, load_pretrained, load_pretrained_gs
from atoken.model import ATokenModel, Encoded
from atoken.multiview import pack_views
from atoken.patchify import detokenize, to_model_range, to_uint8, tokenize, tokenize_3d
from atoken.sparse import SparseTensor
from atoken.text import load_text_tower
from atoken.zeroshot import classify, classify_file, parse_labels, zero_shot_eval

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
