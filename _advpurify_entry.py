"""The console scripts' entry points, outside the ``advpurify`` package so that they run before
its heavy imports (torch alone takes a second or two).

Ctrl-C while those imports run ends the program at once with one line, never a traceback: no
command has started, so nothing is written yet, and unwinding an interrupted import can leave a
module lock held. Each command then handles Ctrl-C itself (``advpurify.cli._run``).
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_starting(signum: int, frame: object) -> None:
    sys.stderr.write("interrupted\n")
    os._exit(130)


def _on_interrupt_while_starting() -> None:
    # Only where Ctrl-C would raise: a job started with it ignored (``cmd &``) keeps ignoring it.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def main() -> None:
    _on_interrupt_while_starting()
    from advpurify.cli import main as run

    run()


def purify_batch_main() -> None:
    _on_interrupt_while_starting()
    from advpurify.cli import purify_batch_main as run

    run()
