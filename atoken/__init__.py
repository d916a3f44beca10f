"""atoken: a pure-PyTorch AToken (arXiv 2509.14476): one tokenizer for images, videos and 3D."""

from atoken.attention import attention, attention_backend
from atoken.cameras import Camera, orbit_cameras, turntable_cameras
from atoken.checkpoint import load, load_gaussian_decoder, save_checkpoint
from atoken.config import PRESETS, ATokenConfig, GSDecoderConfig, config_from_yaml
from atoken.gaussians import Gaussians
from atoken.gs_decoder import GaussianDecoder
from atoken.model import ATokenModel, Encoded
from atoken.patchify import detokenize, to_model_range, to_uint8, tokenize, tokenize_3d
from atoken.sparse import SparseTensor

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
    "attention",
    "attention_backend",
    "config_from_yaml",
    "detokenize",
    "load",
    "load_gaussian_decoder",
    "orbit_cameras",
    "save_checkpoint",
    "to_model_range",
    "to_uint8",
    "tokenize",
    "tokenize_3d",
    "turntable_cameras",
]
