"""flexvae: variational autoencoders declared as JSON token lists.

Importing the package is light (no torch); the heavy parts load on first use:

    from flexvae.build import build_vae
    model = build_vae("structures/small_encoder.json", "structures/small_decoder.json", (3, 32, 32))
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
