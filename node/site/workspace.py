"""The site workspace (docs/DESIGN.md 3.1): where every stage reads and writes, and its ledger.

A stage whose inputs' digests match its last ledger line is skipped; every output is written to
a temporary name and renamed into place (common.fileio), so a crash leaves no half-written file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.config import SiteConfig, load_site_config
from common.eventlog import append_json_line
from common.fileio import sha256_file


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "site.yaml"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def synth(self) -> Path:
        return self.root / "synth"

    @property
    def bundles(self) -> Path:
        return self.root / "bundles"

    @property
    def pool(self) -> Path:
        return self.root / "pool"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.jsonl"

    @property
    def signing_key(self) -> Path:
        return self.keys / "signing.key"

    @property
    def signing_pub(self) -> Path:
        return self.keys / "signing.pub"

    @property
    def node_key(self) -> Path:
        """The Flower SuperNode's authentication key (OpenSSH EC P-384)."""
        return self.keys / "flower_node.key"

    @property
    def node_pub(self) -> Path:
        return self.keys / "flower_node.pub"

    def latest_run(self) -> str:
        """The synthesis run the later stages work on: synth/latest.json's run_id, as synthesize
        wrote it (12 hex digits, a folder in synth/)."""
        return json.loads((self.synth / "latest.json").read_text())["run_id"]

    def config(self) -> SiteConfig:
        return load_site_config(self.config_path)

    def resolve(self, p: Path) -> Path:
        """A path from site.yaml: absolute as given, otherwise relative to the workspace."""
        return p if p.is_absolute() else self.root / p


def _digests(paths: list[Path]) -> dict[str, str]:
    out = {}
    for p in paths:
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file():
                    out[str(f)] = sha256_file(f)
        elif p.exists():
            out[str(p)] = sha256_file(p)
        else:
            out[str(p)] = "missing"
    return out


def ledger_lines(ws: Workspace) -> list[dict]:
    """Every line of the ledger that parses as an object, oldest first; a line cut short by a crash
    says nothing and is skipped."""
    if not ws.ledger.exists():
        return []
    out = []
    for line in ws.ledger.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def last_ledger_entry(ws: Workspace, stage: str) -> dict | None:
    """The newest ledger line of `stage`, or None (a torn line is skipped: the stage reruns)."""
    return next((e for e in reversed(ledger_lines(ws)) if e.get("stage") == stage), None)


def run_stage(
    ws: Workspace,
    stage: str,
    fn: Callable[[], None],
    *,
    inputs: list[Path],
    outputs: list[Path],
    force: bool = False,
) -> bool:
    """Run `fn` unless its last ledger line has the same input digests and its outputs still match.

    Returns True if the stage ran, False if it was skipped as up to date.
    """
    before = _digests(inputs)
    last = last_ledger_entry(ws, stage)
    if not force and last and last["inputs"] == before and last["outputs"] == _digests(outputs):
        return False
    t0 = time.time()
    fn()
    entry = {
        "stage": stage,
        "inputs": before,
        "outputs": _digests(outputs),
        "started": t0,
        "seconds": round(time.time() - t0, 3),
    }
    ws.ledger.parent.mkdir(parents=True, exist_ok=True)
    append_json_line(ws.ledger, entry)
    return True
