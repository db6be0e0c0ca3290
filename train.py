#!/usr/bin/env python
"""flexvae's command line with the original FlexVAE flags: -t, -i, -e, -d, -mem (see --help)."""

import sys
from pathlib import Path

try:
    from flexvae.cli import main
except ImportError:  # running from a clone without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from flexvae.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="train.py"))
