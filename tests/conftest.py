"""Shared test settings."""

import torch

# The tests use tiny tensors: one thread is as fast, and several threads on a busy machine
# (a training run beside the tests) can be a hundred times slower.
torch.set_num_threads(1)
