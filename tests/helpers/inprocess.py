"""Running the command line inside the test process: a subprocess costs a torch import
(seconds) per command, a call of ``flexvae.cli.main`` costs nothing extra."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _print_warning(message, category, filename, lineno, file=None, line=None):
    print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.stderr)


def run_in_process(args, cwd=REPO, prog: str = "train.py") -> subprocess.CompletedProcess:
    """``python train.py ARGS`` (or ``flexvae ARGS``) as this process runs it: exit status,
    stdout and stderr, with warnings printed to stderr as a fresh process would print them."""
    from flexvae.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = _print_warning
            try:
                code = main([str(a) for a in args], prog=prog)
            except SystemExit as exc:  # argparse usage errors
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess([prog, *args], code, out.getvalue(), err.getvalue())
