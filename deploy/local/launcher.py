"""A whole federation on one machine: a coordinator and N sites on loopback, each its own process.

Every step goes through the real command lines (`plan-server`, `plan-node`), so what the demo and
the end-to-end test exercise is what an operator runs. Every process started here is stopped here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from common.config import deep_merge
from common.fileio import atomic_write_text
from common.procs import spawn, stop
from node.site.status import latest_audit
from node.site.workspace import Workspace


class LaunchError(RuntimeError):
    """A process of the local federation failed; the message carries the tail of its log."""


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cli(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LaunchError(
            f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr.strip() or proc.stdout.strip()}"
        )


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


def site_names(n: int) -> list[str]:
    return [f"site-{chr(ord('a') + i)}" for i in range(n)]


# The phantom sites' settings (README, "The two commands"). A larger holdout than the default
# split (the audit's figures are statistics over holdout patients), and a demo policy looser
# than the default on the two figures the phantom's genuine PLAN sets fail there at 60
# evaluation patients: the upper bounds of the two-sided AUC (~0.67, the walk's push away from
# phi_id's identities carries over to the attacker's view) and of the share closer to train in
# pixels (~0.76). The site's own audit.json and the demo's table say what was judged against what.
DEMO_POLICY = {"max_mia_auc": 0.7, "max_closer_to_train": 0.85}
DEMO_SITE = {"data": {"split": {"train": 0.4, "holdout": 0.4}}, "policy": DEMO_POLICY}


def setup(
    root: Path,
    *,
    n_sites: int,
    quorum: int | None = None,
    site_overrides: dict | None = None,
    federation_overrides: dict | None = None,
    public_host: str | None = None,
    bind: str = "127.0.0.1",
) -> tuple[Path, list[Path]]:
    """Create the coordinator and site workspaces under `root`; each site joins through its site kit.

    public_host: the name sites dial (on the server certificate; default 127.0.0.1); bind: where
    the coordinator's exchange and Fleet gateway listen. Set both for sites on other hosts."""
    root = Path(root).resolve()
    host = public_host or "127.0.0.1"
    coord = root / "coordinator"
    exchange_port, superlink_port, internal_port, *node_ports = free_ports(3 + n_sites)
    # Every site trains in the federation; `quorum` of them must have passed their gate.
    quorum = n_sites if quorum is None else quorum
    fed = {
        "name": "local",
        "quorum": quorum,
        "min_nodes": n_sites,
        "exchange_port": exchange_port,
        "superlink_port": superlink_port,
        "superlink_internal_port": internal_port,
        "policy": DEMO_POLICY,
    }
    fed = deep_merge(fed, federation_overrides or {})
    init = [_cli("plan-server"), "init", "--dir", str(coord), "--quorum", str(quorum), "--min-nodes", str(n_sites)]
    _run(init + (["--host", public_host] if public_host else []) + ["--bind", bind])
    fed_path = coord / "federation.yaml"
    atomic_write_text(fed_path, yaml.safe_dump(deep_merge(yaml.safe_load(fed_path.read_text()), fed), sort_keys=False))
    sites = []
    for i, name in enumerate(site_names(n_sites)):
        site = root / "sites" / name
        _run([
            _cli("plan-node"), "init", "--site-dir", str(site), "--name", name, "--phantom-seed", str(100 + i),
            "--exchange", f"{host}:{exchange_port}", "--superlink", f"{host}:{superlink_port}",
            "--supernode-port", str(node_ports[i]), "--ca-cert", str(coord / "ca" / "ca.crt"),
        ])  # fmt: skip
        cfg_path = site / "site.yaml"
        overrides = deep_merge(DEMO_SITE, site_overrides or {})
        atomic_write_text(
            cfg_path, yaml.safe_dump(deep_merge(yaml.safe_load(cfg_path.read_text()), overrides), sort_keys=False)
        )
        # A site kit per site, as an operator would: registers its signing and SuperNode keys and
        # carries its client certificate for the exchange's mutual TLS (README, "Federation keys").
        kit = coord / "kits" / f"{name}.kit.tar"
        _run([
            _cli("plan-server"), "kit", name, "--key", str(site / "keys" / "signing.pub"),
            "--node-key", str(site / "keys" / "flower_node.pub"), "--out", str(kit), "--dir", str(coord),
        ])  # fmt: skip
        _run([_cli("plan-node"), "init", "--site-dir", str(site), "--kit", str(kit)])
        sites.append(site)
    return coord, sites


def gate_results(sites: list[Path]) -> dict[str, bool | None]:
    """Each site's latest audit verdict; None while it has none yet."""
    audits = {site.name: latest_audit(Workspace(site)) for site in sites}
    return {name: None if audit is None else bool(audit["passed"]) for name, audit in audits.items()}


def _check_quorum_reachable(coord: Path, sites: list[Path]) -> None:
    """Fail fast, rather than wait forever, once too few sites passed their gate to reach the quorum."""
    verdicts = gate_results(sites)
    quorum = yaml.safe_load((coord / "federation.yaml").read_text())["quorum"]
    passed = [name for name, ok in verdicts.items() if ok]
    if None not in verdicts.values() and len(passed) < quorum:
        raise LaunchError(
            f"only {len(passed)} site(s) passed their audit gate ({', '.join(passed) or 'none'}); "
            f"the quorum is {quorum}, so the federation cannot start. See each site's synth/<run>/audit.json."
        )


def _run_round(coord: Path, *, before: int | None) -> int:
    """The round the coordinator's current run has reached: 0 before any, and 0 while the latest
    run is still the one whose runs/latest.json had mtime `before` (a run of an earlier start)."""
    path = coord / "runs" / "latest.json"
    try:
        if path.stat().st_mtime_ns == before:
            return 0
        latest = json.loads(path.read_text())
        return int(json.loads((coord / "runs" / latest["run_dir"] / "progress.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def run(
    coord: Path,
    sites: list[Path],
    *,
    timeout: float = 1800,
    say: Callable[[str], None] = print,
    drop: tuple[str, int] | None = None,
    prefix: dict[str, list[str]] | None = None,
) -> dict:
    """Start the coordinator and every site, wait for the federation run, stop everything.

    drop=(site, n): a fault drill: stop that site (its SuperNode and ClientApp) once the
    federated run has reached round n. prefix: a command line to start a process under, by
    process name ("coordinator" or a site's), e.g. ["ip", "netns", "exec", NS] to run it on
    another host's network. Returns the coordinator's results.json of the run.
    """
    prefix = prefix or {}
    logs = coord.parent / "logs"
    env = dict(os.environ)
    # Sites share this machine's cores: one thread each keeps them from fighting over them.
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, len(sites))))
    procs: dict[str, subprocess.Popen] = {}
    latest = coord / "runs" / "latest.json"
    before = latest.stat().st_mtime_ns if latest.exists() else None
    try:
        procs["coordinator"] = spawn(
            [*prefix.get("coordinator", []), _cli("plan-server"), "start", "--dir", str(coord), "--exit-after-run"],
            log=logs / "coordinator.log",
            env=env,
        )
        for site in sites:
            procs[site.name] = spawn(
                [*prefix.get(site.name, []), _cli("plan-node"), "start", "--site-dir", str(site)],
                log=logs / f"{site.name}.log",
                env=env,
            )
        say(f"started coordinator and {len(sites)} sites; logs in {logs}")
        deadline = time.time() + timeout
        dropped: set[str] = set()
        while procs["coordinator"].poll() is None:
            if drop and drop[0] not in dropped and _run_round(coord, before=before) >= drop[1]:
                stop(procs[drop[0]])
                dropped.add(drop[0])
                say(f"fault drill: stopped {drop[0]} in round {_run_round(coord, before=before)}")
            for name, p in procs.items():
                if name != "coordinator" and name not in dropped and p.poll() is not None:
                    raise LaunchError(
                        f"{name} exited with code {p.returncode} before the run finished:\n"
                        f"{_tail(logs / f'{name}.log')}"
                    )
            _check_quorum_reachable(coord, sites)
            if time.time() > deadline:
                raise LaunchError(
                    f"the federation did not finish within {timeout:.0f} s:\n{_tail(logs / 'coordinator.log')}"
                )
            time.sleep(2)
        if not latest.exists() or latest.stat().st_mtime_ns == before:  # a run of an earlier start is no answer
            raise LaunchError(
                f"the coordinator exited with code {procs['coordinator'].returncode} and no new run:\n"
                f"{_tail(logs / 'coordinator.log')}"
            )
        run_dir = coord / "runs" / json.loads(latest.read_text())["run_dir"]
        return json.loads((run_dir / "results.json").read_text())
    finally:
        # SuperNodes first, then the SuperLink (inside the coordinator).
        for name, p in procs.items():
            if name != "coordinator":
                stop(p)
        if "coordinator" in procs:
            stop(procs["coordinator"])
