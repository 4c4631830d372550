"""The grid's store: one SQLite file (WAL mode) indexing the cells' run folders.

One row per cell (hash, kind, resolved config, status, metrics, wall seconds, optimizer steps,
timestamps, host); a spec's membership (which cells, in which order, with which axis values) is a
separate table, so one cell (an attack model) can serve several specs. Every write is a transaction;
workers claim a cell with ``BEGIN IMMEDIATE``, so two workers never run the same cell, and a cell left
``running`` by a worker that died is taken over.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from .. import __version__
from ..errors import UserError
from ..registry import json_ready

SCHEMA_VERSION = 1
STORE_FILE = "grid.sqlite"
STATUSES = ("pending", "running", "done", "failed")
# A running cell whose worker has not beaten for this long is taken over (workers beat every 15 s).
STALE_SECONDS = 90.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    hash TEXT PRIMARY KEY, kind TEXT NOT NULL, config TEXT NOT NULL, deps TEXT NOT NULL,
    run_dir TEXT NOT NULL, status TEXT NOT NULL, error TEXT, metrics TEXT, wall_seconds REAL,
    steps INTEGER, started TEXT, finished TEXT, host TEXT, worker TEXT, heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0, code_version TEXT);
CREATE TABLE IF NOT EXISTS members (
    spec TEXT NOT NULL, hash TEXT NOT NULL, position INTEGER NOT NULL, axes TEXT NOT NULL,
    PRIMARY KEY (spec, hash));
CREATE TABLE IF NOT EXISTS invocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, spec TEXT NOT NULL, command TEXT NOT NULL,
    spec_text TEXT NOT NULL, started TEXT NOT NULL);
"""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(worker: str | None) -> bool:
    """Whether a worker of this host still runs (workers of other hosts: judged by heartbeat)."""
    if not worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


class Store:
    """``Store(folder)`` opens (or creates) ``folder/grid.sqlite``."""

    def __init__(self, folder: str | Path, *, create: bool = True):
        self.folder = Path(folder)
        self.path = self.folder / STORE_FILE
        if not self.path.exists() and not create:
            raise UserError(f"{self.folder} holds no grid store ({STORE_FILE}); run `backdoor-eraser bench` first")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA busy_timeout=60000")
            with self.transaction():
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    self.db.execute(stmt)
                self._check_version()
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path} is not a usable grid store: {exc}") from None
        except OSError as exc:
            raise UserError(f"cannot create the grid store in {self.folder}: {exc}") from None

    def _check_version(self):
        info = dict(self.db.execute("SELECT key, value FROM info").fetchall())
        if not info:
            self.db.executemany("INSERT INTO info VALUES (?, ?)", [
                ("schema_version", str(SCHEMA_VERSION)), ("created_by", __version__), ("created_at", now())])
            return
        if info.get("schema_version") != str(SCHEMA_VERSION):
            raise UserError(f"{self.path} was written by backdoor-eraser {info.get('created_by', '?')} with store "
                            f"schema {info.get('schema_version')}; this version reads schema {SCHEMA_VERSION}. "
                            "Use that version, or a new --out folder")

    def close(self):
        self.db.close()

    @contextmanager
    def transaction(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---- writing ---------------------------------------------------------------------------------

    def add(self, spec: str, cells, run_dir_for, *, command: str = "", spec_text: str = "") -> set[str]:
        """Register ``cells`` as spec ``spec``'s members (replacing its old member list); new cells are
        pending. Returns the hashes of the cells that were new to the store."""
        new = set()
        with self.transaction() as db:
            db.execute("DELETE FROM members WHERE spec = ?", (spec,))
            self._adopt_moved(db, cells)
            for pos, cell in enumerate(cells):
                h = cell.hash
                cur = db.execute("INSERT OR IGNORE INTO cells (hash, kind, config, deps, run_dir, status) "
                                 "VALUES (?, ?, ?, ?, ?, 'pending')",
                                 (h, cell.kind, json.dumps(cell.config, sort_keys=True), json.dumps(cell.deps),
                                  str(run_dir_for(cell))))
                if cur.rowcount:
                    new.add(h)
                else:
                    self._refresh_unrun(db, h, cell, run_dir_for(cell))
                db.execute("INSERT OR REPLACE INTO members VALUES (?, ?, ?, ?)",
                           (spec, h, pos, json.dumps(cell.axes)))
            db.execute("INSERT INTO invocations (spec, command, spec_text, started) VALUES (?, ?, ?, ?)",
                       (spec, command, spec_text, now()))
        return new

    @staticmethod
    def _refresh_unrun(db, h: str, cell, run_dir):
        """A cell not yet run takes the current expansion's config: one hash covers a model wherever its
        folder lies, and the stored path may be gone (a store copied from another checkout or grid
        folder, a zoo model moved). Its run folder moves to the current grid folder too, unless it
        already holds a partial run to resume. Done and running cells keep what they ran with."""
        row = db.execute("SELECT run_dir FROM cells WHERE hash = ? AND status IN ('pending', 'failed')", (h,)).fetchone()
        if row is None:
            return
        keep = row[0] and Path(row[0]).exists()
        db.execute("UPDATE cells SET config = ?, run_dir = ? WHERE hash = ?",
                   (json.dumps(cell.config, sort_keys=True), row[0] if keep else str(run_dir), h))

    @staticmethod
    def _adopt_moved(db, cells):
        """Rows stored under an older identity of the same cell (its model folder's path, the spec's
        spelling of its params, or fields added since were once hashed; ``spec.cell_hash`` now leaves
        them out) take the cell's hash and current config, keeping their results."""
        from .spec import cell_hash

        stored = {h: (cfg, status) for h, cfg, status in db.execute("SELECT hash, config, status FROM cells")}
        wanted = {c.hash: c for c in cells if c.hash not in stored}
        if not wanted:
            return
        rank = {"done": 0, "running": 1, "failed": 2, "pending": 3}
        for old, (cfg, status) in sorted(stored.items(), key=lambda kv: rank.get(kv[1][1], 4)):
            new = cell_hash(json.loads(cfg))
            cell = wanted.pop(new, None) if new != old else None
            if cell is not None:
                db.execute("UPDATE cells SET hash = ?, config = ? WHERE hash = ?",
                           (new, json.dumps(cell.config, sort_keys=True), old))
                db.execute("UPDATE members SET hash = ? WHERE hash = ?", (new, old))

    def retry_failed(self, spec: str, scope: set[str] | None = None) -> int:
        with self.transaction() as db:
            failed = [h for (h,) in db.execute("SELECT c.hash FROM cells c JOIN members m ON m.hash = c.hash "
                                               "WHERE m.spec = ? AND c.status = 'failed'", (spec,))
                      if scope is None or h in scope]
            db.executemany("UPDATE cells SET status = 'pending', error = NULL WHERE hash = ?", [(h,) for h in failed])
        return len(failed)

    def claim(self, spec: str, worker: str | None = None, scope: set[str] | None = None) -> dict | None:
        """Mark the next runnable cell of ``spec`` (of its cells in ``scope``, when given) as running for
        ``worker`` and return it; None when no cell can run now (all done, or the rest wait on cells that
        other workers run)."""
        worker = worker or worker_id()
        with self.transaction() as db:
            rows = db.execute("SELECT c.* FROM cells c JOIN members m ON m.hash = c.hash WHERE m.spec = ? "
                              "AND c.status IN ('pending', 'running') ORDER BY m.position", (spec,)).fetchall()
            status = {r["hash"]: r["status"] for r in db.execute("SELECT hash, status FROM cells")}
            for row in rows:
                if scope is not None and row["hash"] not in scope:
                    continue
                if row["status"] == "running" and not self._abandoned(row):
                    continue
                deps = json.loads(row["deps"])
                if any(status.get(d) == "failed" for d in deps):
                    db.execute("UPDATE cells SET status = 'failed', error = ?, finished = ? WHERE hash = ?",
                               (f"the attack model it needs (cell {deps[0]}) failed", now(), row["hash"]))
                    status[row["hash"]] = "failed"
                    continue
                if any(status.get(d) != "done" for d in deps):
                    continue
                db.execute("UPDATE cells SET status = 'running', worker = ?, heartbeat = ?, started = ?, "
                           "attempts = attempts + 1, error = NULL WHERE hash = ?",
                           (worker, time.time(), now(), row["hash"]))
                return self._row(db.execute("SELECT * FROM cells WHERE hash = ?", (row["hash"],)).fetchone())
        return None

    @staticmethod
    def _abandoned(row) -> bool:
        stale = row["heartbeat"] is None or time.time() - row["heartbeat"] > STALE_SECONDS
        return stale or not _alive(row["worker"])

    def beat(self, cell_hash: str, worker: str | None = None):
        with self.transaction() as db:
            db.execute("UPDATE cells SET heartbeat = ? WHERE hash = ? AND worker = ?",
                       (time.time(), cell_hash, worker or worker_id()))

    def finish(self, cell_hash: str, metrics: dict, *, wall_seconds: float, steps: int | None, host: dict,
               code_version: str, worker: str | None = None) -> bool:
        """Record a finished cell; False when another worker had taken it over meanwhile."""
        with self.transaction() as db:
            cur = db.execute("UPDATE cells SET status = 'done', metrics = ?, wall_seconds = ?, steps = ?, "
                             "finished = ?, host = ?, code_version = ?, error = NULL WHERE hash = ? AND worker = ?",
                             (json.dumps(json_ready(metrics), allow_nan=False), wall_seconds, steps, now(), json.dumps(host), code_version,
                              cell_hash, worker or worker_id()))
        return cur.rowcount == 1

    def fail(self, cell_hash: str, error: str, *, host: dict | None = None, worker: str | None = None,
             wall_seconds: float | None = None):
        with self.transaction() as db:
            db.execute("UPDATE cells SET status = 'failed', error = ?, finished = ?, host = ?, wall_seconds = ? "
                       "WHERE hash = ? AND worker = ?",
                       (error, now(), json.dumps(host) if host else None, wall_seconds, cell_hash,
                        worker or worker_id()))

    def release(self, cell_hash: str, worker: str | None = None):
        """Give an interrupted cell back (it resumes from its checkpoint on the next run)."""
        with self.transaction() as db:
            db.execute("UPDATE cells SET status = 'pending', worker = NULL WHERE hash = ? AND worker = ? "
                       "AND status = 'running'", (cell_hash, worker or worker_id()))

    # ---- reading ---------------------------------------------------------------------------------

    @staticmethod
    def _row(r) -> dict:
        d = dict(r)
        for key in ("config", "deps", "metrics", "host"):
            if d.get(key) is not None:
                d[key] = json.loads(d[key])
        return d

    def specs(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT spec FROM members GROUP BY spec ORDER BY MIN(rowid)")]

    def rows(self, spec: str | None = None) -> list[dict]:
        """The cells of ``spec`` (default: of every spec) in spec order, each with its ``axes`` and ``spec``."""
        q = ("SELECT c.*, m.axes AS axes, m.spec AS spec FROM members m JOIN cells c ON c.hash = m.hash "
             + ("WHERE m.spec = ? " if spec else "") + "ORDER BY m.rowid")
        out, seen = [], set()
        for r in self.db.execute(q, (spec,) if spec else ()):
            if r["hash"] in seen:  # a cell shared by several specs counts once
                continue
            seen.add(r["hash"])
            d = self._row(r)
            d["axes"] = json.loads(d["axes"])
            out.append(d)
        return out

    def counts(self, spec: str, scope: set[str] | None = None) -> dict[str, int]:
        """Cells of ``spec`` (of those in ``scope``, when given) per status."""
        out = dict.fromkeys(STATUSES, 0)
        for h, status in self.db.execute("SELECT c.hash, c.status FROM members m JOIN cells c ON c.hash = m.hash "
                                         "WHERE m.spec = ?", (spec,)):
            if scope is None or h in scope:
                out[status] += 1
        return out

    def invocations(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT spec, command, spec_text, started FROM invocations "
                                                 "ORDER BY id")]

    def code_versions(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT DISTINCT code_version FROM cells WHERE code_version IS NOT NULL")}
