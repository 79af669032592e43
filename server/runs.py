"""Federation runs: waiting for the quorum, submitting a signed Flower run and waiting for it, and
reading its outcome (failures, degraded rounds, the per-site figures, the federated CVAE's part)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from common.config import FederationConfig
from common.eventlog import append_event
from common.fileio import atomic_write_json
from server import federation
from server.directory import CoordinatorDir
from server.report import write_curves
from server.store import BundleStore

# the figures results.json keeps per site for the final round
METRICS = ("accuracy", "balanced-accuracy", "auroc")


def wait_for_quorum(
    cd: CoordinatorDir, store: BundleStore, quorum: int, nodes_needed: int, superlink, say, *, since: float
) -> None:
    last = None
    while True:
        if superlink.poll() is not None:
            raise federation.FlowerError(f"flower-superlink exited with code {superlink.returncode}")
        pooled = sorted(store.sites_with_bundles())
        online = federation.online_nodes(cd.flwr_home, since=since)
        state = (tuple(pooled), online)
        if state != last:
            say(
                f"pool: {len(pooled)}/{quorum} sites ({', '.join(pooled) or 'none'}); "
                f"SuperNodes online: {online}/{nodes_needed}"
            )
            last = state
        if len(pooled) >= quorum and online >= nodes_needed:
            return
        time.sleep(2)


def _failures(cd: CoordinatorDir, per_site: dict) -> dict:
    """Which site failed or missed which round and phase, and why. Flower calls a run with
    failing ClientApps `completed`, and rounds simply go on without a site that dropped out;
    here such a run is `degraded`, and `missed` lists, for every site with a registered
    SuperNode, the rounds and phases it sent no result for."""
    names_path = cd.node_keys / "nodes.json"
    names = json.loads(names_path.read_text()) if names_path.exists() else {}
    expected = set(names.values())
    errors, missed = [], {}
    for rnd, phases in sorted(per_site.items(), key=lambda kv: int(kv[0])):
        for phase in ("train", "evaluate"):
            sites = phases.get(phase, {})
            replied = set()
            for who, m in sites.items():
                site = names.get(who.removeprefix("node-"), who)
                if "error" in m:
                    errors.append({"round": int(rnd), "phase": phase, "site": site, "error": m["error"]})
                else:
                    replied.add(site)
            for site in sorted((expected | {e["site"] for e in errors}) - replied):
                missed.setdefault(site, []).append({"round": int(rnd), "phase": phase})
    return {"degraded": bool(errors or missed), "errors": errors, "missed": missed}


def _submit_and_wait(
    cd: CoordinatorDir,
    fed: FederationConfig,
    out: Path,
    say,
    *,
    label: str,
    train_on: str | None = None,
    task: str | None = None,
    pool: list[str] | None = None,
) -> dict:
    """One Flower run of the ServerApp writing to `out`; its results.json with run id, status and failures.
    task "cvae": the federated CVAE's run (fed.cvae_rounds rounds) instead of the downstream classifier's.
    `pool`: the bundle ids every site trains on."""
    out.mkdir(parents=True, exist_ok=True)
    run_config = {"federation-config": str(cd.config_path.resolve()), "out-dir": str(out.resolve())}
    if train_on is not None:
        run_config["train-on"] = train_on
    if task is not None:
        run_config["task"] = task
    if pool:
        run_config["pool"] = ",".join(pool)
    n_rounds = fed.cvae_rounds if task == "cvae" else fed.downstream.rounds
    run_id = federation.submit_run(
        cd.flwr_home, run_config=run_config, key=cd.coordinator_key, signatures=cd.fab_signatures
    )
    say(f"submitted Flower run {run_id}: {label} ({n_rounds} rounds)")
    append_event(cd.events, "run_started", run_id=run_id, label=label, run_dir=str(out.relative_to(cd.runs)))
    atomic_write_json(
        cd.runs / "latest.json",
        {"run_dir": str(out.relative_to(cd.runs)), "run_id": run_id, "status": "running", "label": label},
    )
    status = federation.wait_run(cd.flwr_home, run_id, timeout=fed.run_timeout_s)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"completed": False}
    results.update({"run_id": run_id, "status": status})
    results.update(_failures(cd, results.get("per_site", {})))
    failure = run_failure(results, n_rounds)
    if failure:
        results["failure"] = failure
    append_event(
        cd.events,
        "run_ended",
        run_id=run_id,
        label=label,
        status=status,
        rounds_completed=results.get("rounds_completed", 0),
        rounds=n_rounds,
        degraded=results["degraded"],
        failure=results.get("failure"),
    )
    say(
        f"run {run_id} ({label}): {status}{' (DEGRADED)' if results['degraded'] else ''}; "
        f"rounds completed {results.get('rounds_completed', 0)}/{n_rounds}"
        + (f"; FAILED: {results['failure']}" if "failure" in results else "")
    )
    for e in results["errors"]:
        say(f"  round {e['round']} {e['phase']}: {e['site']} failed: {e['error']}")
    for site, rounds in results["missed"].items():
        say(f"  {site} missed round(s) {sorted({r['round'] for r in rounds})}")
    return results


def run_failure(results: dict, n_rounds: int) -> str | None:
    """Why a run failed, or None when it completed every round. Flower reports a run whose every
    ClientApp failed as finished:completed, so the rounds completed decide, and the first site
    error says why."""
    if results.get("completed"):
        return None
    first = results["errors"][0] if results.get("errors") else None
    why = (
        f"first error, round {first['round']} {first['phase']} at {first['site']}: {first['error']}"
        if first
        else f"Flower status {results.get('status')}"
    )
    return f"{results.get('rounds_completed', 0)} of {n_rounds} rounds completed; {why}"


def _final_per_site(results: dict, keys: tuple[str, ...], *, prefix: str = "") -> dict:
    """{site: {key: value}} from the last round's per-site evaluation replies of a run."""
    per_site = results.get("per_site", {})
    if not per_site:
        return {}
    last = per_site[max(per_site, key=int)].get("evaluate", {})
    return {site: {k: m[prefix + k] for k in keys if prefix + k in m} for site, m in last.items() if "error" not in m}


def run_cvae(cd: CoordinatorDir, fed: FederationConfig, out: Path, say) -> dict:
    """The federated CVAE's Flower run (task "cvae"); its results (rounds, per-site train and
    validation losses, the final decoder's sha256) stay in `out`/results.json."""
    results = _submit_and_wait(cd, fed, out, say, label="federated CVAE (FedAvg of the decoders)", task="cvae")
    atomic_write_json(out / "results.json", results)
    return results


def cvae_outcome(results: dict, out: Path) -> list[str]:
    """What each site did with the federation's final decoder, as lines to report. Raises
    FlowerError when the CVAE run did not complete: no site can then synthesize (they sample only
    from the final round's decoder), so waiting for the pool's quorum would wait forever."""
    if not results.get("completed"):
        raise federation.FlowerError(
            f"the federated CVAE run {results.get('run_id')} did not complete ({results.get('status')}, rounds "
            f"{results.get('rounds_completed', 0)}/{results.get('rounds')}): "
            "no site has the federation's final decoder to sample from, so no bundle can follow; "
            f"see {out / 'results.json'} and the sites' logs"
        )
    said = {
        1.0: "published its bundle",
        0.0: "published nothing: its audit did not pass",
        -1.0: "failed to synthesize, audit or publish (see its reports/cvae_federated.json)",
    }

    def line(site: str, m: dict) -> str:
        return f"  {site}: {said[m['released']] if 'released' in m else m.get('error', 'sent no release result')}"

    release = results.get("release") or {}
    if not release:
        return [f"  no site sent a release result (see {out / 'results.json'} and the sites' logs)"]
    return [line(site, m) for site, m in sorted(release.items())]


def _cvae_summary(results: dict, out: Path, runs: Path) -> dict:
    """The coordinator results' `cvae_federated` entry: the CVAE run in brief, its folder named."""
    keep = (
        "run_id",
        "status",
        "completed",
        "rounds",
        "rounds_completed",
        "local_epochs",
        "global_decoder_sha256",
        "degraded",
        "errors",
        "missed",
        "release",
    )
    return {
        **{k: results[k] for k in keep if k in results},
        "results": str((out / "results.json").relative_to(runs)),
        "per_site": results.get("per_site", {}),
    }


def run_once(
    cd: CoordinatorDir,
    fed: FederationConfig,
    store: BundleStore,
    say,
    *,
    out: Path | None = None,
    cvae: dict | None = None,
) -> dict:
    """The downstream run (and its baselines) into `out` (default runs/<stamp>); `cvae`: the results
    of the federated CVAE run before it (in out/cvae), summarised into these results."""
    out = out or cd.runs / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    # the run names its pool: bundles pooled while it runs wait for the next run, and a site that
    # has not verified one of these refuses to train rather than train on a part of the pool
    bundles = sorted(r.bundle_id for r in store.list())
    results = _submit_and_wait(cd, fed, out, say, label=f"downstream on {fed.downstream.train_on}", pool=bundles)
    results["pool"] = sorted(store.sites_with_bundles())
    results["pool_bundles"] = bundles
    if cvae is not None:
        results["cvae_federated"] = _cvae_summary(cvae, out / "cvae", cd.runs)
    real = None
    if fed.downstream.baselines:
        real = _submit_and_wait(
            cd, fed, out / "baseline-fedavg-real", say, label="baseline: FedAvg on real data", train_on="real"
        )
        results["baselines"] = {
            "fedavg_real": {
                "run_id": real["run_id"],
                "status": real["status"],
                "completed": bool(real.get("completed")),
                "degraded": real["degraded"],
                "errors": real["errors"],
                "missed": real["missed"],
                "final": real.get("evaluate", {}).get(str(real.get("rounds_completed", 0)), {}),
                "per_site": _final_per_site(real, METRICS),
            },
            "local_only": {"per_site": _final_per_site(results, METRICS, prefix="local-only-")},
        }
    results["per_site_final"] = _final_per_site(results, METRICS)
    atomic_write_json(out / "results.json", results)
    write_curves(out / "curves.png", results, real)
    atomic_write_json(cd.runs / "latest.json", {
        "run_dir": out.name, "run_id": results["run_id"], "label": "finished",
        "status": "failed" if "failure" in results else results["status"], "failure": results.get("failure"),
    })  # fmt: skip
    return results
