"""The dashboards' state before any run: a fresh coordinator and a fresh site answer with what
they have, over real HTTP; a stored report is served by name from its folder's listing only.
(The pages themselves, in a browser, after a real run: tests/test_e2e.py.)"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from common.config import FederationConfig
from common.eventlog import append_event, read_events
from node.dashboard import serve_site_dashboard
from server.coordinator import init_coordinator
from server.dashboard import serve_dashboard


def _json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_a_fresh_coordinator_shows_its_federation_sites_and_events(tmp_path, key_a):
    cd = init_coordinator(tmp_path / "coord", FederationConfig(name="fresh", quorum=1))
    cd.trust().add("a", key_a[1])
    append_event(cd.events, "upload_refused", site="a", reason="policy", message="mia_auc_upper 0.9 > max 0.65")
    page = serve_dashboard(cd, port=0)
    try:
        state = _json(page.url + "api/state")
    finally:
        page.stop()
    assert state["federation"]["name"] == "fresh" and state["federation"]["trust_document"]["version"] >= 1
    assert [(s["site"], s["key_status"], s["bundles"]) for s in state["sites"]] == [("a", "current", 0)]
    assert state["pool"] == [] and state["runs"] == {"current": None, "history": []}
    assert state["events"][0]["kind"] == "upload_refused" and state["events"][0]["reason"] == "policy"


def test_event_lines_cut_short_are_skipped(tmp_path):
    path = tmp_path / "events.jsonl"
    append_event(path, "run_started", run_id="1")
    with open(path, "a") as f:
        f.write('{"kind": "run_ended", "run_id"')  # a crash mid-write
    append_event(path, "run_started", run_id="2")
    assert [e["run_id"] for e in read_events(path)] == ["2", "1"]  # newest first


def test_a_fresh_site_page_answers_and_serves_only_its_stored_reports(tiny_workspace):
    ws = tiny_workspace
    ws.reports.mkdir(parents=True)
    (ws.reports / "audit-0123456789ab.html").write_text("<p>report</p>")
    (ws.reports / "notes.html").write_text("not a report")
    page = serve_site_dashboard(ws, port=0)
    try:
        state = _json(page.url + "api/state")
        assert state["reports"] == ["audit-0123456789ab.html"] and state["audits"] == [] and state["rounds"] == []
        # a failed audit shows its control's verdict (node.audit.run.control)
        control = {"n": 24, "passed": False, "failed": ["reid_rate_upper"]}
        failed = {"passed": False, "checks": [{"name": "reid_rate_upper", "passed": False}], "control": control}
        (ws.synth / "0123456789ab").mkdir(parents=True)
        (ws.synth / "0123456789ab" / "audit.json").write_text(json.dumps(failed))
        (audit,) = _json(page.url + "api/state")["audits"]
        assert audit["failed"] == ["reid_rate_upper"]
        assert audit["control"].startswith("control: 24 real unseen records fail the same gate too (reid_rate_upper)")
        with urllib.request.urlopen(page.url + "report?name=audit-0123456789ab.html", timeout=10) as r:
            assert r.read() == b"<p>report</p>" and "script-src" not in r.headers["content-security-policy"]
        for name in ("notes.html", "../site.yaml", "audit-0123456789ab.html/../../site.yaml"):
            try:
                urllib.request.urlopen(page.url + f"report?name={name}", timeout=10)
            except urllib.error.HTTPError as e:
                assert e.code == 404, name
            else:
                raise AssertionError(f"{name} was served")
    finally:
        page.stop()
