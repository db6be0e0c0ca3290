"""Checkpoints: the file format, the metadata that describes the model, run directories,
and rebuilding a model from a checkpoint alone. Every mode goes through this module.

One ``.safetensors`` file each, written atomically, read without pickle:

* ``model.<name>``: weights of the (unwrapped) model's ``state_dict``;
* ``ema.<name>``: EMA weights, when there are any;
* ``train.<...>``: every tensor of the nested training state (optimizer, scheduler,
  gradient scaler, RNG states, data-stream position);
* header metadata ``"format"``: the format version; ``"flexvae"``: JSON of the metadata
  (``checkpoint_metadata``: token lists, resolved config, data shape, latent scaling, step);
  ``"train_state"``: JSON skeleton of the training state, each tensor replaced by
  ``{"__tensor__": "<key>"}``; ``"order"``: the state_dict order of the weights.

A run directory keeps its checkpoints in ``<run_dir>/checkpoints/step_XXXXXXXX.safetensors``.
"""

from .format import FORMAT_VERSION, Checkpoint, flatten_state, load_checkpoint, save_checkpoint, unflatten_state
from .rebuild import LoadedModel, checkpoint_metadata, load_model, load_run, model_from_checkpoint
from .runs import (CHECKPOINT_DIR, checkpoint_name, list_checkpoints, prune_checkpoints, resolve_checkpoint,
                   run_directory)

__all__ = [
    "FORMAT_VERSION", "Checkpoint", "flatten_state", "unflatten_state", "save_checkpoint", "load_checkpoint",
    "LoadedModel", "checkpoint_metadata", "model_from_checkpoint", "load_run", "load_model",
    "CHECKPOINT_DIR", "checkpoint_name", "list_checkpoints", "prune_checkpoints", "resolve_checkpoint",
    "run_directory",
]
