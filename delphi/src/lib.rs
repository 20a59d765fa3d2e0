//! Delphi-style automated interpretability (Paulo et al. 2024) for SAE latents.
