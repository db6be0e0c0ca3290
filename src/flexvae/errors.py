"""Errors caused by the user's input: config, structure files, data, checkpoints.

The CLI prints these as one message and exits non-zero, without a traceback
(``--debug`` shows it). Programming errors stay ordinary exceptions.
"""


class FlexVAEError(Exception):
    """A mistake the user can fix; the message says what and where."""

    exit_status = 1


class StructureError(FlexVAEError):
    """A structure file (token list) is malformed or does not fit the data."""

    def __init__(self, message, source=None, position=None, token=None):
        self.source = source
        self.position = position
        self.token = token
        where = []
        if source is not None:
            where.append(str(source))
        if position is not None:
            where.append(f"position {position}")
        prefix = ", ".join(where)
        if token is not None:
            shown = token if not isinstance(token, str) or len(token) <= 80 else f"{token[:60]}...{token[-12:]}"
            prefix = f"{prefix}, token {shown!r}" if prefix else f"token {shown!r}"
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ConfigError(FlexVAEError):
    """A config file or override is malformed, unknown or of the wrong type."""


class DataError(FlexVAEError):
    """An input folder or dataset cannot be used."""


class CheckpointError(FlexVAEError):
    """A checkpoint is missing, unreadable or does not match what is asked of it."""


class TrainingError(FlexVAEError):
    """Training cannot go on (non-finite loss, incompatible resume, interruption)."""


class Interrupted(TrainingError):
    """Ctrl-C: the work so far is saved; the message says where and how to go on."""

    exit_status = 130


class Terminated(Interrupted):
    """SIGTERM (a scheduler or ``kill``): saved like Ctrl-C, exit status 143."""

    exit_status = 143


def shown_path(path, limit: int = 200) -> str:
    """A path as an error line shows it: a name of thousands of characters is cut in the middle."""
    text = str(path)
    return text if len(text) <= limit else f"{text[:120]}...({len(text):,} characters)...{text[-40:]}"


def describe_os_error(exc: OSError) -> str:
    """'PATH: cause' for a failed file operation (disk full, permission, name too long, ...)."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(map(shown_path, paths))}: {cause}" if paths else cause
