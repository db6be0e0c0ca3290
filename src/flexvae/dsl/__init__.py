"""Text -> typed specs. Pure Python: nothing here imports torch."""

from .grammar import INFER, TokenSpec, parse_token
from .structure import load_structure, parse_structure

__all__ = ["INFER", "TokenSpec", "parse_token", "load_structure", "parse_structure"]
