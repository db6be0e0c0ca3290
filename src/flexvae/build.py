"""Specs -> modules. The only place where token specs become ``nn.Module``s.

Every structure is first traced on the meta device (no memory, no compute): each layer is
built with meta parameters and run on a meta tensor of the incoming shape, so a wrong
argument, a channel mismatch or a layer that cannot take its input is reported with the
file, position and token before any real weight exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import layers  # noqa: F401  (registers the built-in tokens)
from .dsl.grammar import TokenSpec
from .forward_state import ForwardState
from .latents import GaussianLatent, Latent
from .layers.latent_groups import scale_groups, scale_residual_blocks
from .layers.pca import check_mirrors
from .model import VAE, Stack
from .registry import LAYERS, LayerType, Registry
from .utils import format_shape

_DIM_NAMES = {1: "(C, L)", 2: "(C, H, W)", 3: "(C, D, H, W)"}


@dataclass
class LayerRow:
    position: int | None
    token: str
    out_shape: tuple[int, ...]
    params: int


@dataclass
class StackPlan:
    """The outcome of tracing a structure: what to build and the shapes it produces."""

    source: str | None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    layers: list[tuple[LayerType, dict]] = field(default_factory=list)
    rows: list[LayerRow] = field(default_factory=list)
    specs: list[TokenSpec] = field(default_factory=list)
    kept: dict = field(default_factory=dict)  # encoder activations named by Keep tokens: name -> shape
    groups: list = field(default_factory=list)  # the decoder's latent groups (Z tokens): (name, shape)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    def build(self, device=None) -> Stack:
        """Real modules on ``device`` (random init, in structure order, so seeding holds)."""
        with torch.device(device or "cpu"):
            modules = [layer.factory(**kwargs) for layer, kwargs in self.layers]
        scale_groups(modules)
        return Stack(modules, [layer.aux for layer, _ in self.layers], self.checkpoint_groups(),
                     [layer.context for layer, _ in self.layers])

    def checkpoint_groups(self) -> list:
        """Per layer: None, or a key shared by the layers recomputed together."""
        groups = []
        for index, spec in enumerate(self.specs):
            if spec.checkpoint == "token":
                groups.append(f"token{index}")  # every repeat of an '@' token on its own
            elif spec.checkpoint is not None:
                groups.append(f"span{spec.checkpoint}")
            else:
                groups.append(None)
        return groups


def expand(specs: list[TokenSpec]) -> list[TokenSpec]:
    """Unroll ``N*TOKEN`` into N specs that keep the original text and position."""
    return [spec for spec in specs for _ in range(spec.repeat)]


def trace(specs: list[TokenSpec], in_shape, *, registry: Registry = LAYERS,
          input_name: str = "the input", classes: int | None = None, kept: dict | None = None) -> StackPlan:
    """Check a structure against a per-sample input shape without allocating anything.
    ``classes``: the number of label classes that context tokens embed (None: no labels);
    ``kept``: the encoder activations a decoder's latent groups may use (name -> shape)."""
    in_shape = tuple(int(s) for s in in_shape)
    source = specs[0].source if specs else None
    plan = StackPlan(source=source, in_shape=in_shape, out_shape=in_shape)
    shape = in_shape
    seen: dict = {}
    for index, spec in enumerate(expand(specs)):
        if spec.is_residual:
            layer, kwargs, shape, params = _trace_residual(spec, shape, registry, _describe_input(index, input_name),
                                                           classes, kept)
            plan.layers.append((layer, kwargs))
            plan.rows.append(LayerRow(spec.position, _short(spec.text), shape, params))
            plan.specs.append(spec)
            continue
        layer = registry.get(spec)
        spatial = len(shape) - 1
        if layer.dims is not None and spatial not in layer.dims:
            wanted = " or ".join(_DIM_NAMES.get(d, f"{d}D") for d in layer.dims)
            raise spec.error(
                f"{layer.name} works on {wanted} data, but {_describe_input(index, input_name)} "
                f"has shape {format_shape(shape)}"
            )
        kwargs = layer.bind(spec, shape, _describe_input(index, input_name))
        if layer.context is not None:
            _bind_context(layer, spec, kwargs, shape, plan, classes, kept)
        # The same layer with the same arguments on the same input shape traces the same way:
        # repetitive structures are checked once per distinct layer, not once per token.
        key = (layer.name, tuple(sorted(kwargs.items())), shape)
        if key not in seen:
            seen[key] = _trace_layer(layer, kwargs, spec, shape, _describe_input(index, input_name))
        shape, params = seen[key]
        plan.layers.append((layer, kwargs))
        plan.rows.append(LayerRow(spec.position, spec.text, shape, params))
        plan.specs.append(spec)
    plan.out_shape = shape
    return plan


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _build_residual(body: StackPlan, shortcut: StackPlan | None):
    from .layers.residual import ResidualSpan

    device = torch.get_default_device()  # the device the enclosing stack is being built on
    return ResidualSpan(body.build(device), None if shortcut is None else shortcut.build(device))


RESIDUAL = LayerType("Res", _build_residual, (), "residual span: shortcut(x) + body(x)")


def _trace_residual(spec: TokenSpec, shape, registry, input_desc: str, classes, kept):
    """A residual span: its body and shortcut traced as stacks of their own; both must give the same shape."""
    body = trace(list(spec.body), shape, registry=registry, input_name=input_desc, classes=classes, kept=kept)
    shortcut = None
    if spec.shortcut is not None:
        shortcut = trace([spec.shortcut], shape, registry=registry, input_name=input_desc, classes=classes, kept=kept)
    for inner in (body, shortcut):
        if inner is None:
            continue
        for (layer, _), inner_spec in zip(inner.layers, inner.specs):
            if layer.aux or layer.context is not None:
                raise inner_spec.error(f"{layer.name} cannot be inside a residual span (it returns losses or reads "
                                       "the pass's labels or latent groups); put it outside the span")
    through = shortcut.out_shape if shortcut is not None else tuple(shape)
    if body.out_shape != through:
        what = f"its shortcut {spec.shortcut.text!r} gives" if shortcut is not None else "the identity shortcut keeps"
        raise spec.error(f"the residual span's body gives {format_shape(body.out_shape)}, but {what} "
                         f"{format_shape(through)}; both must match (name a shortcut token that maps "
                         f"{format_shape(shape)} to {format_shape(body.out_shape)}, e.g. a 1x1 convolution or S2C/C2S)")
    params = body.params + (shortcut.params if shortcut is not None else 0)
    return RESIDUAL, {"body": body, "shortcut": shortcut}, body.out_shape, params


def _bind_context(layer: LayerType, spec: TokenSpec, kwargs: dict, shape, plan: StackPlan, classes, kept) -> None:
    """What a context token needs beyond its arguments, checked against the model: the class
    count (context tokens), a unique name (Keep), the encoder activation it reads (Z)."""
    if layer.context == "labels":
        if classes is None:
            raise spec.error(f"{layer.name} embeds the class label, but this model has no labels: set "
                             "data.labels to 'folders' (sub-folder names) or a CSV file of labels")
        kwargs["classes"] = classes
    elif layer.context == "keep":
        if kwargs["name"] in plan.kept:
            raise spec.error(f"the name {kwargs['name']!r} is kept twice in this structure; give each Keep its own name")
        plan.kept[kwargs["name"]] = tuple(shape)
    elif layer.context == "group":
        name, enc = kwargs["name"] or kwargs["enc"], kwargs["enc"]
        available = kept or {}
        if enc not in available:
            names = ", ".join(available) or "none (add \"Keep_name=...\" tokens to the encoder)"
            raise spec.error(f"no encoder activation is kept as {enc!r}; the encoder keeps: {names}")
        if tuple(available[enc][1:]) != tuple(shape[1:]):
            raise spec.error(f"the encoder's {enc!r} has shape {format_shape(available[enc])}, but the decoder's state "
                             f"here has shape {format_shape(shape)}: a group needs both at the same positions")
        if any(group == name for group, _ in plan.groups):
            raise spec.error(f"a latent group named {name!r} comes twice; give one of them name=...")
        kwargs.update(in_channels=shape[0], enc_channels=available[enc][0])
        plan.groups.append((name, (kwargs["channels"], *shape[1:])))


# A layer whose input and weights are this small is traced on real CPU tensors: the meta
# device's Python kernels import torch's compiler on first use (about 1.5 s), which a shape
# check of a small model should not pay. Larger layers use the meta device (no memory).
REAL_TRACE_PARAMS = 1 << 20
REAL_TRACE_ELEMENTS = 1 << 18


def _trace_layer(layer: LayerType, kwargs: dict, spec: TokenSpec, shape, input_desc: str):
    """Build one layer and run it on a batch of 2: (output shape, parameter count)."""
    try:
        with torch.device("meta"):
            module = layer.factory(**kwargs)
        params = sum(p.numel() for p in module.parameters())
        device = "meta"
        if params <= REAL_TRACE_PARAMS and 2 * torch.Size(shape).numel() <= REAL_TRACE_ELEMENTS:
            with torch.random.fork_rng(devices=[]):  # the check must not move the seeded RNG
                module, device = layer.factory(**kwargs), "cpu"
    except Exception as exc:  # constructors reject values with several exception types
        raise spec.error(f"invalid arguments for {layer.signature()}: {_first_line(exc)}") from None
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # dropout draws, on real tensors
            x = torch.zeros((2, *shape), device=device)
            if layer.context == "labels":
                out = module(x, torch.zeros(2, dtype=torch.long, device=device))
            elif layer.context == "group":
                enc = torch.zeros((2, kwargs["enc_channels"], *shape[1:]), device=device)
                out = module(x, ForwardState(kept={kwargs["enc"]: enc}, sample=False))
            else:
                out = module(x)
    except Exception as exc:  # torch reports bad sizes with many exception types
        raise spec.error(f"cannot be applied to {input_desc} of shape {format_shape(shape)}: {_first_line(exc)}") from None
    if layer.aux:
        out = out[0]
    out_shape = tuple(out.shape[1:])
    if any(s == 0 for s in out_shape):
        raise spec.error(f"produces an empty output {format_shape(out_shape)}: the input is too small")
    return out_shape, params


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _describe_input(index: int, input_name: str) -> str:
    return input_name if index == 0 else "the previous layer's output"


def format_table(plan: StackPlan, title: str | None = None) -> str:
    """Per-layer table: position, token, output shape, parameters."""
    rows = [("pos", "token", "output shape", "params")]
    rows.append(("", "(input)", format_shape(plan.in_shape), ""))
    for r in plan.rows:
        rows.append((str(r.position or ""), r.token, format_shape(r.out_shape), f"{r.params:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [title] if title else []
    for i, row in enumerate(rows):
        lines.append("  ".join(
            cell.rjust(w) if col in (0, 3) else cell.ljust(w) for col, (cell, w) in enumerate(zip(row, widths))
        ).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(f"total parameters: {plan.params:,}")
    return "\n".join(lines)


def _structure_file(path):
    """``path``, else the shipped preset of that name (``structures/small_encoder.json`` works
    outside a clone, as in configs)."""
    from .presets import PRESETS

    candidate = Path(path)
    try:
        if candidate.exists() or candidate.is_absolute():
            return path
        shipped = PRESETS / candidate
        return shipped if shipped.is_file() else path
    except (OSError, ValueError):  # a name no file can have: load_structure says so
        return path


def as_specs(structure, name: str = "<structure>") -> list[TokenSpec]:
    """A path to a JSON file, a list of token strings, or already parsed specs."""
    from .dsl.structure import load_structure, parse_structure

    if isinstance(structure, (str, os.PathLike)):
        return load_structure(_structure_file(structure))
    if isinstance(structure, list) and structure and all(isinstance(s, TokenSpec) for s in structure):
        return structure
    return parse_structure(structure, source=name)


@dataclass
class VAEPlan:
    """Both stacks traced against the data shape, and the latent between them."""

    data_shape: tuple[int, ...]
    encoder: StackPlan
    decoder: StackPlan
    latent: Latent
    latent_shape: tuple[int, ...]
    classes: tuple[str, ...] | None = None  # the labels' class names (set by assemble.plan_specs)

    def build(self, device=None, scaling_factor: float = 1.0, output: str = "value", likelihood=None) -> VAE:
        """A fresh VAE; ``likelihood`` (a ``likelihoods.Likelihood``, used once) makes it an ELBO model."""
        encoder, decoder = self.encoder.build(device), self.decoder.build(device)
        if self.decoder.groups:  # a hierarchy starts stable: its residual branches start small
            scale_residual_blocks(encoder, decoder)
        return VAE(
            encoder, decoder, self.latent.to(device or "cpu"),
            self.latent_shape, scaling_factor=scaling_factor, output=output,
            likelihood=None if likelihood is None else likelihood.to(device or "cpu"),
        )

    def table(self) -> str:
        """The per-layer table of both stacks (shapes, parameters) with the latent between them."""
        return "\n\n".join([
            format_table(self.encoder, f"encoder ({self.encoder.source})"),
            f"latent: {self.latent.kind}, shape {format_shape(self.latent_shape)}",
            format_table(self.decoder, f"decoder ({self.decoder.source})"),
        ])


def plan_vae(encoder, decoder, data_shape, latent: Latent | None = None, *,
             registry: Registry = LAYERS, output_channels: int | None = None, output_reason: str = "",
             classes: int | None = None) -> VAEPlan:
    """Trace encoder and decoder on the meta device; raise StructureError on any mismatch.

    The decoder reproduces the data shape, or outputs ``output_channels`` channels at the
    data's spatial size where a likelihood needs more parameters than pixel values
    (``output_reason`` says which). ``classes``: how many classes the labels have, for
    context tokens (None: the model takes no labels)."""

    latent = GaussianLatent() if latent is None else latent
    data_shape = tuple(int(s) for s in data_shape)
    encoder_specs, decoder_specs = as_specs(encoder, "<encoder>"), as_specs(decoder, "<decoder>")
    enc = trace(encoder_specs, data_shape, registry=registry, input_name="the input data", classes=classes)
    try:
        latent_shape = tuple(latent.latent_shape(enc.out_shape))
    except ValueError as exc:
        raise enc.specs[-1].error(str(exc)) from None
    dec = trace(
        decoder_specs, latent_shape, registry=registry,
        input_name=f"the {latent.kind} latent (from the encoder's output {format_shape(enc.out_shape)})",
        classes=classes, kept=enc.kept,
    )
    if output_channels is not None and output_channels != data_shape[0]:
        wanted = (output_channels, *data_shape[1:])
        if dec.out_shape != wanted:
            raise dec.specs[-1].error(
                f"the decoder's output has shape {format_shape(dec.out_shape)}, but {output_reason} needs "
                f"{format_shape(wanted)}: {output_channels} channels at the data's spatial size {format_shape(data_shape[1:])}"
            )
    elif dec.out_shape != data_shape:
        raise dec.specs[-1].error(
            f"the decoder's output has shape {format_shape(dec.out_shape)}, but it must reproduce "
            f"the input shape {format_shape(data_shape)} (channels, then spatial sizes)"
        )
    check_mirrors(enc, dec)  # each decoder PCAInv mirrors an encoder PCA
    return VAEPlan(data_shape, enc, dec, latent, latent_shape)


def build_vae(encoder, decoder, data_shape, latent: Latent | None = None, *, device=None,
              scaling_factor: float = 1.0, output: str = "value", registry: Registry = LAYERS):
    """Check, then build: ``build_vae("enc.json", "dec.json", (3, 64, 64))``."""
    plan = plan_vae(encoder, decoder, data_shape, latent, registry=registry)
    return plan.build(device, scaling_factor=scaling_factor, output=output)
