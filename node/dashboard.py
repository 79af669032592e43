"""`plan-node dashboard`: the site's own page, on loopback only.

Its stages and ledger, its audits (figures, attempts, and the stored HTML reports), what it
published and what it pulled, and its metrics in every federated round. It reads the workspace
(node.site.status and the ledger) and writes nothing. It may show the site's own data (the audit
reports hold image grids) because it never leaves the site: it binds to loopback, always.
"""

from __future__ import annotations

import re
from pathlib import Path

from common.eventlog import read_events
from common.webpage import PageApp, PageServer, text_reply
from node.site.status import control_message, read_json, site_status
from node.site.workspace import Workspace, ledger_lines

PAGE = Path(__file__).resolve().parent / "dashboard_page"
SHARED = Path(__file__).resolve().parent.parent / "common" / "page"
REPORT_NAME = re.compile(r"audit-[0-9a-f]{12}\.html")
# a stored audit report: its own <style>, inline images, no script, no request elsewhere
REPORT_CSP = b"default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"


def stored_reports(ws: Workspace) -> dict[str, Path]:
    """name -> path of every stored audit report in reports/ (names of the audit's own form only)."""
    return {p.name: p for p in ws.reports.glob("audit-*.html") if REPORT_NAME.fullmatch(p.name)}


def site_state(ws: Workspace) -> dict:
    """{"status": node.site.status.site_status, "ledger": its lines newest first, "audits": every
    synthesis run's audit figures, "reports": stored report names, "rounds": rounds.jsonl}."""
    audits = []
    for run in sorted(p for p in ws.synth.glob("*") if p.is_dir()):
        a = read_json(run / "audit.json")
        if a:
            keep = ("passed", "n_candidates", "n_accepted", "n_paths", "mia_auc_upper", "reid_rate_upper")
            audits.append(
                {
                    "run_id": run.name,
                    **{k: a.get(k) for k in keep},
                    "attempt": a.get("attempt"),
                    "failed": [c["name"] for c in a.get("checks", []) if not c.get("passed")],
                    "control": control_message(a),
                }
            )
    return {
        "status": site_status(ws),
        "ledger": [
            {k: e.get(k) for k in ("stage", "started", "seconds", "time", "run_id", "passed", "number")}
            for e in ledger_lines(ws)[::-1]
        ],
        "audits": audits,
        "reports": sorted(stored_reports(ws)),
        # run ids are 64-bit: as JSON numbers a browser would round them
        "rounds": [{**r, "run_id": str(r.get("run_id"))} for r in read_events(ws.reports / "rounds.jsonl")[::-1]],
    }


def site_app(ws: Workspace) -> PageApp:
    def report(query: dict):
        # the name must be one of the stored reports, matched against the folder's own listing
        name = (query.get("name") or [""])[0]
        stored = stored_reports(ws)
        if name not in stored:
            return text_reply(404, f"no stored audit report named {name[:80]!r}")
        return (
            200,
            [(b"content-type", b"text/html; charset=utf-8"), (b"content-security-policy", REPORT_CSP)],
            stored[name].read_bytes(),
        )

    files = {
        "/": PAGE / "index.html",
        "/site.js": PAGE / "site.js",
        "/page.js": SHARED / "page.js",
        "/style.css": SHARED / "style.css",
    }
    return PageApp(files=files, state=lambda: site_state(ws), extra={"/report": report})


def serve_site_dashboard(ws: Workspace, *, port: int = 8051) -> PageServer:
    """Start the site's page on 127.0.0.1:`port` in a thread; its `url` is where to open it."""
    ws.config()  # a missing or invalid site.yaml is said before listening
    return PageServer(site_app(ws), host="127.0.0.1", port=port)
