"""Modes that use a trained model on a folder: reconstruct (-i), encode (-e), decode (-d).

Preprocessing is deterministic (no flip, no sampling unless asked). Outputs mirror the
input tree; every output path is checked to stay inside the output folder.
"""

from .decode import decode_folder
from .encode import encode_folder
from .latent_files import codes_path, load_latent, load_latent_file, read_manifest, save_latent
from .paths import (CODES_SUFFIX, LATENT_SUFFIXES, MANIFEST, check_folders, input_root, output_names,
                    safe_output_path)
from .reconstruct import reconstruct_folder

__all__ = [
    "decode_folder", "encode_folder", "reconstruct_folder", "codes_path", "load_latent", "load_latent_file",
    "read_manifest", "save_latent", "CODES_SUFFIX", "LATENT_SUFFIXES", "MANIFEST", "check_folders", "input_root",
    "output_names", "safe_output_path",
]
