"""histosynth: synthetic H&E tiles from a cluster-conditioned latent diffusion model.

Data flows one way through the subpackages:
tiles -> autoencoder -> (latents) -> diffusion + clusters -> review -> bundle -> sampling -> files,
with evaluate reading any of them. See docs/architecture.md.
"""

__version__ = "0.1.0"
