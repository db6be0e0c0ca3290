"""Command line: ``python train.py -t`` (FlexVAE's flags) and ``flexvae train`` (subcommands).

The only part of the package that knows argparse: ``modes.py`` holds the table of modes and
builds both parsers from it; the handlers (``handlers.py``, ``analysis.py``) call library
functions with typed values. User mistakes (FlexVAEError) and failed file operations (OSError) print one line
and exit with status 1 (130 after Ctrl-C); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

from ..errors import FlexVAEError, describe_os_error, shown_path
from .modes import MODES, check_options, flexvae_parser, handler_for, mode_parser, train_py_parser

__all__ = ["main", "MODES", "flexvae_parser", "train_py_parser"]


# C0 and C1 controls and the Unicode line separators: everything str.splitlines() breaks at
_CONTROL = {c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}")
            for c in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]}


_LONG_WORD = re.compile(r"\S{300,}")


def one_line(message: str) -> str:
    """A message as one printable line: control characters (a newline or carriage return in a
    user's value) are written as escapes, and a word of thousands of characters (a path or a
    value pasted by mistake) is cut in the middle."""
    return _LONG_WORD.sub(lambda m: shown_path(m.group()), str(message).translate(_CONTROL))


def _mode_help(argv) -> str | None:
    """``train.py -t -h``: the help of that mode alone (what ``flexvae train -h`` prints), or None."""
    flags = {mode.flag: mode for mode in MODES}
    chosen = [flags[a] for a in argv if a in flags]
    if len(chosen) != 1 or not {"-h", "--help"} & set(argv):
        return None
    return mode_parser(chosen[0], f"train.py {chosen[0].flag}").format_help()


# The modes' train.py flags as they stand in messages, and the subcommand each is under ``flexvae``
_FLAGS = {mode.flag: mode.name for mode in MODES}
_FLAG_IN_TEXT = re.compile(r"(?<![\w./-])(?:python )?(?:train\.py )?(" + "|".join(
    re.escape(flag) for flag in sorted(_FLAGS, key=len, reverse=True)) + r")(?![\w-])")


def speak_as(prog: str, message: str) -> str:
    """A message's commands as the user typed them: ``python train.py --layers`` and ``-mem``
    read ``flexvae layers`` and ``flexvae mem`` when the command was ``flexvae``."""
    if prog == "train.py":
        return str(message)
    return _FLAG_IN_TEXT.sub(lambda m: f"flexvae {_FLAGS[m.group(1)]}", str(message))


def main(argv=None, prog: str = "flexvae") -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if prog == "train.py" and (text := _mode_help(argv)) is not None:
        print(text, end="")
        return 0
    parser = train_py_parser() if prog == "train.py" else flexvae_parser()
    args = parser.parse_args(argv)
    try:
        check_options(args)
        with contextlib.ExitStack() as args.outputs:  # the output folders a mode opens (common.claim_output)
            return handler_for(args)(args)
    except FlexVAEError as exc:
        if args.debug:
            raise
        print(f"error: {one_line(speak_as(prog, exc))}", file=sys.stderr)
        return exc.exit_status
    except BrokenPipeError:  # `flexvae layers | head`: the reader has what it wanted
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush at exit
        return 141  # as a program killed by SIGPIPE
    except OSError as exc:  # disk full, permission denied, a name too long ... while reading or writing
        if args.debug:
            raise
        print(f"error: {one_line(describe_os_error(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # -t turns Ctrl-C into a TrainingError after saving; other modes stop here
        if args.debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
