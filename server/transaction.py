"""One write transaction on an SQLite connection opened with isolation_level=None (the coordinator's
trust store and bundle index): the write lock from its first statement, so that a check and the
write it guards are one step across threads and processes."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE; COMMIT when the block ends (a return included), ROLLBACK when it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
