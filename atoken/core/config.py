"""Model configs: dataclasses, named presets and the adapter for the official YAML files."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class TrunkConfig:
    """One transformer stack (encoder or decoder) of the autoencoder."""

    channels: int
    num_blocks: int
    num_heads: int
    mlp_channels: int
    use_bias: bool
    use_rms_norm: bool
    qk_rms_norm: bool
    attn_mode: str = "full"
    pe_mode: str = "joint"

    def __post_init__(self) -> None:
        if self.channels % self.num_heads:
            raise ValueError(f"channels {self.channels} not divisible by heads {self.num_heads}")
        if self.head_dim % 8:
            raise ValueError(f"4D RoPE needs head_dim % 8 == 0, got head_dim {self.head_dim}")
        if self.attn_mode != "full":
            raise ValueError(f"only attn_mode 'full' is supported here, got {self.attn_mode!r}")
        if self.pe_mode != "joint":
            raise ValueError(f"only pe_mode 'joint' is supported here, got {self.pe_mode!r}")

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.channels // self.num_heads


def encoder_trunk(channels: int, blocks: int, heads: int, mlp: int) -> TrunkConfig:
    """Encoder flags of every released config: biases, affine LayerNorm, no qk norm."""
    return TrunkConfig(channels, blocks, heads, mlp, True, False, False)


def decoder_trunk(channels: int, blocks: int, heads: int, mlp: int) -> TrunkConfig:
    """Decoder flags of every released config: no biases, RMSNorm, per-head qk norm."""
    return TrunkConfig(channels, blocks, heads, mlp, False, True, True)


@dataclass(frozen=True)
class ATokenConfig:
    """The AToken autoencoder (official ``arch_cfg`` plus the wrapper's runtime constants)."""

    encoder: TrunkConfig
    decoder: TrunkConfig
    latent_channels: int = 48
    patch_size: tuple[int, int, int] = (4, 16, 16)
    in_channels: int = 3072
    out_channels: int = 3072
    use_quantizer: bool = False
    quantizer_levels: tuple[int, ...] = (4, 4, 4, 4, 4, 4)
    quantizer_num_codebooks: int = 8
    # Runtime constants of AutoencoderKL, in video frames (divided by patch_t inside).
    frames_batch_size: int = 16
    frames_stride: int = 16
    kv_cache_size: int = 0
    # Zero-shot constants (hard-coded officially, not in the checkpoint).
    logit_scale: float = 4.8438
    logit_bias: float = -15.5625
    text_tower: str | None = "siglip2"
    name: str = ""

    def __post_init__(self) -> None:
        pt, ph, pw = self.patch_size
        if self.in_channels != pt * ph * pw * 3 or self.out_channels != self.in_channels:
            raise ValueError(
                f"in/out channels must equal prod(patch_size)*3 = {pt * ph * pw * 3}, got "
                f"{self.in_channels}/{self.out_channels}"
            )
        if self.use_quantizer and self.quantizer_dim != self.latent_channels:
            raise ValueError(
                f"FSQ dim {self.quantizer_dim} (= {len(self.quantizer_levels)} levels x "
                f"{self.quantizer_num_codebooks} codebooks) must equal latent_channels "
                f"{self.latent_channels}"
            )
        if self.frames_stride % pt or self.frames_batch_size % pt or self.kv_cache_size % pt:
            raise ValueError(f"frame constants must be multiples of patch_t {pt}")

    @property
    def quantizer_dim(self) -> int:
        """Channels the FSQ quantizer acts on."""
        return len(self.quantizer_levels) * self.quantizer_num_codebooks

    @property
    def codebook_size(self) -> int:
        """Codes per FSQ group (4096 for the released So/D)."""
        n = 1
        for level in self.quantizer_levels:
            n *= level
        return n

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (stored in checkpoints and token files)."""
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["quantizer_levels"] = list(self.quantizer_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ATokenConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["encoder"] = TrunkConfig(**d["encoder"])
        d["decoder"] = TrunkConfig(**d["decoder"])
        d["patch_size"] = tuple(d["patch_size"])
        d["quantizer_levels"] = tuple(d["quantizer_levels"])
        return cls(**d)


@dataclass(frozen=True)
class GSDecoderConfig:
    """The 3D Gaussian decoder (``configs/3d_decode_gs.yaml``)."""

    resolution: int = 64
    channels: int = 768
    latent_channels: int = 768
    num_blocks: int = 12
    num_heads: int = 12
    mlp_channels: int = 3072
    window_size: int = 8
    softcap: float = 30.0
    num_gaussians: int = 32
    voxel_size: float = 1.5
    perturb_offset: bool = True
    lr: dict[str, float] = field(
        default_factory=lambda: {
            "_xyz": 1.0,
            "_features_dc": 1.0,
            "_opacity": 1.0,
            "_scaling": 1.0,
            "_rotation": 0.1,
        }
    )
    filter_3d: float = 9e-4
    scaling_bias: float = 4e-3
    opacity_bias: float = 0.1
    name: str = ""

    def __post_init__(self) -> None:
        if self.channels % self.num_heads:
            raise ValueError(f"channels {self.channels} not divisible by heads {self.num_heads}")

    @property
    def out_channels(self) -> int:
        """Head width: per Gaussian 3 xyz + 3 colour + 3 scale + 4 rotation + 1 opacity."""
        return self.num_gaussians * 14

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form."""
        return asdict(self)


def _so(latent: int, quantizer: bool, name: str) -> ATokenConfig:
    return ATokenConfig(
        encoder=encoder_trunk(1152, 27, 16, 4304),
        decoder=decoder_trunk(1152, 27, 16, 4304),
        latent_channels=latent,
        use_quantizer=quantizer,
        name=name,
    )


PRESETS: dict[str, ATokenConfig | GSDecoderConfig] = {
    "so-c": _so(48, False, "so-c"),
    "so-d": _so(48, True, "so-d"),
    "so-c-s1": _so(32, False, "so-c-s1"),
    "so-c-s2": _so(48, False, "so-c-s2"),
    "gs": GSDecoderConfig(name="gs"),
    # The golden reference models (tests/golden/configs), handy for tests and examples.
    "tiny-c": ATokenConfig(
        encoder=encoder_trunk(96, 2, 4, 160),
        decoder=decoder_trunk(96, 2, 4, 160),
        latent_channels=8,
        name="tiny-c",
    ),
    "tiny-d": ATokenConfig(
        encoder=encoder_trunk(64, 2, 2, 128),
        decoder=decoder_trunk(64, 2, 2, 128),
        latent_channels=48,
        use_quantizer=True,
        name="tiny-d",
    ),
    "tiny-gs": GSDecoderConfig(
        channels=64, num_blocks=2, num_heads=4, mlp_channels=128, name="tiny-gs"
    ),
}


def _fsq_levels(codebook_size: int) -> tuple[int, ...]:
    """FSQ levels of a codebook size; only the released 4096 = 4^6 is known for certain."""
    if codebook_size != 4096:
        raise ValueError(
            f"only FSQ codebook size 4096 (levels 4^6) is supported, got {codebook_size}"
        )
    return (4, 4, 4, 4, 4, 4)


def config_from_yaml(path: str | Path) -> ATokenConfig | GSDecoderConfig:
    """Read an official YAML config (autoencoder ``model.model_cfg.arch_cfg`` or GS ``model``)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read config {path}: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise ValueError(f"{path}: expected a top-level 'model' mapping (official config form)")
    model = doc["model"]
    arch = (model.get("model_cfg") or {}).get("arch_cfg")
    if arch is not None:
        return _autoencoder_from_arch(arch, name=path.stem)
    if "representation_config" in model or "attn_mode" in model:
        return _gs_from_yaml(model, name=path.stem)
    raise ValueError(f"{path}: neither an autoencoder (model_cfg.arch_cfg) nor a GS decoder config")


def _trunk(arch: dict[str, Any], side: str) -> TrunkConfig:
    g = lambda k, d=None: arch.get(f"{side}_{k}", d)  # noqa: E731
    return TrunkConfig(
        channels=g("model_channels"),
        num_blocks=g("num_blocks"),
        num_heads=g("num_heads"),
        mlp_channels=g("mlp_channels"),
        use_bias=bool(g("use_bias", True)),
        use_rms_norm=bool(g("use_rms_norm", False)),
        qk_rms_norm=bool(g("qk_rms_norm", False)),
        attn_mode=g("attn_mode", "full"),
        pe_mode=g("pe_mode", "joint"),
    )


def _autoencoder_from_arch(arch: dict[str, Any], name: str) -> ATokenConfig:
    use_q = bool(arch.get("use_quantizer", False))
    kwargs: dict[str, Any] = {}
    if use_q:
        if arch.get("quantizer_type", "fsq") != "fsq":
            raise ValueError(f"only the FSQ quantizer is supported, got {arch['quantizer_type']!r}")
        if int(arch.get("quantizer_chunk_size", 1)) != 1:
            raise ValueError("only quantizer_chunk_size 1 (the released setting) is supported")
        levels = _fsq_levels(int(arch.get("quantizer_codebook_size", 4096)))
        kwargs["quantizer_levels"] = levels
        dim = int(arch.get("quantizer_feature_dim", arch["latent_channels"]))
        kwargs["quantizer_num_codebooks"] = int(arch.get("quantizer_num_codebooks", 1))
        if dim != len(levels) * kwargs["quantizer_num_codebooks"]:
            raise ValueError(
                f"FSQ feature dim {dim} != {len(levels)} levels x "
                f"{kwargs['quantizer_num_codebooks']} codebooks (projections are not supported)"
            )
    return ATokenConfig(
        encoder=_trunk(arch, "encoder"),
        decoder=_trunk(arch, "decoder"),
        latent_channels=int(arch["latent_channels"]),
        patch_size=tuple(arch.get("patch_size", (4, 16, 16))),
        in_channels=int(arch.get("in_channels", 3072)),
        out_channels=int(arch.get("out_channels", 3072)),
        use_quantizer=use_q,
        name=name,
        **kwargs,
    )


def _gs_from_yaml(model: dict[str, Any], name: str) -> GSDecoderConfig:
    rep = model.get("representation_config", {})
    if model.get("attn_mode", "swin") != "swin":
        raise ValueError("only attn_mode 'swin' is supported for the GS decoder")
    if model.get("pe_mode", "ape") != "ape":
        raise ValueError("only pe_mode 'ape' is supported for the GS decoder")
    if rep.get("scaling_activation", "softplus") != "softplus":
        raise ValueError("only softplus scaling activation is supported")
    default = GSDecoderConfig()
    return GSDecoderConfig(
        resolution=int(model.get("resolution", 64)),
        channels=int(model["model_channels"]),
        latent_channels=int(model.get("latent_channels", 768)),
        num_blocks=int(model["num_blocks"]),
        num_heads=int(model["num_heads"]),
        mlp_channels=int(model.get("mlp_channels", 4 * int(model["model_channels"]))),
        window_size=int(model.get("window_size", 8)),
        num_gaussians=int(rep.get("num_gaussians", default.num_gaussians)),
        voxel_size=float(rep.get("voxel_size", default.voxel_size)),
        perturb_offset=bool(rep.get("perturb_offset", True)),
        lr={k: float(v) for k, v in rep.get("lr", default.lr).items()},
        filter_3d=float(rep.get("3d_filter_kernel_size", default.filter_3d)),
        scaling_bias=float(rep.get("scaling_bias", default.scaling_bias)),
        opacity_bias=float(rep.get("opacity_bias", default.opacity_bias)),
        name=name,
    )


def resolve_config(config: str | Path | ATokenConfig | GSDecoderConfig):
    """A config object from a preset name, a YAML path, or a config object."""
    if isinstance(config, (ATokenConfig, GSDecoderConfig)):
        return config
    s = str(config)
    if s in PRESETS:
        return PRESETS[s]
    if s.endswith((".yaml", ".yml")) or Path(s).is_file():
        return config_from_yaml(s)
    raise ValueError(f"config {s!r} is neither a preset ({sorted(PRESETS)}) nor a YAML file")
