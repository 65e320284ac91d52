"""Model architectures: Infinity transformer, BSQ VAE, T5 text encoder, presets."""
