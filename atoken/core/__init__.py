"""The model and its numerics: sparse tokens, patches, 4D RoPE, attention, the transformer, FSQ,
configs, the autoencoder, the 3D Gaussian decoder, cameras, and official-checkpoint loading.
Nothing here imports from another atoken subpackage."""
