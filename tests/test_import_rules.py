"""The import rules of docs/DESIGN.md section 5, checked on the source: a rule broken here is a
layer a newcomer can no longer read on its own."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported(folder: str) -> dict[str, set[str]]:
    """{module path: the dotted names it imports} for every .py file under ROOT/folder."""
    out = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.update(f"{node.module}.{a.name}" for a in node.names)
        out[str(path.relative_to(ROOT))] = names
    return out


def offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path} imports {name}"
        for path, names in imported(folder).items()
        for name in sorted(names)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def test_common_imports_neither_side():
    assert offenders("common", ("node", "server", "deploy")) == []


def test_node_and_server_never_import_each_other():
    assert offenders("node", ("server",)) == []
    assert offenders("server", ("node",)) == []


def test_site_is_the_bottom_layer_of_node():
    # node.site (workspace, data, checkpoints, progress) is what every other package builds on;
    # it must not reach up into a route, the audit, the release or the federation.
    above = ("node.plan", "node.cvae", "node.audit", "node.release", "node.federation")
    top = ("node.cli", "node.start", "node.stages", "node.doctor", "node.dashboard")
    assert offenders("node/site", above + top) == []
