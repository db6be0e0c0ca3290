"""Linear layers fitted to the data before the first step: principal components.

    ["Flat", "PCA_3072_64"]                          encoder: the 64 leading principal components
    ["PCAInv_64_3072", "Reshape_3_32_32", ...]       decoder: back to the images' space

``PCA_in_out`` is a linear layer whose weights a fresh training run sets, before its first step,
to the projection onto the ``out`` leading principal directions of the layer's input over
``train.init_images`` training images (their mirror images too with ``data.flip``): output
W (x - mean). ``PCAInv_in_out`` in the decoder is its mirror, W^T y + mean. The decoder's last
PCAInv inverts the encoder's first PCA, the one before it the second, and so on. Both then train
like any ``Lin`` (or stay as fitted where a ``[[stage]]`` leaves them out). A code such as this
starts where PCA, the best linear code, ends; a nonlinear decoder after it (a residual span that
starts as the identity, ``Gain_0``) has only the rest to learn.

A data-dependent initialisation like Glow's ActNorm (Kingma and Dhariwal 2018); the principal
components are the best linear code of a given size in squared error (Eckart and Young 1936).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import TrainingError
from ..registry import Arg, register


@register(
    "PCA",
    Arg("in_features", infer="features", doc="input features (last dimension)"),
    Arg("out_features", doc="principal components kept (at most in_features)"),
    doc="linear layer set to the leading principal components of its input before the first step, then trained",
)
class PrincipalComponents(nn.Linear):
    def __init__(self, in_features: int, out_features: int):
        if out_features > in_features:
            raise ValueError(f"PCA keeps at most as many components as it has input features ({in_features}), "
                             f"got {out_features}")
        super().__init__(in_features, out_features)
        # Saved with the weights: a loaded checkpoint's layer is fitted, a freshly built one not yet.
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, inputs: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Set the weights from ``inputs`` (samples, in_features); returns the share of the
        inputs' variance the kept components hold, and the inputs' mean."""
        samples = inputs.to(torch.float64)
        mean = samples.mean(0)
        _, singular, directions = torch.linalg.svd(samples - mean, full_matrices=False)
        kept = directions[: self.out_features]
        # A direction's sign is arbitrary: make each one's largest entry positive, so the same
        # data gives the same weights on every machine.
        largest = kept.gather(1, kept.abs().argmax(1, keepdim=True))
        kept = kept * torch.where(largest < 0, -1.0, 1.0).to(kept)
        self.weight.copy_(kept.to(self.weight))
        self.bias.copy_((-kept @ mean).to(self.bias))
        self.fitted.fill_(True)
        variance = singular.square()
        return float(variance[: self.out_features].sum() / variance.sum().clamp_min(1e-300)), mean


@register(
    "PCAInv",
    Arg("in_features", infer="features", doc="input features: the mirrored PCA's components"),
    Arg("out_features", doc="output features: the mirrored PCA's input features"),
    doc="linear layer set to the inverse of the encoder's mirrored PCA before the first step, then trained",
)
class PrincipalComponentsInverse(nn.Linear):
    @torch.no_grad()
    def mirror(self, pca: PrincipalComponents, mean: torch.Tensor) -> None:
        """W^T y + mean: the inverse of ``pca`` (fitted to inputs of this ``mean``) on its components."""
        self.weight.copy_(pca.weight.t())
        self.bias.copy_(mean.to(self.bias))


# --- which PCAInv mirrors which PCA --------------------------------------------------------------

def _tokens(plan):
    """(layer name, kwargs, spec) of every token of a traced stack, residual spans' insides included."""
    for (layer, kwargs), spec in zip(plan.layers, plan.specs):
        if spec.is_residual:
            yield from _tokens(kwargs["body"])
            if kwargs.get("shortcut") is not None:
                yield from _tokens(kwargs["shortcut"])
        else:
            yield layer.name, kwargs, spec


def check_mirrors(encoder_plan, decoder_plan) -> None:
    """Raise StructureError unless every decoder PCAInv mirrors an encoder PCA (the last PCAInv
    the first PCA, and so on) with the sizes swapped, and no PCA is in the decoder."""
    pcas = [(k, s) for name, k, s in _tokens(encoder_plan) if name == "PCA"]
    inverses = []
    for name, kwargs, spec in _tokens(decoder_plan):
        if name == "PCA":
            raise spec.error("PCA fits the encoder's input before training and belongs in the encoder; "
                             "in the decoder, PCAInv is the mirror of an encoder PCA")
        if name == "PCAInv":
            inverses.append((kwargs, spec))
    if not inverses:
        return
    if len(inverses) != len(pcas):
        raise inverses[0][1].error(f"the decoder has {len(inverses)} PCAInv token(s) and the encoder {len(pcas)} PCA "
                                   "token(s); each PCAInv mirrors one PCA (the decoder's last PCAInv the "
                                   "encoder's first PCA), so their numbers must match")
    for (inverse, spec), (pca, pca_spec) in zip(reversed(inverses), pcas):
        if (inverse["in_features"], inverse["out_features"]) != (pca["out_features"], pca["in_features"]):
            raise spec.error(f"PCAInv_{inverse['in_features']}_{inverse['out_features']} mirrors the encoder's "
                             f"PCA_{pca['in_features']}_{pca['out_features']} (position {pca_spec.position}), so it "
                             f"must be PCAInv_{pca['out_features']}_{pca['in_features']}")


# --- fitting -----------------------------------------------------------------------------------------

class _Captured(Exception):
    """Stops an encoder pass once the layer being fitted has seen its input."""


def fits_to_data(model) -> bool:
    """Whether ``model`` has layers that a fresh run fits to the data before its first step."""
    return any(isinstance(m, PrincipalComponents) for m in model.encoder.modules())


@torch.no_grad()
def fit_to_data(model, images: torch.Tensor, labels=None, chunk: int = 256,
                more: str = "use more images") -> list[str]:
    """Fit the encoder's PCA layers, in order, to ``images`` (each one's input depends on the
    ones before it), then set the decoder's PCAInv layers to their mirrors. Returns one line per
    fitted layer; ``more``: how the caller's user gets more images, for the error on too few."""
    pcas = [m for m in model.encoder.modules() if isinstance(m, PrincipalComponents)]
    inverses = [m for m in model.decoder.modules() if isinstance(m, PrincipalComponentsInverse)]
    was_training = model.training
    model.eval()
    lines, means = [], []
    try:
        for number, layer in enumerate(pcas, 1):
            seen = []

            def capture(module, args):
                seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).cpu())
                raise _Captured

            handle = layer.register_forward_pre_hook(capture)
            try:
                for start in range(0, len(images), chunk):
                    try:
                        model.encode(images[start:start + chunk],
                                     labels=None if labels is None else labels[start:start + chunk])
                    except _Captured:
                        pass
            finally:
                handle.remove()
            inputs = torch.cat(seen)
            if len(inputs) < layer.out_features + 1:
                raise TrainingError(
                    f"PCA_{layer.in_features}_{layer.out_features} (the encoder's PCA number {number}) needs at "
                    f"least {layer.out_features + 1} samples to fit {layer.out_features} components, but "
                    f"{len(images)} images gave {len(inputs)}; {more}, or keep fewer components")
            share, mean = layer.fit(inputs)
            means.append(mean)
            lines.append(f"PCA_{layer.in_features}_{layer.out_features}: its {layer.out_features} components hold "
                         f"{share:.1%} of the variance of {len(inputs)} inputs")
        for inverse, pca, mean in zip(reversed(inverses), pcas, means):
            inverse.mirror(pca, mean)
    finally:
        model.train(was_training)
    return lines

