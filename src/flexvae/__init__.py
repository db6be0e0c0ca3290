"""flexvae: variational autoencoders declared as JSON token lists.

    import flexvae
    plan = flexvae.plan_vae("structures/small_encoder.json", "structures/small_decoder.json", (3, 32, 32))
    vae = plan.build()                          # a flexvae.VAE
    vae = flexvae.load_model("runs/default")    # or the model of a trained run

Importing the package is light (no torch); each name below loads its module on first use.
"""

from __future__ import annotations

import importlib

from .version import __version__

# public name -> module that defines it
_EXPORTS = {
    "plan_vae": "build", "build_vae": "build", "VAEPlan": "build",
    "VAE": "model", "VAEOutput": "model", "Stack": "model",
    "load_model": "checkpoint", "load_run": "checkpoint", "LoadedModel": "checkpoint",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
    "Config": "config", "load_config": "config",
    "Trainer": "train.trainer",
    "register": "registry", "Arg": "registry", "LAYERS": "registry",
    "register_latent": "latents", "LATENTS": "latents", "Latent": "latents", "DiscreteLatent": "latents",
    "Posterior": "latents",
    "FlexVAEError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flexvae' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
