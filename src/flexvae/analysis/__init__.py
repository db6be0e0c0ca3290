"""Understanding a trained model: evaluation, interpolation, pictures, latent probes and
experiment matrices. Each module holds one concept; the CLI modes are thin calls into them.

matplotlib (pictures) and scikit-learn (probe) are optional extras, imported only when
a function needs them; :func:`require` turns a missing one into a readable error.
"""

from __future__ import annotations

import importlib

from ..errors import FlexVAEError


class MissingDependency(FlexVAEError):
    """An optional extra is needed for this command but not installed."""


EXTRAS = {"matplotlib": ("matplotlib", "plots"), "sklearn": ("scikit-learn", "probe")}


def require(module: str, purpose: str):
    """Import ``module`` or raise MissingDependency naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package, extra = EXTRAS.get(module.split(".")[0], (module, None))
        hint = (f'pip install "flexvae[{extra}]" (from a clone: pip install -e ".[{extra}]")' if extra
                else f"pip install {package}")
        raise MissingDependency(f"{purpose} needs {package}, which is not installed; install it with: {hint}") from None
