"""The workspace ledger and atomic writes."""

from __future__ import annotations

import os

import pytest

from common.fileio import atomic_write_bytes
from node.site.workspace import Workspace, run_stage


def test_stage_skips_when_inputs_and_outputs_unchanged(tmp_path):
    ws = Workspace(tmp_path)
    src, dst = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("a")
    calls = []

    def stage():
        calls.append(1)
        atomic_write_bytes(dst, src.read_bytes() * 2)

    assert run_stage(ws, "double", stage, inputs=[src], outputs=[dst])
    assert not run_stage(ws, "double", stage, inputs=[src], outputs=[dst])
    src.write_text("b")  # a changed input reruns it
    assert run_stage(ws, "double", stage, inputs=[src], outputs=[dst])
    dst.write_text("tampered")  # so does an output that no longer matches the ledger
    assert run_stage(ws, "double", stage, inputs=[src], outputs=[dst])
    assert len(calls) == 3 and dst.read_text() == "bb"


def test_a_torn_ledger_line_is_skipped_by_every_reader(tmp_path):
    """A crash mid-append leaves half a line; the stage runner and the status page read past it."""
    from node.site.status import site_status

    ws = Workspace(tmp_path)
    (tmp_path / "site.yaml").write_text("name: torn\n")
    src, dst = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("a")

    def stage():
        atomic_write_bytes(dst, src.read_bytes())

    assert run_stage(ws, "copy", stage, inputs=[src], outputs=[dst])
    with open(ws.ledger, "a") as f:
        f.write('{"stage": "copy", "inputs": {')  # torn: no closing brace, no newline
    assert site_status(ws)["stages"]["copy"]["seconds"] >= 0
    assert not run_stage(ws, "copy", stage, inputs=[src], outputs=[dst])  # the whole line before it still counts
    src.write_text("b")
    assert run_stage(ws, "copy", stage, inputs=[src], outputs=[dst])  # its line is not glued onto the torn one
    assert not run_stage(ws, "copy", stage, inputs=[src], outputs=[dst])


def test_failed_stage_records_nothing(tmp_path):
    ws = Workspace(tmp_path)

    def boom():
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        run_stage(ws, "boom", boom, inputs=[], outputs=[])
    assert not ws.ledger.exists()


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_private_mode(tmp_path):
    atomic_write_bytes(tmp_path / "k", b"secret", mode=0o600)
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
