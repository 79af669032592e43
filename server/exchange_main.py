"""Serve only the coordinator's exchange, until SIGTERM/SIGINT: `python -m server.exchange_main --dir coord`.

The same server `plan-server start` runs beside the SuperLink; on its own it suits an operator
who runs the federation elsewhere, and the crash tests, which kill -9 it mid-upload.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from server.coordinator import CoordinatorDir, start_exchange


def serve_forever(dir: Path, say=print) -> None:
    cd = CoordinatorDir(Path(dir))
    server = start_exchange(cd)
    fed = cd.config()
    say(f"exchange listening on {fed.exchange_host}:{fed.exchange_port} (mutual TLS)")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop(grace=2).wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("coord"), help="The coordinator directory.")
    args = parser.parse_args(argv)
    serve_forever(args.dir, say=lambda m: print(m, flush=True))
    sys.exit(0)


if __name__ == "__main__":
    main()
