"""Layer families. Importing this package registers every built-in token."""

from . import attention, context, conv, latent_groups, norm_act, pca, quantize, residual, resnet, sampling, shape, transformer  # noqa: F401  (registration)
from .norm_act import group_count

__all__ = ["group_count"]
