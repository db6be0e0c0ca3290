"""The Stable Diffusion autoencoder as a flexvae structure, and its weights imported.

``sd_structures(config)`` writes the encoder and decoder token lists of a diffusers
``AutoencoderKL`` config (block_out_channels, layers_per_block, latent_channels, ...).
``import_weights(src, output)`` reads a diffusers folder (``config.json`` +
``diffusion_pytorch_model.safetensors``) or an original SD ``.safetensors`` VAE (the
``encoder.down.0.block.0...`` layout, optionally under ``first_stage_model.``) and writes a
flexvae checkpoint. Weights are read with safetensors only: no pickle is ever executed.

The key mapping is built from the structure itself: every generated token carries the
module path it corresponds to in both source layouts, and each parameter of the built
flexvae model is looked up through the token it belongs to.
"""

from .importer import Imported, Source, flexvae_config, import_weights, load_sd_vae, read_source
from .layout import (DEFAULT_IMPORT_CONFIG, DEFAULT_OUTPUT, DIFFUSERS_WEIGHTS, SD_CONFIG, convert_state, sd_config,
                     sd_layout, sd_structures, weight_mapping)

__all__ = [
    "Imported", "Source", "flexvae_config", "import_weights", "load_sd_vae", "read_source",
    "DEFAULT_IMPORT_CONFIG", "DEFAULT_OUTPUT", "DIFFUSERS_WEIGHTS", "SD_CONFIG", "convert_state", "sd_config",
    "sd_layout", "sd_structures", "weight_mapping",
]
