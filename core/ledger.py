"""The ledger: every run, in SQLite (WAL), in the user data dir. Rows are never lost: each
change is one short transaction; schema changes are migrations by version number."""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from . import paths
from .errors import LedgerError

MIGRATIONS = [
    # 1: the runs table
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        parent_id TEXT,
        kind TEXT NOT NULL,            -- eval | export
        model TEXT NOT NULL,
        recipe TEXT NOT NULL,          -- JSON {"steps": [...]}
        label TEXT NOT NULL,
        eval_key TEXT,
        settings TEXT NOT NULL,        -- JSON: eval (and export) settings
        status TEXT NOT NULL,          -- running | done | failed | cancelled | interrupted
        error TEXT,
        result TEXT,                   -- JSON payload of the result event
        pid INTEGER,
        created REAL NOT NULL,
        finished REAL
    );
    CREATE INDEX runs_model ON runs(model, eval_key);
    """,
]

STATUSES = ("running", "done", "failed", "cancelled", "interrupted", "replaced")  # replaced: an export overwritten


class Ledger:
    def __init__(self, path: str | Path | None = None):
        try:
            self.path = Path(path) if path else paths.ledger_path()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as db:
                db.execute("PRAGMA journal_mode=WAL")
                version = db.execute("PRAGMA user_version").fetchone()[0]
                for i, sql in enumerate(MIGRATIONS[version:], start=version + 1):
                    with db:
                        db.executescript(sql)
                        db.execute(f"PRAGMA user_version={i}")
        except (OSError, sqlite3.Error) as e:  # a damaged file, or a data folder that is a file
            where = self.path if hasattr(self, "path") else "the data folder"
            raise LedgerError(f"cannot open the run ledger at {where}: {e}. Move the file aside (the app starts a new "
                              "ledger) or point SQUEEZE_HOME at a writable folder") from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=30000")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _exec(self, sql: str, args=()) -> None:
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(sql, args)
            db.execute("COMMIT")

    def start(self, spec, pid: int | None = None) -> None:
        from .errors import RecipeError
        from .recipe import from_data
        try:
            label = from_data(spec.recipe).label()
        except RecipeError:
            label = "(invalid recipe)"  # the job itself fails with the message
        settings = {"eval": spec.eval, "export": spec.export}
        self._exec(
            "INSERT INTO runs (id, parent_id, kind, model, recipe, label, eval_key, settings, status, pid, created)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (spec.job_id, spec.parent_id, spec.kind, spec.model, json.dumps(spec.recipe),
             label, spec.eval_key(), json.dumps(settings), "running", pid, time.time()))

    def set_pid(self, run_id: str, pid: int) -> None:
        self._exec("UPDATE runs SET pid=? WHERE id=?", (pid, run_id))

    def finish(self, run_id: str, status: str, result: dict | None = None, error: str | None = None) -> None:
        assert status in STATUSES
        self._exec("UPDATE runs SET status=?, result=COALESCE(?, result), error=?, finished=? WHERE id=?",
                   (status, json.dumps(result) if result is not None else None, error, time.time(), run_id))

    def replace_exports(self, path: str, by: str) -> None:
        """Earlier finished exports whose model file `path` the export `by` has just overwritten: their numbers
        no longer describe the file there. The rows stay (status "replaced"), so nothing measured is lost."""
        for r in self.rows(kinds=("export",), status="done"):
            if r["id"] != by and (r.get("result") or {}).get("path") == path:
                self._exec("UPDATE runs SET status='replaced', error=? WHERE id=?",
                           (f"replaced by a later export into the same folder (run {by})", r["id"]))

    def rows(self, model: str | None = None, kinds: tuple[str, ...] | None = None,
             status: str | None = None) -> list[dict]:
        """Rows (of `model`, of these job `kinds`, in this `status`) oldest first. The filters spare a caller
        the results it does not read: a weight view's result is ~0.6 MB of histograms on SmolLM2 (~30 ms to
        parse)."""
        where, args = [], []
        for column, value in (("model", model), ("status", status)):
            if value:
                where.append(f"{column}=?")
                args.append(value)
        if kinds:
            where.append(f"kind IN ({','.join('?' * len(kinds))})")
            args.extend(kinds)
        q = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY created"
        with closing(self._connect()) as db:
            return [_row(r) for r in db.execute(q, args)]

    def get(self, run_id: str) -> dict | None:
        with closing(self._connect()) as db:
            r = db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        return _row(r) if r else None

    def baseline(self, model: str, eval_key: str) -> dict | None:
        """The latest finished no-recipe eval of this model under these settings."""
        with closing(self._connect()) as db:
            r = db.execute("SELECT * FROM runs WHERE model=? AND eval_key=? AND kind='eval' AND status='done'"
                           " AND recipe=? ORDER BY created DESC LIMIT 1",
                           (model, eval_key, json.dumps({"steps": []}))).fetchone()
        return _row(r) if r else None

    def mark_interrupted(self, known_pid_only: bool = False) -> int:
        """Runs left 'running' by a process that is gone (app closed or crashed mid-job).
        `known_pid_only`: leave rows without a pid alone (another app may be starting that job's worker)."""
        running = self.rows(status="running")
        if not running:
            return 0
        import psutil
        n = 0
        for r in running:
            if known_pid_only and not r["pid"]:
                continue
            if not (r["pid"] and psutil.pid_exists(r["pid"])):
                self.finish(r["id"], "interrupted", error="the app stopped while this job ran")
                n += 1
        return n

    def delete(self, run_id: str) -> None:
        self._exec("DELETE FROM runs WHERE id=?", (run_id,))

    def forget(self, run_id: str) -> tuple[list[str], list[Path]]:
        """Deletes a run that is not running, with its exports, and the folders the app saved for them in
        the workspace: workspace/variants/<id> and the export folders. A folder outside the workspace (the
        user's model, an export placed elsewhere) is never touched, nor one a remaining run still uses.
        A folder that cannot be removed keeps its row (LedgerError). -> (row ids deleted, folders removed)."""
        import shutil

        from .models import VARIANT_MANIFEST
        row = self.get(run_id)
        if row is None:
            raise LedgerError(f"no run {run_id} in the ledger; `squeeze runs` lists them")
        gone = [r for r in self.rows() if r["parent_id"] == run_id] + [row]  # exports first: never an orphan
        if any(r["status"] == "running" for r in gone):
            raise LedgerError(f"{row['label']} (or an export of it) is still running: cancel it first")
        ids = {r["id"] for r in gone}
        kept = {f for r in self.rows() if r["id"] not in ids for f in _folders(r)}
        workspace = paths.workspace_dir().resolve()
        removed = []
        for r in gone:
            for f in _folders(r):
                if f in kept or f == workspace or not f.is_relative_to(workspace) or not f.is_dir():
                    continue
                try:
                    (f / VARIANT_MANIFEST).unlink(missing_ok=True)  # first: a half-deleted variant is never reused
                    shutil.rmtree(f)
                except OSError as e:
                    raise LedgerError(f"cannot delete {f}: {e.strerror or e}; close what uses it and try again") from None
                removed.append(f)
            self.delete(r["id"])
        return [r["id"] for r in gone], removed


def _folders(r: dict) -> list[Path]:
    """The folders a run's files are in: its saved variant (also for a run that failed after saving) and,
    for an export, the folder of its model.onnx; resolved (a symlink leading out of the workspace is seen
    as where it leads)."""
    res = r.get("result") or {}
    out = [paths.workspace_dir() / "variants" / r["id"], paths.workspace_dir() / "variants" / f"{r['id']}.tmp"]
    if res.get("variant_dir"):
        out.append(Path(res["variant_dir"]))
    if res.get("path"):
        out.append(Path(res["path"]).parent)
    elif r.get("kind") == "export":  # a failed export: the folder it was writing, when the app named it
        folder = ((r.get("settings") or {}).get("export") or {}).get("out")
        if folder and r["id"] in Path(folder).name:
            out.append(Path(folder))
    return [p.expanduser().resolve() for p in out]


def _row(r: sqlite3.Row) -> dict:
    d = dict(r)
    for k in ("recipe", "settings", "result"):
        d[k] = json.loads(d[k]) if d.get(k) else None
    return d
