"""Every named model in one table: what it is, where its file comes from, which models go with it.

One :class:`ModelSpec` per name. The command line, the app and :mod:`atoken.pretrained.hub` read this table
and nothing else for names, presets, files, licences, continuous/discrete siblings and the
Gaussian decoder that pairs with an autoencoder; :mod:`atoken.pretrained.download` derives its list of
official files from it.

- ``bundled``: our own checkpoints (``assets/`` of a checkout, ``atoken/_bundled/`` of a wheel),
  config in the file's metadata.
- ``official``: Apple's released weights, fetched into the cache (research-only licence).
- ``random``: untrained stand-ins with a fixed config and seed, so every tab runs end to end
  where no trained file exists (the app shows them with a loud warning).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from atoken.core.config import ATokenConfig, decoder_trunk, encoder_trunk

OFFICIAL_LICENCE = (
    "Apple research-only model licence: non-commercial research use; read the licence shipped "
    "with the official release before using these weights"
)
OUR_LICENCE = (
    "ours: the repository's licence (trained with atoken.training.trainer on licence-clear data)"
)

ROLES = ("autoencoder", "gaussian-decoder", "generator")
SOURCES = ("bundled", "official", "random")

# Untrained stand-ins shaped like a small AToken whose pooled feature (384 dims) pairs with the
# MiniLM text tower.
RANDOM_TINY = ATokenConfig(
    encoder=encoder_trunk(384, 2, 6, 768),
    decoder=decoder_trunk(128, 2, 4, 256),
    latent_channels=16,
    text_tower="minilm",
    name="random-tiny",
)
RANDOM_TINY_D = replace(RANDOM_TINY, latent_channels=48, use_quantizer=True, name="random-tiny-d")


@dataclass(frozen=True)
class ModelSpec:
    """One named model.

    ``file`` is the bundled file name (in the assets folder) or the official file name (in the
    cache and on the CDN). ``preset`` is the config to build it with: a preset name of
    :mod:`atoken.core.config` / :mod:`atoken.core.gs_decoder`, a config object (random models), or
    ``None`` when the file's metadata holds it. ``continuous`` / ``discrete`` name the siblings
    sharing this model's encoder (itself included); ``gaussian_decoder`` the 3D decoder for its
    latents; ``generator`` the text-to-latent flow model trained on its latents (a generator's
    ``tokenizer`` is the autoencoder whose latents it makes).
    """

    name: str
    role: str
    source: str
    file: str | None = None
    preset: str | ATokenConfig | None = None
    is_discrete: bool = False
    continuous: str | None = None
    discrete: str | None = None
    gaussian_decoder: str | None = None
    generator: str | None = None
    tokenizer: str | None = None
    licence: str = OUR_LICENCE
    size: int | None = None  # official files: bytes and sha256 once someone has downloaded them
    sha256: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.source != "random" and not self.file:
            raise ValueError(f"{self.name}: a {self.source} model needs a file name")

    def sibling(self, discrete: bool) -> str | None:
        """Name of the continuous or discrete model sharing this one's encoder (maybe itself)."""
        return self.discrete if discrete else self.continuous


def _ae(name: str, source: str, **kw) -> ModelSpec:
    return ModelSpec(name, "autoencoder", source, **kw)


def _gs(name: str, source: str, **kw) -> ModelSpec:
    return ModelSpec(name, "gaussian-decoder", source, **kw)


_OFFICIAL = {"licence": OFFICIAL_LICENCE, "gaussian_decoder": "gs"}
_TINY = {"continuous": "atoken-tiny", "discrete": "atoken-tiny-d"}
_RANDOM = {"continuous": "random-tiny", "discrete": "random-tiny-d"}

MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _ae(
            "atoken-tiny",
            "bundled",
            file="atoken-tiny.safetensors",
            gaussian_decoder="atoken-tiny-gs",
            generator="atoken-tiny-gen",
            **_TINY,
        ),
        _ae(
            "atoken-tiny-d",
            "bundled",
            file="atoken-tiny-d.safetensors",
            is_discrete=True,
            gaussian_decoder="atoken-tiny-gs",
            generator="atoken-tiny-gen",  # its encoder is atoken-tiny's
            **_TINY,
        ),
        _gs("atoken-tiny-gs", "bundled", file="atoken-tiny-gs.safetensors"),
        ModelSpec(
            "atoken-tiny-gen",
            "generator",
            "bundled",
            file="atoken-tiny-gen.safetensors",
            tokenizer="atoken-tiny",
        ),
        _ae(
            "so-c",
            "official",
            file="atoken-soc.pt",
            preset="so-c",
            continuous="so-c",
            discrete="so-d",
            **_OFFICIAL,
        ),
        _ae(
            "so-d",
            "official",
            file="atoken-sod.pt",
            preset="so-d",
            is_discrete=True,
            continuous="so-c",
            discrete="so-d",
            **_OFFICIAL,
        ),
        _ae(
            "so-c-s1",
            "official",
            file="atoken-soc-s1.pt",
            preset="so-c-s1",
            continuous="so-c-s1",
            discrete="so-d",
            **_OFFICIAL,
        ),
        _ae(
            "so-c-s2",
            "official",
            file="atoken-soc-s2.pt",
            preset="so-c",
            continuous="so-c-s2",
            discrete="so-d",
            **_OFFICIAL,
        ),
        _gs("gs", "official", file="3d_decode_gs.pt", preset="gs", licence=OFFICIAL_LICENCE),
        _ae(
            "random-tiny",
            "random",
            preset=RANDOM_TINY,
            gaussian_decoder="random-tiny-gs",
            **_RANDOM,
        ),
        _ae(
            "random-tiny-d",
            "random",
            preset=RANDOM_TINY_D,
            is_discrete=True,
            gaussian_decoder="random-tiny-gs",
            **_RANDOM,
        ),
        _gs("random-tiny-gs", "random", preset="tiny-gs"),
    )
}

# Loaded through `atoken.load_pretrained` (by name, from a file): bundled and official models.
PRETRAINED = tuple(n for n, s in MODELS.items() if s.source != "random")
RANDOM_SEED = 0  # random models are built under this seed, so every process gets the same one


def spec(name: str) -> ModelSpec:
    """The entry of a name; ValueError listing the known names otherwise."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}") from None


def names(role: str | None = None, source: str | None = None) -> list[str]:
    """Names of the models with a role and/or source, in table order."""
    return [
        n
        for n, s in MODELS.items()
        if (role is None or s.role == role) and (source is None or s.source == source)
    ]


def sibling(name: str, discrete: bool) -> str | None:
    """The continuous or discrete model sharing ``name``'s encoder (None: unknown or none)."""
    s = MODELS.get(name)
    return None if s is None else s.sibling(discrete)


def generator_for(name: str) -> str | None:
    """Name of the text-to-latent generator trained on an autoencoder's latents (None: none)."""
    s = MODELS.get(name)
    return None if s is None else s.generator


def gaussian_decoder_for(name: str) -> str | None:
    """Name of the Gaussian decoder that pairs with an autoencoder (None: unknown model)."""
    s = MODELS.get(name)
    return None if s is None else s.gaussian_decoder
