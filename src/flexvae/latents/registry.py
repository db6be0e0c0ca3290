"""Latent registry: each latent type is registered next to its class, with its parameters.

    @dataclass(frozen=True)
    class VQParams:
        codebook_size: int = setting(512, "vq: codebook entries", POSITIVE)

    @register_latent("vq", VQParams, doc="vector quantization")
    class VQLatent(DiscreteLatent): ...

``model.latent`` names a registered type; the config's ``[latent]`` section holds the fields
of that type's parameter dataclass and nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError
from ..utils import did_you_mean


@dataclass(frozen=True)
class NoParams:
    """A latent type without settings."""


@dataclass(frozen=True)
class LatentType:
    name: str
    cls: type
    params: type
    doc: str

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.params))

    def build(self, params=None):
        return self.cls.from_params(params if params is not None else self.params())


class LatentRegistry:
    def __init__(self):
        self._types: dict[str, LatentType] = {}

    def register(self, name: str, params: type = NoParams, doc: str = ""):
        """Class decorator: the latent type ``name`` (``model.latent = "name"``) with its
        settings dataclass ``params`` (the config's ``[latent]`` keys) and a one-line ``doc``."""
        if not dataclasses.is_dataclass(params):
            raise TypeError(f"latent {name!r}: params must be a dataclass, got {params!r}")

        def decorator(cls):
            if name in self._types and self._types[name].cls is not cls:
                raise ValueError(f"latent {name!r} is already registered by {self._types[name].cls.__name__}")
            cls.kind, cls.Params = name, params
            self._types[name] = LatentType(name, cls, params, doc or (cls.__doc__ or "").strip().split("\n")[0])
            return cls

        return decorator

    def unregister(self, name: str) -> None:
        self._types.pop(name, None)

    def get(self, name: str) -> LatentType:
        try:
            return self._types[name]
        except KeyError:
            raise ConfigError(f"model.latent = {name!r} is not a latent type.{did_you_mean(str(name), self._types)} "
                              f"Choose one of {', '.join(self._types)}") from None

    def names(self) -> list[str]:
        return list(self._types)

    def owners(self, key: str) -> list[str]:
        """The latent types that have a [latent] key of this name."""
        return [t.name for t in self._types.values() if key in t.keys]

    def __contains__(self, name) -> bool:
        return name in self._types

    def __iter__(self):
        return iter(self._types.values())


LATENTS = LatentRegistry()
register_latent = LATENTS.register
