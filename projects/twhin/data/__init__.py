"""Synthetic TwHIN edge data (latent-factor graphs that link prediction can learn)."""
