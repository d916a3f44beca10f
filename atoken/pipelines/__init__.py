"""What a user calls: reconstruct images / videos / 3D, generation (interpolation, variations,
token edits, text-to-latent flow), metrics, bit rates and codec baselines, latent pictures."""
