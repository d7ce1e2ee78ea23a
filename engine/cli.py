"""The scripts' entry point: a user error prints one message and exits 1, a bug keeps its traceback.

    if __name__ == "__main__":
        from engine.cli import run_cli

        run_cli(main)   # main(argv: list[str] | None) -> int

User errors are the exceptions the project raises with a message meant for the user: ValueError
(bad hyperparameters, data or model YAML, arguments; HypError, ModelConfigError, ...), OSError
(missing files, unreadable sources, downloads: FileNotFoundError, ConnectionError, DownloadError),
ExportError and CheckpointError. Anything else (a RuntimeError from deep inside torch, a KeyError,
an AssertionError) is a bug and shows its traceback. `--verbose` anywhere on the command line (it
is taken out before the script parses its arguments) or VITDET_TRACEBACK=1 shows the traceback of a
user error too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

TRACEBACK_ENV = "VITDET_TRACEBACK"
VERBOSE_FLAG = "--verbose"


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes shown as messages (imported here: engine.exporter is slow to import)."""
    from engine.checkpoint import CheckpointError
    from engine.exporter import ExportError

    return ValueError, OSError, ExportError, CheckpointError


def traceback_requested() -> bool:
    """VITDET_TRACEBACK set to anything but '' or '0' (run_cli sets it for --verbose); scripts that
    catch user errors themselves re-raise them when this is true."""
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def user_message(err: BaseException) -> str:
    """The message alone (KeyError-like classes would otherwise print it quoted)."""
    text = str(err.args[0]) if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    return text or type(err).__name__


def run_cli(main: Callable[[list[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run a script's main(argv) and exit with its code; a user error exits 1 with one line on stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if VERBOSE_FLAG in argv:
        os.environ[TRACEBACK_ENV] = "1"  # also for DDP ranks and the scripts' own error handling
        argv = [a for a in argv if a != VERBOSE_FLAG]
    try:
        code = main(argv)
    except Exception as err:
        if traceback_requested() or not isinstance(err, user_errors()):
            raise
        prog = Path(sys.argv[0]).name or "vitdet"
        print(f"{prog}: error: {user_message(err)} (--verbose or {TRACEBACK_ENV}=1 shows the traceback)",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)
