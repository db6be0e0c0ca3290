"""Layer registry: each token is registered next to the class that implements it.

    @register("VAERB", Arg("in_channels", infer="channels"), Arg("out_channels"),
              doc="residual block: GroupNorm, SiLU, conv3x3, twice, plus the input")
    class ResidualBlock(nn.Module): ...

The declared arguments are the token's grammar: their order is the positional order, their
types and defaults are checked when a token is bound, and ``--layers`` prints them. A user
registers their own layers the same way from a module named in ``model.plugins``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .dsl.grammar import INFER, TokenSpec
from .errors import FlexVAEError
from .utils import did_you_mean, format_shape


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()
_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true/false (or 1/0)", str: "a word"}


@dataclass(frozen=True)
class Arg:
    """One argument of a token.

    ``infer`` names what ``?`` stands for and what the value is checked against:
    "channels" is the input's channel count (dim 0 of the per-sample shape),
    "features" its last dimension.
    """

    name: str
    type: type = int
    default: Any = REQUIRED
    doc: str = ""
    infer: str | None = None
    choices: tuple | None = None
    variadic: bool = False

    @property
    def required(self) -> bool:
        """Whether the token must give this argument (it has no default)."""
        return self.default is REQUIRED

    def describe(self) -> str:
        """``name`` or ``name=default`` as the token reference shows it."""
        text = self.name + ("..." if self.variadic else "")
        if not self.required:
            text += f"={_show(self.default)}"
        return text


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class LayerType:
    """A registered token: its abbreviation, factory and declared arguments."""

    name: str
    factory: Callable
    args: tuple[Arg, ...]
    doc: str
    dims: tuple[int, ...] | None = None  # spatial dims it accepts; None = any
    pass_dims: bool = False  # factory takes dims= (1, 2 or 3) from the input shape
    aux: bool = False  # forward returns (output, {name: loss}); see build.Stack
    # forward takes (x, state), a hierarchy.ForwardState: "labels" (context tokens; the factory
    # gets classes=), "keep" (names an encoder activation), "group" (a decoder latent group)
    context: str | None = None

    def signature(self) -> str:
        """Call-style signature, e.g. ``C2d(in_channels, out_channels, kernel_size, stride=1, ...)``."""
        return f"{self.name}({', '.join(a.describe() for a in self.args)})"

    def bind(self, spec: TokenSpec, in_shape: tuple[int, ...], input_name: str = "its input") -> dict:
        """Check the spec's arguments against the declaration; fill '?' and defaults.

        ``input_name`` says in errors where the input comes from ("the latent", ...).
        """
        usage = f"usage: {self.signature()}"
        values: dict[str, Any] = {}
        positional = list(spec.args)
        for arg in self.args:
            if not positional:
                break
            if arg.variadic:
                values[arg.name] = tuple(positional)
                positional = []
            else:
                values[arg.name] = positional.pop(0)
        if positional:
            raise spec.error(
                f"{self.name} takes at most {len(self.args)} arguments, found {len(spec.args)} ({usage})"
            )
        by_name = {a.name: a for a in self.args}
        for key, value in spec.kwargs.items():
            if key not in by_name:
                raise spec.error(
                    f"{self.name} has no argument {key!r}.{did_you_mean(key, by_name)} ({usage})"
                )
            if key in values:
                raise spec.error(f"argument {key!r} is given both by position and by name ({usage})")
            values[key] = (value,) if by_name[key].variadic and not isinstance(value, tuple) else value

        kwargs = {}
        for arg in self.args:
            if arg.name not in values:
                if arg.default is INFER:  # left out: taken from the input, as '?' would
                    kwargs[arg.name] = self._resolve(spec, arg, INFER, in_shape, usage, input_name)
                    continue
                if arg.required:
                    raise spec.error(f"missing argument {arg.name!r} ({usage})")
                kwargs[arg.name] = arg.default
                continue
            value = values[arg.name]
            if arg.variadic:
                kwargs[arg.name] = tuple(_convert(spec, arg, v, usage) for v in value)
            else:
                kwargs[arg.name] = self._resolve(spec, arg, value, in_shape, usage, input_name)
        if self.pass_dims:
            kwargs["dims"] = len(in_shape) - 1
        return kwargs

    def _resolve(self, spec, arg: Arg, value, in_shape, usage, input_name):
        actual = None
        if arg.infer == "channels":
            actual, what = in_shape[0], "channels"
        elif arg.infer == "features":
            actual, what = in_shape[-1], "features (last dimension)"
        if value is INFER:
            if actual is None:
                raise spec.error(
                    f"'?' cannot stand for {arg.name!r}: only input sizes can be inferred ({usage})"
                )
            return actual
        value = _convert(spec, arg, value, usage)
        if actual is not None and value != actual:
            raise spec.error(
                f"channel mismatch: {arg.name}={value}, but {input_name} has {actual} {what} "
                f"(shape {format_shape(in_shape)}). Write {actual} or '?'."
            )
        return value


def _convert(spec: TokenSpec, arg: Arg, value, usage: str):
    if value is INFER:
        raise spec.error(f"'?' cannot stand for {arg.name!r} ({usage})")
    expected = _TYPE_WORDS[arg.type]
    if arg.type is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif arg.type is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif arg.type is bool:
        ok = isinstance(value, bool) or value in (0, 1)
        value = bool(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise spec.error(f"argument {arg.name!r} must be {expected}, found {_show(value)!r} ({usage})")
    if arg.choices is not None and value not in arg.choices:
        options = ", ".join(_show(c) for c in arg.choices)
        raise spec.error(f"argument {arg.name!r} must be one of {options}, found {_show(value)!r}")
    return value


@dataclass
class Registry:
    """Name -> LayerType. Lookups of unknown names suggest the closest registered names."""

    layers: dict[str, LayerType] = field(default_factory=dict)

    def register(self, name: str, *args: Arg, doc: str, dims=None, pass_dims=False, aux=False, context=None):
        """Decorator registering a class (or factory function) under a token name."""
        if not name.isalnum() or not name[0].isalpha():
            raise ValueError(f"token name {name!r} must be letters and digits, starting with a letter")
        seen = set()
        for i, arg in enumerate(args):
            if arg.name in seen:
                raise ValueError(f"{name}: argument {arg.name!r} declared twice")
            seen.add(arg.name)
            if arg.variadic and i != len(args) - 1:
                raise ValueError(f"{name}: only the last argument can be variadic")
        dims = (dims,) if isinstance(dims, int) else dims

        def decorator(factory):
            if name in self.layers and self.layers[name].factory is not factory:
                raise FlexVAEError(
                    f"layer token {name!r} is already registered by "
                    f"{self.layers[name].factory.__module__}; choose another name"
                )
            self.layers[name] = LayerType(name, factory, tuple(args), doc, dims, pass_dims, aux, context)
            return factory

        return decorator

    def get(self, spec: TokenSpec) -> LayerType:
        try:
            return self.layers[spec.name]
        except KeyError:
            hint = did_you_mean(spec.name, self.layers)
            raise spec.error(
                f"unknown layer {spec.name!r}.{hint} Run `python train.py --layers` for the full list."
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def __iter__(self):
        return iter(self.layers.values())

    def names(self) -> list[str]:
        return list(self.layers)

    def table(self) -> str:
        """Every token with its arguments and doc line (``train.py --layers``)."""
        lines = []
        for layer in sorted(self.layers.values(), key=lambda t: t.name.lower()):
            lines.append(f"{layer.signature()}\n    {layer.doc}")
            for arg in layer.args:
                if arg.doc:
                    infer = " ('?' = from input)" if arg.infer else ""
                    lines.append(f"      {arg.name}: {arg.doc}{infer}")
        return "\n".join(lines)


@dataclass
class ClassRegistry(Registry):
    """Classes named by tokens outside the structures (loss terms, priors): ``what`` and
    ``known`` word them in errors ("loss term", "Known terms"), ``listing`` is the command that
    lists them, ``builtin`` names that are known without a registered class (the Normal prior)."""

    what: str = "token"
    known: str = "Known"
    listing: str = ""
    builtin: tuple = ()

    def get(self, spec):
        try:
            return self.layers[spec.name]
        except KeyError:
            known = [*self.builtin, *sorted(self.layers)]
            raise spec.error(f"unknown {self.what} {spec.name!r}.{did_you_mean(spec.name, known)} {self.known}: "
                             f"{', '.join(known)} ({self.listing})") from None

    def register_class(self, name: str, *args: Arg, doc: str):
        """Class decorator: ``cls`` registered under ``name`` with its typed arguments; ``cls.token = name``."""
        register = self.register(name, *args, doc=doc)

        def decorator(cls):
            cls.token = name
            return register(cls)
        return decorator


LAYERS = Registry()
register = LAYERS.register
