"""Dense layers and reshaping between feature maps and vectors."""

import math

import torch.nn as nn

from ..registry import Arg, register
from .dropout import BatchDropout


@register(
    "Lin",
    Arg("in_features", infer="features", doc="input features (last dimension)"),
    Arg("out_features", doc="output features"),
    Arg("bias", bool, True, doc="learn an additive bias"),
    doc="fully connected layer over the last dimension (nn.Linear)",
)
class Linear(nn.Linear):
    pass


@register("Flat", doc="flatten every non-batch dimension into one: (C, H, W) -> (C*H*W)")
class Flatten(nn.Flatten):
    def __init__(self):
        super().__init__(start_dim=1)


@register(
    "Reshape",
    Arg("shape", variadic=True, doc="target per-sample shape, e.g. Reshape_64_4_4"),
    doc="reshape each sample (e.g. a vector back into a feature map); sizes must multiply out",
)
class Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        if any(s < 1 for s in shape):
            raise ValueError(f"every size in the target shape must be positive, got {shape}")
        self.shape = tuple(shape)

    def forward(self, x):
        if math.prod(x.shape[1:]) != math.prod(self.shape):
            raise ValueError(
                f"cannot reshape {tuple(x.shape[1:])} ({math.prod(x.shape[1:])} values) "
                f"into {self.shape} ({math.prod(self.shape)} values)"
            )
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


register("Drop", Arg("p", float, 0.5, doc="probability of zeroing an element"),
         doc="dropout (masks drawn for the global batch in training)")(BatchDropout)
register("Id", doc="identity (does nothing; handy as a placeholder)")(nn.Identity)
