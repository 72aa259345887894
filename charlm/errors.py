"""The project's errors, and how entry points report them.

Every anticipated failure is a `CharlmError` whose message is one line naming the problem and the
fix. Entry points print it as `<name>: error: ...` and exit non-zero: 2 for bad input (params,
options, an absent device: `UsageError`), 1 otherwise. Anything else (a bug, or a fault nobody
anticipated) is one line too, with a hint to re-run with CHARLM_DEBUG=1 for the traceback.
SIGTERM is turned into SystemExit so the atomic writers' cleanup runs, as it does for Ctrl-C
(KeyboardInterrupt).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

DEBUG_ENV = "CHARLM_DEBUG"


class CharlmError(Exception):
    exit_code = 1


class UsageError(CharlmError):
    """Bad input from the user: params.yaml, a command-line option, a device that is not there."""

    exit_code = 2


class DataError(CharlmError, ValueError):
    """A data file that is missing, malformed or inconsistent with another."""


class NonFiniteLoss(CharlmError):
    """Training diverged: a loss or weight that is NaN or infinite. Nothing trained after it is worth keeping."""


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so every `finally` and atomic writer cleans up."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def reported_errors(name: str) -> Iterator[None]:
    """Wrap an entry point's body: `CharlmError` becomes one line on stderr and its exit code."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except (KeyboardInterrupt, Terminated) as e:
        print(f"{name}: interrupted; no output was written", file=sys.stderr, flush=True)
        raise SystemExit(130 if isinstance(e, KeyboardInterrupt) else 143) from None
    except CharlmError as e:
        print(f"{name}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None
    except Exception as e:
        if os.environ.get(DEBUG_ENV):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(
            f"{name}: error: unexpected {type(e).__name__}: {first}; re-run with {DEBUG_ENV}=1 for the traceback",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
