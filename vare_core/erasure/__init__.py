"""S-VARE concept erasure: prompt pairs, auxiliary-token trajectories, losses, adapters, trainer."""
