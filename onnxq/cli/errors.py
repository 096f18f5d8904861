"""What every `onnxq` command does with an error: one line on stderr and a non-zero exit."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

import click

from onnxq.errors import OnnxqError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every `finally` (temporary files) runs."""


def raise_terminated(signum, frame):
    raise Terminated


def reports_errors(command):
    """Bad input ends with one line on stderr and exit status 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
        try:
            return command(*args, **kwargs)
        except OnnxqError as err:
            click.echo(f"onnxq: error: {err}", err=True)
            sys.exit(1)
        except Terminated:
            click.echo("onnxq: terminated", err=True)
            sys.exit(128 + signal.SIGTERM)
        except KeyboardInterrupt:
            click.echo("onnxq: interrupted", err=True)
            sys.exit(130)
        except Exception as err:
            if os.environ.get("ONNXQ_DEBUG"):
                raise
            where = traceback.extract_tb(err.__traceback__)[-1]
            message = (str(err).strip() or "no message").splitlines()[0]
            click.echo(
                f"onnxq: internal error: {type(err).__name__}: {message} "
                f"({Path(where.filename).name}:{where.lineno}; ONNXQ_DEBUG=1 shows the traceback)",
                err=True,
            )
            sys.exit(2)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)

    return wrapper
