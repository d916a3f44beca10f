"""atoken: a pure-PyTorch AToken (arXiv 2509.14476): one tokenizer for images, videos and 3D."""

from atoken.cameras import Camera, orbit_cameras, turntable_cameras
from atoken.gaussians import Gaussians
from atoken.sparse import SparseTensor

__all__ = ["Camera", "Gaussians", "SparseTensor", "orbit_cameras", "turntable_cameras"]
