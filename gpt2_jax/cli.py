"""What the command lines share before JAX starts: argparse types for their flags, and the one way a tool ends
on an error (`one_line_errors`): one line on stderr, an exit status, no traceback.

Exit statuses: 0 done; 1 an error the message says how to fix; 2 a bad flag (as argparse's own errors); 130
interrupted by Ctrl-C (SIGINT), as a shell reports it.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Callable

EXIT_ERROR, EXIT_BAD_FLAG, EXIT_INTERRUPTED = 1, 2, 130
# What a tool reports as one line: missing or unreadable files, an unreachable bucket, values that make no sense,
# a missing extra. Anything else is a bug, and keeps its traceback.
USER_ERRORS = (OSError, ValueError, RuntimeError, ImportError)


class CliError(Exception):
    """An error a tool reports as `error: <message>` with exit status `status` (1)."""

    status = EXIT_ERROR


class BadFlag(CliError):
    """A flag whose value cannot be used (exit status 2)."""

    status = EXIT_BAD_FLAG


def one_line_errors(errors: tuple[type[BaseException], ...] = USER_ERRORS,
                    interrupted: str = "stopped before it finished") -> Callable:
    """Decorator for a tool's `main(argv) -> int`: a CliError or one of `errors` becomes `error: <message>` on
    stderr and its exit status (CliError's, else 1); Ctrl-C becomes one line, `interrupted (SIGINT): ...`,
    and 130. SystemExit (argparse) passes through."""

    def wrap(main: Callable[..., int | None]) -> Callable[..., int | None]:
        @functools.wraps(main)
        def run(argv=None):
            previous_hook = sys.unraisablehook
            hook = sys.unraisablehook = _lost_interrupt_exits(f"interrupted (SIGINT): {interrupted}", previous_hook)
            try:
                return main(argv)
            except KeyboardInterrupt:
                print(f"interrupted (SIGINT): {interrupted}", file=sys.stderr)
                return EXIT_INTERRUPTED
            except CliError as e:
                print(f"error: {e}", file=sys.stderr)
                return e.status
            except errors as e:
                print(f"error: {e}", file=sys.stderr)
                return EXIT_ERROR
            finally:  # (a hook installed over this one since, e.g. checkpoint.py's filter, stays, and calls it)
                if sys.unraisablehook is hook:
                    sys.unraisablehook = previous_hook

        return run

    return wrap


def _lost_interrupt_exits(line: str, previous: Callable) -> Callable:
    """An unraisable-exception hook: a Ctrl-C whose KeyboardInterrupt landed where Python cannot raise it (a garbage
    collector's callback, a __del__: "Exception ignored in ...") would be lost and the tool would carry on. It prints
    the tool's one line and exits with 130 instead."""

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            sys.stdout.flush()
            print(line, file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        previous(unraisable)

    return hook


def finite_float(text: str) -> float:
    """argparse type of every float flag of the CLIs: a number, never NaN or +-inf (float() takes "nan",
    and NaN passes every range check: a NaN temperature would sample token 0 forever)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
