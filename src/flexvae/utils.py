"""Small helpers shared across the package."""

import difflib
from collections.abc import Iterable


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Candidates that look like ``name`` (case-insensitive), best first."""
    candidates = list(candidates)
    by_lower = {c.lower(): c for c in candidates}
    found = difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.5)
    return [by_lower[f] for f in found]


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' Did you mean 'a' or 'b'?' or an empty string when nothing is close."""
    matches = close_matches(name, candidates)
    if not matches:
        return ""
    quoted = [repr(m) for m in matches]
    if len(quoted) == 1:
        return f" Did you mean {quoted[0]}?"
    return f" Did you mean {', '.join(quoted[:-1])} or {quoted[-1]}?"


def format_shape(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"
