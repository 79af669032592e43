"""Exit codes, and the one place a command-line tool turns a domain error into a one-line message.

A domain error (bad config, unreadable data, a failed gate, an unreachable coordinator, a bundle
that does not verify) is something the operator can act on: it prints as one line naming the
file, field or value, with no traceback, and exits with the code of its kind (README, "Exit
codes"). Anything else is a bug: it keeps its traceback and exits 1. `--debug` shows the
traceback of a domain error too.

Error classes declare their kind with a class attribute `exit_code` (one of the constants below);
this module imports none of them, so common stays below node and server.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, NoReturn

from common.logs import setup_logging

CRASH = 1  # a bug: the traceback is printed
CONFIG = 2  # site.yaml / federation.yaml, command-line values, keys, kits
DATA = 3  # the site's images and labels, model files, the model store
GATE = 4  # the release gate refused (failed audit, attempts exhausted): nothing was published
NETWORK = 5  # the coordinator, the exchange or the SuperLink could not be reached or refused the call
VERIFY = 6  # a bundle, signature, listing or trust document did not verify
RUN_FAILED = 7  # the federation run started but did not complete (the coordinator's results say why)

EXIT_CODES = {
    CRASH: "unexpected error (a bug: the traceback says where)",
    CONFIG: "configuration",
    DATA: "data",
    GATE: "release gate refused",
    NETWORK: "coordinator unreachable or refused",
    VERIFY: "verification failed",
    RUN_FAILED: "federation run failed",
}


def fail(message: object, code: int = CONFIG) -> NoReturn:
    """A command's own refusal: `error: MESSAGE` on stderr, plain text (messages hold paths and
    [brackets], never read as markup), then exit with `code`."""
    import typer
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"error: {message}", style="red", markup=False)
    raise typer.Exit(code)


def exit_code_of(exc: BaseException) -> int | None:
    """The exit code a domain error declares, or None for anything else."""
    code = getattr(type(exc), "exit_code", None)
    return code if isinstance(code, int) else None


def run_cli(main: Callable[..., object], *, prog: str, argv: list[str] | None = None) -> None:
    """Run a Typer app. Options of every command, anywhere on the line: `--debug` (or PLAN_DEBUG=1)
    shows tracebacks and debug logs, `--log-file PATH` (or PLAN_LOG_FILE) adds the log to a file
    (common/logs.py). A domain error prints `prog: error: MESSAGE` on stderr (plain text: a message
    is never read as markup) and exits with its code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("PLAN_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    log_file = os.environ.get("PLAN_LOG_FILE")
    if "--log-file" in args:
        i = args.index("--log-file")
        if i + 1 >= len(args):
            print(f"{prog}: error: --log-file needs a PATH", file=sys.stderr)
            sys.exit(CONFIG)
        log_file = args[i + 1]
        del args[i : i + 2]
    setup_logging(log_file=Path(log_file) if log_file else None, debug=debug)
    try:
        main(args=args, prog_name=prog, standalone_mode=True)
    except Exception as e:  # noqa: BLE001 (sorted into domain errors and bugs right here)
        code = exit_code_of(e)
        if code is None:
            raise
        if debug:
            traceback.print_exception(e)
        print(f"{prog}: error: {e}", file=sys.stderr)
        _to_log_files(prog, f"error (exit code {code}): {e}")
        if not debug:
            print(f"{prog}: exit code {code} ({EXIT_CODES[code]}); add --debug for the traceback", file=sys.stderr)
        sys.exit(code)


def _to_log_files(prog: str, message: str) -> None:
    """The error into --log-file too (stderr already has it, as the one line above)."""
    record = logging.LogRecord(prog, logging.ERROR, __file__, 0, message, None, None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)
