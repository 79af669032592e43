"""Errors an operator can act on: the installed `plan-node` prints one line per domain error, no
traceback, and exits with the code of its kind (common/errors.py, README "Exit codes")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common import errors

PLAN_NODE = Path(sys.executable).parent / "plan-node"
pytestmark = pytest.mark.skipif(
    not PLAN_NODE.exists(), reason="plan-node is not installed in this environment; run `make test`"
)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PLAN_NODE), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def npz_site(tmp_path) -> tuple[Path, Path]:
    data = tmp_path / "scans.npz"
    site = tmp_path / "site"
    r = _run("init", "--site-dir", str(site), "--name", "s", "--source", "npz", "--data-path", str(data))
    assert r.returncode == 0, r.stderr
    return site, data


def test_a_missing_data_file_is_one_line_and_exit_code_3(npz_site):
    site, data = npz_site
    r = _run("train", "--site-dir", str(site))
    assert r.returncode == errors.DATA, r.stderr
    assert f"{data}: .npz file not found" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2


def test_random_bytes_are_not_a_numpy_archive_and_no_pickle_is_suggested(npz_site):
    site, data = npz_site
    data.write_bytes(bytes(range(256)) * 4)
    r = _run("train", "--site-dir", str(site))
    assert r.returncode == errors.DATA
    assert "not a NumPy .npz archive" in r.stderr and "pickle" not in r.stderr.lower()


def test_publish_before_audit_says_what_to_run(npz_site):
    site, _ = npz_site
    r = _run("publish", "--site-dir", str(site))
    assert r.returncode == errors.DATA and "run the synthesis and audit stages first" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_yaml_error_keeps_its_brackets_and_exits_2(npz_site):
    site, _ = npz_site
    with open(site / "site.yaml", "a") as f:
        f.write("name: [oops\n")
    r = _run("status", "--site-dir", str(site))
    assert r.returncode == errors.CONFIG
    assert "name: [oops" in r.stderr and "not valid YAML" in r.stderr


def test_debug_shows_the_traceback(npz_site):
    site, _ = npz_site
    r = _run("train", "--site-dir", str(site), "--debug")
    assert r.returncode == errors.DATA and "Traceback" in r.stderr and "DataError" in r.stderr


def test_log_file_gets_timestamped_lines_and_the_error(npz_site, tmp_path):
    site, data = npz_site
    log = tmp_path / "logs" / "node.log"
    r = _run("train", "--site-dir", str(site), "--log-file", str(log))
    assert r.returncode == errors.DATA
    lines = log.read_text().splitlines()
    assert any(f"ERROR plan-node: error (exit code 3): {data}: .npz file not found" in line for line in lines), lines
    assert all(line[:4].isdigit() and line[4] == "-" for line in lines), lines  # 2026-12-02 18:00:00,123 ...


def test_long_loops_log_a_heartbeat_with_rate_and_eta_without_a_terminal(caplog):
    import logging

    from node.site.progress import heartbeat_line, progress

    assert (
        heartbeat_line("walk", 150, 600, 50.0, since=100, info="loss 0.3")
        == "walk: 150/600 (25%), 1/s, ETA 7m30s, loss 0.3"
    )
    with caplog.at_level(logging.INFO, logger="node.site.progress"):
        with progress("train GAN", total=3, heartbeat_s=0.0) as update:
            for _ in range(3):
                update(1, info="G 0.1")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("train GAN: 1/3 (33%)") and "ETA" in lines[0] and lines[0].endswith("G 0.1")
    assert lines[-1].startswith("train GAN: 3/3 (100%)") and lines[-1].endswith("done")
