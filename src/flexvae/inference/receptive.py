"""How far each output position of a network reaches into its input: the receptive field that
makes tiled inference exact.

A layer maps input positions to output positions at a scale: output position ``o`` of a
layer whose input is ``s`` times its output (s = 2 for a stride-2 convolution, 1/2 for a 2x
upsampling) covers the input interval [o s, (o + 1) s), and reads the input positions up to
``m`` units (its *margin*, in its own input's units) beyond that interval on either side.
Chained, margins add up scaled to the network's input: M = sum over layers of m * r, where
``r`` is how many network-input units one unit of that layer's input spans. A tile whose
border lies at least M input units beyond an output position's interval computes that
position exactly as the whole image does (the zero padding at the tile's border never
reaches it). Branches (a residual block's shortcut) are counted as if chained, which can only
over-estimate M.

``footprint`` runs the network once on an example with hooks on every module: each leaf
module (or a module that declares ``receptive_margin``) contributes its margin at the scale
its input has. Some layers see every position (attention, a linear layer over a flattened
map, LayerNorm over the last axis, position embeddings): the footprint lists them and tiling
is only approximate. GroupNorm normalises with statistics of the whole feature map; it is
pointwise once those statistics are known, so the footprint lists the GroupNorms (with the
scale of their input) for a first pass that computes them over the whole image
(exact_tiles.py).

A layer class states its own behaviour with ``receptive_margin``: a number (its margin in
input units; 0 for a per-position layer), or None when it sees every position. A module with
children that states nothing is looked into; one defined outside flexvae and torch.nn is
counted as seeing every position, since its forward may do anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn as nn

# Leaf layers that act on each position alone.
_POINTWISE = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink,
    nn.Softsign, nn.Threshold, nn.GLU, nn.Softmax2d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,  # running statistics at inference
)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


@dataclass
class Footprint:
    """What tiling needs to know about a network, per spatial axis (input units)."""

    margin: tuple  # M: how far beyond its own interval an output position reads (Fractions)
    scale: tuple  # output units per input unit (Fractions): 1/8 for an 8x encoder, 8 for its decoder
    align: tuple  # tile starts must be multiples of these, so every layer's grid lines up
    global_layers: list = field(default_factory=list)  # names of the layers that see every position
    norms: list = field(default_factory=list)  # (GroupNorm module, its input's r per axis), in call order
    names: dict = field(default_factory=dict)  # module -> a readable name, for messages

    @property
    def exact(self) -> bool:
        return not self.global_layers

    def halo(self) -> tuple:
        """Per axis: the margin rounded up to whole multiples of ``align`` (input units)."""
        return tuple(math.ceil(m / a) * a for m, a in zip(self.margin, self.align))

    def needed_overlap(self) -> int:
        """The overlap (input units) between neighbouring tiles that makes tiling exact."""
        return 2 * max(self.halo(), default=0)


def _tuple(value, dims: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _leaf_margin(module: nn.Module, dims: int):
    """Per-axis margins of a leaf layer in its input's units; None when it sees every position."""
    declared = getattr(module, "receptive_margin", "undeclared")
    if declared != "undeclared":
        return None if declared is None else _tuple(declared, dims)
    if isinstance(module, _POINTWISE) or isinstance(module, nn.GroupNorm):
        return (0,) * dims
    if isinstance(module, nn.Softmax):
        return (0,) * dims if module.dim in (1, -dims - 1) else None
    if isinstance(module, _CONV):
        if module.padding_mode == "circular":
            return None  # the image's far side wraps round to its border
        kernel, stride, dilation = (_tuple(getattr(module, k), dims) for k in ("kernel_size", "stride", "dilation"))
        padding = module.padding
        if isinstance(padding, str):  # "same" / "valid": bounded by the kernel's extent either way
            padding = tuple((k - 1) * d for k, d in zip(kernel, dilation))
        padding = _tuple(padding, dims)
        return tuple(max(p, (k - 1) * d + 1 - s - p, 0) for k, s, d, p in zip(kernel, stride, dilation, padding))
    if isinstance(module, _CONV_T):
        kernel, stride, dilation, padding = (_tuple(getattr(module, k), dims)
                                             for k in ("kernel_size", "stride", "dilation", "padding"))
        # output o reads inputs ceil((o + p - (k-1) d) / s) .. floor((o + p) / s); its own interval is [o/s, (o+1)/s)
        return tuple(max(Fraction((k - 1) * d - p, s), Fraction(p - 1, s) + 1, 0)
                     for k, s, d, p in zip(kernel, stride, dilation, padding))
    if isinstance(module, _POOL):
        kernel = _tuple(module.kernel_size, dims)
        stride = _tuple(module.stride or module.kernel_size, dims)
        padding = _tuple(module.padding, dims)
        dilation = _tuple(getattr(module, "dilation", 1), dims)
        extra = 1 if getattr(module, "ceil_mode", False) else 0
        return tuple(max(p, (k - 1) * d + 1 - s - p, 0) + extra
                     for k, s, d, p in zip(kernel, stride, dilation, padding))
    if isinstance(module, nn.Upsample):
        # nearest reads the input unit its output lies in; (bi/tri)linear one beyond, bicubic two
        return ({"nearest": 0, "nearest-exact": 0, "bicubic": 2}.get(module.mode, 1),) * dims
    if isinstance(module, (nn.PixelShuffle, nn.PixelUnshuffle)):
        return (0,) * dims  # a pure rearrangement: output o reads exactly its own interval
    return None  # Linear (over the last axis), LayerNorm, Flatten, attention, or unknown


def _declares(module: nn.Module) -> bool:
    return "receptive_margin" in dir(type(module)) or "receptive_margin" in vars(module)


def _opaque(module: nn.Module) -> bool:
    """A module with children whose forward flexvae cannot vouch for."""
    home = type(module).__module__
    return not (home.startswith("flexvae.") or home.startswith("torch.nn.") or isinstance(
        module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)))


@torch.no_grad()
def footprint(fn, roots, example: torch.Tensor, names: dict | None = None) -> Footprint:
    """Run ``fn(example)`` once, watching the modules under ``roots`` (the modules ``fn`` uses),
    and add up what each contributes. ``example`` is (B, C, *spatial); ``names``: module ->
    readable name (the token and its position) for messages."""
    dims = example.dim() - 2
    size_in = tuple(int(s) for s in example.shape[2:])
    calls = []
    owner = {}  # module -> the declaring or opaque ancestor that speaks for it
    speakers = set()  # modules counted as one layer: leaves, declaring and opaque modules

    def visit(module, speaker):
        owner[module] = speaker
        speaks = speaker is None and (_declares(module) or (not list(module.children())) or _opaque(module))
        if speaks:
            speakers.add(module)
        for child in module.children():
            visit(child, speaker if speaker is not None else (module if speaks else None))

    for root in roots:
        if root is not None:
            visit(root, None)
    hooks = []

    def hook(module, inputs, output):
        if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() >= 2:
            out = output[0] if isinstance(output, (tuple, list)) else output
            calls.append((module, tuple(inputs[0].shape[2:]), tuple(getattr(out, "shape", ())[2:])))

    for module in owner:
        hooks.append(module.register_forward_hook(hook))
    try:
        result = fn(example)
    finally:
        for handle in hooks:
            handle.remove()
    size_out = tuple(int(s) for s in result.shape[2:])
    names = names or {}
    margin = [Fraction(0)] * dims
    align = [1] * dims
    global_layers, norms, seen_norms = [], [], set()
    for module, shape_in, shape_out in calls:
        if owner[module] is not None or module not in speakers:
            continue  # an ancestor speaks for it, or its children speak for themselves
        name = names.get(module, type(module).__name__)
        if name != type(module).__name__ and not name.endswith(f"({type(module).__name__})"):
            name = f"{name[:-1]}: {type(module).__name__})" if name.endswith(")") else name
        if isinstance(module, nn.GroupNorm) and not _declares(module):
            if module in seen_norms:
                global_layers.append(f"{name} (normalises twice in one pass)")
            seen_norms.add(module)
        speaks_as_leaf = _declares(module) or not list(module.children())
        if not speaks_as_leaf:  # an opaque module with children
            global_layers.append(name)
            continue
        if len(shape_in) != dims:
            global_layers.append(name)  # it sees a reshaped (flattened) map
            continue
        r_in = tuple(Fraction(a, b) for a, b in zip(size_in, shape_in))
        if isinstance(module, nn.GroupNorm) and not _declares(module):
            norms.append((module, r_in))
        leaf = _leaf_margin(module, dims)
        if leaf is None:
            global_layers.append(name)
            continue
        for axis in range(dims):
            margin[axis] += Fraction(leaf[axis]) * r_in[axis]
        for r in (r_in, tuple(Fraction(a, b) for a, b in zip(size_in, shape_out)) if len(shape_out) == dims else ()):
            for axis, value in enumerate(r):
                if value > 1:
                    if value.denominator != 1:
                        global_layers.append(f"{name} (its grid does not line up with the input's)")
                    else:
                        align[axis] = math.lcm(align[axis], int(value))
    if len(size_out) != dims:
        global_layers.append("the output (not a map of positions)")
        scale = (Fraction(0),) * dims
    else:
        scale = tuple(Fraction(b, a) for a, b in zip(size_in, size_out))
        for axis, value in enumerate(scale):
            if value < 1 and value.numerator == 1:
                align[axis] = math.lcm(align[axis], value.denominator)
    return Footprint(tuple(margin), scale, tuple(align), list(dict.fromkeys(global_layers)), norms, dict(names))


def layer_names(stack, prefix: str) -> dict:
    """module -> 'encoder token C2d_3_64_3_1_1 (position 1)' for every module of a built stack."""
    names = {}
    for index, layer in enumerate(stack):
        label = f"{prefix} layer {index + 1} ({type(layer).__name__})"
        for module in layer.modules():
            names[module] = label
    return names


def summary(plan) -> str:
    """One line for ``--check``: how far the encoder and the decoder read around a position, the
    overlap exact tiling takes, or which layers make tiling approximate (traced on the meta device)."""
    dims = len(plan.data_shape) - 1
    if plan.decoder.groups or any(layer.context == "labels" for stack in (plan.encoder, plan.decoder)
                                  for layer, _ in stack.layers):
        return "tiling: not for hierarchical or conditional models (they read whole images)"
    if len(plan.latent_shape) != dims + 1:
        return "tiling: not for this model (its latent is not a map of positions)"
    with torch.device("meta"):
        vae = plan.build("meta").eval()
    factor = plan.data_shape[-1] // plan.latent_shape[-1]
    enc = footprint(lambda t: vae.encode(t).mode(), [vae.encoder, vae.latent],
                    torch.zeros((1, *plan.data_shape), device="meta"), layer_names(vae.encoder, "encoder"))
    dec = footprint(lambda t: vae.to_image(vae.decode(t)), [vae.decoder],
                    torch.zeros((1, *plan.latent_shape), device="meta"), layer_names(vae.decoder, "decoder"))
    reach = (f"the encoder reads {float(max(enc.margin)):.3g} px around each latent position's pixels, the decoder "
             f"{float(max(dec.margin)):.3g} latent positions around each pixel's")
    if enc.exact and dec.exact:
        overlap = max(enc.needed_overlap(), dec.needed_overlap() * factor)
        return f"receptive field: {reach}; --tile is exact with tiles overlapping by {overlap} px"
    layers = list(dict.fromkeys(enc.global_layers + dec.global_layers))
    shown = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
    return f"receptive field: every position (layers that see all of them: {shown}); --tile is approximate"
