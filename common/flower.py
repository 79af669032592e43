"""Running Flower's own programs (flower-superlink, flower-supernode, flwr) as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from common import errors


class FlowerError(RuntimeError):
    """A Flower command failed; the message carries what it printed."""

    exit_code = errors.NETWORK


def flower_bin(name: str) -> str:
    """Flower's console scripts live beside this interpreter (the project's virtual environment)."""
    return str(Path(sys.executable).parent / name)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: no telemetry, no update check, our own FLWR_HOME.

    The venv's bin goes first on PATH because SuperLink and SuperNode spawn `flower-superexec`
    by name.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def write_connection(flwr_home: Path, name: str, address: str, ca_cert: Path) -> None:
    """Write the `flwr` CLI's connection table: one TLS SuperLink, made the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{Path(ca_cert).resolve()}"\n'
    )


def flwr_json(args: list[str], *, flwr_home: Path, cwd: Path | None = None, timeout: float = 60) -> dict:
    """Run `flwr ARGS --format json` and return its JSON, or raise FlowerError."""
    proc = subprocess.run(
        [flower_bin("flwr"), *args, "--format", "json"],
        env=flower_env(flwr_home),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout.strip()
    start = out.find("{")
    try:
        data = json.loads(out[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        data = {}
    if proc.returncode != 0 or not data.get("success", False):
        raise FlowerError(f"flwr {' '.join(args)} failed (exit {proc.returncode}): {out or proc.stderr.strip()}")
    return data
