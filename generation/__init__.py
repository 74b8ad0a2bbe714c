"""Stage 1: the latent diffusion model that makes synthetic images."""
