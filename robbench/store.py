"""The results store: one SQLite file of evaluation runs and their per-sample outcomes.

Tables (schema version in ``meta``):
- ``runs``: one evaluation of one checkpoint under one protocol (identity: entry, checkpoint hash,
  protocol, protocol hash, overrides JSON, seed), with versions, times, status
  ``running|done|failed|superseded`` and a JSON ``meta``.
  ``role`` is ``target`` (the evaluated entry) or ``source`` (a transfer source's accuracy on its own sets).
- ``outcomes``: per (run, :class:`~robbench.outcomes.OutcomeKey` columns ``attack, source,
  source_member, steps``, eps, sample, member) whether the prediction was correct, and an optional
  margin. ``member`` -1 is the whole model, j is member j. Clean accuracy is attack ``clean`` at eps 0.
- ``batches``: the :class:`~robbench.outcomes.BatchKey` columns of committed batches. A batch's outcomes
  and its key commit in ONE transaction, so a killed writer loses at most the batch in flight and a
  resume skips done keys.
- ``run_meta``: per-run JSON extras (AutoAttack check warnings, EOT draws, failure reasons).

WAL mode lets readers (reports) work while one process writes; a busy timeout makes writers wait
instead of failing. ``synchronous=FULL``: a commit per batch is rare enough that durability against
power loss costs nothing measurable.

A version-1 store (attack ids carrying ``@source=``/``@source_member=``/``@steps=`` suffixes, batch keys
``<id>|b<N>``, protocols ``<name>:source``) is migrated to these columns when opened
(:mod:`robbench.store_migrate`).

The query helpers at the bottom work on the DataFrames :meth:`Store.outcomes` returns.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from robbench.errors import UserError
from robbench.outcomes import BATCH_COLUMNS, KEY_COLUMNS, ROLES, BatchKey, OutcomeKey
from robbench.paths import ensure_dir, results_db
from robbench.store_migrate import migrate

SCHEMA_VERSION = 2
# PRAGMA application_id of a robbench store ("RBst"): a foreign SQLite file is recognised and left alone
APPLICATION_ID = 0x52427374
RUN_STATUSES = ("running", "done", "failed", "superseded")
OUTCOME_COLUMNS = ["run_id", *KEY_COLUMNS, "eps", "sample", "member", "correct", "margin"]
Row = tuple[OutcomeKey, float, int, int, Any, "float | None"]  # (key, eps, sample, member, correct, margin)
BUSY_TIMEOUT_S = 60.0

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id            INTEGER PRIMARY KEY AUTOINCREMENT,
    entry             TEXT NOT NULL,
    checkpoint_sha256 TEXT NOT NULL,
    protocol          TEXT NOT NULL,
    protocol_sha256   TEXT NOT NULL,
    overrides         TEXT NOT NULL DEFAULT '[]',
    seed              INTEGER,
    versions          TEXT NOT NULL DEFAULT '{{}}',
    started           TEXT NOT NULL,
    finished          TEXT,
    status            TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in RUN_STATUSES)})),
    meta              TEXT NOT NULL DEFAULT '{{}}',
    role              TEXT NOT NULL DEFAULT 'target' CHECK (role IN ({", ".join(repr(r) for r in ROLES)}))
);
CREATE INDEX IF NOT EXISTS runs_identity ON runs (entry, protocol, checkpoint_sha256);
CREATE TABLE IF NOT EXISTS outcomes (
    run_id        INTEGER NOT NULL REFERENCES runs (run_id),
    attack        TEXT    NOT NULL,
    source        TEXT    NOT NULL DEFAULT '',
    source_member INTEGER NOT NULL DEFAULT -1,
    steps         INTEGER NOT NULL DEFAULT -1,
    eps           REAL    NOT NULL,
    sample        INTEGER NOT NULL,
    member        INTEGER NOT NULL DEFAULT -1,
    correct       INTEGER NOT NULL CHECK (correct IN (0, 1)),
    margin        REAL,
    PRIMARY KEY (run_id, attack, source, source_member, steps, eps, sample, member)
) WITHOUT ROWID;
-- no extra index: the WITHOUT ROWID primary key is already clustered on (run_id, attack, eps, ...);
-- a separate index doubled the file (7.5 -> 14.4 MB for one dverge-blackbox target) with no measured gain
CREATE TABLE IF NOT EXISTS batches (
    run_id        INTEGER NOT NULL REFERENCES runs (run_id),
    attack        TEXT    NOT NULL,
    source        TEXT    NOT NULL DEFAULT '',
    source_member INTEGER NOT NULL DEFAULT -1,
    batch         INTEGER NOT NULL DEFAULT -1,
    eps           REAL    NOT NULL DEFAULT -1.0,
    committed_at  TEXT    NOT NULL,
    PRIMARY KEY (run_id, attack, source, source_member, batch, eps)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run_meta (
    run_id INTEGER NOT NULL REFERENCES runs (run_id),
    key    TEXT    NOT NULL,
    value  TEXT    NOT NULL,
    PRIMARY KEY (run_id, key)
) WITHOUT ROWID;
"""


def _tables() -> dict[str, str]:
    """The CREATE TABLE statement of each table, by name (what a migration rebuilds)."""
    out = {}
    for stmt in _SCHEMA.split(";"):
        stmt = "\n".join(line for line in stmt.splitlines() if not line.lstrip().startswith("--"))
        words = stmt.split()
        if words[:5] == ["CREATE", "TABLE", "IF", "NOT", "EXISTS"]:
            out[words[5]] = stmt
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def store_error(e: sqlite3.Error, path: str) -> Exception:
    """What SQLite said as one line for the user, when it is about the file (damaged, read-only, locked,
    cannot be opened, disk full); other errors (a constraint, a bug) are returned as they are."""
    name = getattr(e, "sqlite_errorname", "") or ""
    said = str(e).splitlines()[0] if str(e) else name
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return UserError(f"damaged results store (SQLite: {said}); recover what is left with "
                         f"`sqlite3 {path} .recover | sqlite3 recovered.db`, or start a new one with --db",
                         file=path, reason="store-damaged")
    if name.startswith("SQLITE_READONLY"):
        return UserError(f"the results store cannot be written (SQLite: {said}); make it and its folder "
                         "writable, or pass another --db", file=path, reason="store-readonly")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return UserError(f"locked by another process for over {BUSY_TIMEOUT_S:.0f} s (SQLite: {said})",
                         file=path, reason="store-locked")
    if name.startswith("SQLITE_CANTOPEN"):
        return UserError(f"cannot open the results store (SQLite: {said}); --db must name a file in a "
                         "writable folder", file=path, reason="store")
    if name.startswith(("SQLITE_IOERR", "SQLITE_FULL", "SQLITE_PERM", "SQLITE_AUTH", "SQLITE_NOLFS")):
        return UserError(f"cannot use the results store (SQLite: {said})", file=path, reason="store")
    return e


def _writable(path: Path) -> bool:
    """Whether ``path`` can be opened for writing (permission bits say nothing for root or read-only mounts)."""
    try:
        os.close(os.open(path, os.O_RDWR))
    except OSError:
        return False
    return True


class _Cursor(sqlite3.Cursor):
    """A cursor whose file-level SQLite errors are one-line :class:`UserError` s (a damaged page may
    only be met while stepping through rows, so fetching is covered too)."""

    def _fail(self, e: sqlite3.Error) -> Exception:
        return store_error(e, getattr(self.connection, "store_file", "?"))

    def execute(self, *args: Any) -> "_Cursor":  # type: ignore[override]
        try:
            return super().execute(*args)
        except sqlite3.Error as e:
            raise self._fail(e) from None

    def executemany(self, *args: Any) -> "_Cursor":  # type: ignore[override]
        try:
            return super().executemany(*args)
        except sqlite3.Error as e:
            raise self._fail(e) from None

    def fetchone(self) -> Any:
        try:
            return super().fetchone()
        except sqlite3.Error as e:
            raise self._fail(e) from None

    def fetchmany(self, *args: Any) -> list[Any]:
        try:
            return super().fetchmany(*args)
        except sqlite3.Error as e:
            raise self._fail(e) from None

    def fetchall(self) -> list[Any]:
        try:
            return super().fetchall()
        except sqlite3.Error as e:
            raise self._fail(e) from None

    def __next__(self) -> Any:
        try:
            return super().__next__()
        except sqlite3.Error as e:
            raise self._fail(e) from None


class _Connection(sqlite3.Connection):
    """Every statement (ours and pandas') runs through :class:`_Cursor`."""

    store_file = "?"

    def cursor(self, factory: Any = _Cursor) -> Any:  # type: ignore[override]
        return super().cursor(factory)

    def execute(self, sql: str, parameters: Any = ()) -> Any:  # type: ignore[override]
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any) -> Any:  # type: ignore[override]
        return self.cursor().executemany(sql, parameters)


def canonical_json(obj: Any) -> str:
    """Key-sorted compact JSON: equal overrides give equal strings (part of a run's identity)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


class Store:
    """A results store file (default :func:`robbench.paths.results_db`); parent folders are created."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else results_db()
        memory = str(self.path) == ":memory:"
        file = str(self.path)
        if not memory:
            ensure_dir(self.path.parent)
            if self.path.is_dir():
                raise UserError("is a folder; --db must name a results store file (e.g. results/robbench.db)",
                                file=file, reason="store")
        # files SQLite may create beside the store; removed again if opening fails (or, for a read-only
        # store, on close)
        self._sidecars = [] if memory else [Path(file + s) for s in ("-wal", "-shm", "-journal")]
        self._existed = {p for p in self._sidecars if p.exists()}
        # a store file that cannot be written is opened read-only: reading works, a write is one line
        # (SQLite would otherwise accept writes into a -wal file it can never fold into the store)
        self.readonly = not memory and self.path.is_file() and not _writable(self.path)
        target = f"file:{self.path.resolve()}?mode=ro" if self.readonly else file
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so each batch is exactly one transaction.
            self.conn = sqlite3.connect(target, timeout=BUSY_TIMEOUT_S, isolation_level=None, factory=_Connection,
                                        uri=self.readonly)
        except sqlite3.Error as e:
            err = store_error(e, file)
            raise (err if isinstance(err, UserError) else UserError(f"cannot open the results store ({e})",
                                                                      file=file, reason="store")) from None
        self.conn.store_file = file  # type: ignore[attr-defined]
        try:
            self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self._recognise()
            if not memory and not self.readonly:
                self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = FULL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            self._init_schema()
        except (UserError, sqlite3.Error) as e:
            self.conn.close()
            self._remove_sidecars()
            if isinstance(e, UserError):
                raise
            raise UserError(f"not a usable results store ({e}); pass another --db", file=file, reason="store") from None

    def _remove_sidecars(self) -> None:
        for p in self._sidecars:
            if p not in self._existed:
                with contextlib.suppress(OSError):
                    p.unlink()

    def _recognise(self) -> None:
        """A file with tables must be a robbench store (its application id, or the ``meta`` table of a
        store written before the id was set); robbench never adds its tables to someone else's database."""
        app = int(self.conn.execute("PRAGMA application_id").fetchone()[0])
        tables = sorted(r[0] for r in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'").fetchall())
        if app == APPLICATION_ID or not tables:
            return
        if app == 0 and "meta" in tables and "runs" in tables:
            return
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise UserError(f"an SQLite database that is not a robbench results store (application id {app}, "
                        f"tables {shown}); it is left as it was; pass another --db", file=str(self.path),
                        reason="store-foreign")

    def _read_version(self) -> str | None:
        has_meta = self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        if not has_meta:
            return None
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return None if row is None else row[0]

    def _init_schema(self) -> None:
        # Readers must open while a writer is mid-batch: take the write lock only to create or migrate.
        version = self._read_version()
        if version is not None and int(version) == SCHEMA_VERSION:
            return
        if self.readonly:
            raise UserError(f"the results store is read-only and of schema version {version} (this robbench "
                            f"needs {SCHEMA_VERSION}); make it writable to migrate it, or pass another --db",
                            file=str(self.path), reason="store-readonly")
        if version is not None and int(version) > SCHEMA_VERSION:
            raise UserError(f"schema version {version}; this robbench reads version {SCHEMA_VERSION}",
                            file=str(self.path), field="meta.schema_version", reason="store-version")
        with self._tx():
            version = self._read_version()  # another process may have created or migrated it meanwhile
            if version is not None and int(version) == SCHEMA_VERSION:
                return
            if version is not None:
                migrate(self.conn, int(version), SCHEMA_VERSION, file=str(self.path), tables=_tables())
                self.conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                return
            # One statement at a time: executescript would commit our transaction first.
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self.conn.execute(stmt)
            self.conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self.conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- plumbing ------------------------------------------------------------------------------
    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlocks
            return self.conn

        def __exit__(self, exc_type: Any, *_: Any) -> None:
            self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")

    def _tx(self) -> "Store._Tx":
        return Store._Tx(self.conn)

    def close(self) -> None:
        self.conn.close()
        if self.readonly:
            self._remove_sidecars()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def schema_version(self) -> int:
        return int(self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])

    # -- runs ----------------------------------------------------------------------------------
    _IDENTITY = ("entry = ? AND checkpoint_sha256 = ? AND protocol = ? AND protocol_sha256 = ? "
                 "AND overrides = ? AND seed IS ? AND role = ?")

    def find_run(self, entry: str, checkpoint_sha256: str, protocol: str, protocol_sha256: str,
                 overrides: Any = None, seed: int | None = None, role: str = "target") -> int | None:
        """The newest non-superseded run with this identity, or None."""
        row = self.conn.execute(
            f"SELECT run_id FROM runs WHERE {self._IDENTITY} AND status != 'superseded' "
            "ORDER BY run_id DESC LIMIT 1",
            (entry, checkpoint_sha256, protocol, protocol_sha256, canonical_json(overrides or []), seed, role),
        ).fetchone()
        return None if row is None else int(row[0])

    def start_run(self, entry: str, checkpoint_sha256: str, protocol: str, protocol_sha256: str,
                  overrides: Any = None, seed: int | None = None, meta: dict[str, Any] | None = None,
                  force: bool = False, versions: dict[str, Any] | None = None, role: str = "target") -> int:
        """Return the run to write into. An existing run with the same identity is returned as is
        (running or failed: it resumes, status back to running; done: the caller sees it is done via
        :meth:`run` and skips it). ``force`` marks it superseded and starts a new one. ``role``:
        ``target`` (the evaluated entry) or ``source`` (a transfer source's accuracy on its own sets)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if versions is None:  # imported here: the checkpoint module brings torch, the report reads without it
            from robbench.checkpoint import library_versions

            versions = library_versions()
        ident = (entry, checkpoint_sha256, protocol, protocol_sha256, canonical_json(overrides or []), seed, role)
        with self._tx() as c:
            row = c.execute(f"SELECT run_id, status FROM runs WHERE {self._IDENTITY} AND status != 'superseded' "
                            "ORDER BY run_id DESC LIMIT 1", ident).fetchone()
            if row is not None and not force:
                if row[1] == "failed":
                    c.execute("UPDATE runs SET status = 'running', finished = NULL WHERE run_id = ?", (row[0],))
                return int(row[0])
            if row is not None:
                c.execute("UPDATE runs SET status = 'superseded' WHERE run_id = ?", (row[0],))
            cur = c.execute(
                "INSERT INTO runs (entry, checkpoint_sha256, protocol, protocol_sha256, overrides, seed, role, "
                "versions, started, status, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?)",
                (*ident, canonical_json(versions), _now(), canonical_json(meta or {})))
            return int(cur.lastrowid)

    def run(self, run_id: int) -> dict[str, Any]:
        """One run as a dict (JSON columns decoded)."""
        df = self.runs(run_id=run_id)
        if df.empty:
            raise KeyError(f"no run {run_id} in {self.path}")
        return df.iloc[0].to_dict()

    def _set_status(self, run_id: int, status: str) -> None:
        with self._tx() as c:
            cur = c.execute("UPDATE runs SET status = ?, finished = ? WHERE run_id = ?", (status, _now(), run_id))
            if cur.rowcount != 1:
                raise KeyError(f"no run {run_id} in {self.path}")

    def finish_run(self, run_id: int) -> None:
        self._set_status(run_id, "done")

    def fail_run(self, run_id: int, reason: str | None = None) -> None:
        """Mark failed (committed batches stay; :meth:`start_run` with the same identity resumes it)."""
        self._set_status(run_id, "failed")
        if reason:
            self.put_meta(run_id, "failure", reason)

    def put_meta(self, run_id: int, key: str, value: Any) -> None:
        """Store a JSON-able per-run extra under ``key`` (replaces an older value)."""
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO run_meta (run_id, key, value) VALUES (?, ?, ?)",
                      (run_id, key, canonical_json(value)))

    def get_meta(self, run_id: int, key: str | None = None) -> Any:
        """One extra (None when absent) or, without ``key``, all of them as a dict."""
        if key is not None:
            row = self.conn.execute("SELECT value FROM run_meta WHERE run_id = ? AND key = ?", (run_id, key)).fetchone()
            return None if row is None else json.loads(row[0])
        rows = self.conn.execute("SELECT key, value FROM run_meta WHERE run_id = ? ORDER BY key", (run_id,))
        return {k: json.loads(v) for k, v in rows}

    # -- outcomes ------------------------------------------------------------------------------
    def write_batch(self, run_id: int, batch: BatchKey | str, rows: Iterable[Row]) -> bool:
        """Commit a batch's outcome rows ``(key, eps, sample, member, correct, margin|None)`` and its
        key in one transaction (``key``: an :class:`OutcomeKey`, or an attack id for its final result).
        An already committed batch is a no-op (returns False). Rows are converted from numpy/torch
        scalars; a row colliding with a stored one is an error."""
        b = BatchKey.of(batch)
        bvals = (b.attack, b.source, int(b.source_member), int(b.batch), float(b.eps))
        with self._tx() as c:
            if c.execute(f"SELECT 1 FROM batches WHERE run_id = ? AND {_BATCH_MATCH}", (run_id, *bvals)).fetchone():
                return False
            c.executemany(
                f"INSERT INTO outcomes ({', '.join(OUTCOME_COLUMNS)}) VALUES ({', '.join('?' * len(OUTCOME_COLUMNS))})",
                (_outcome_values(run_id, *r) for r in rows))
            c.execute(f"INSERT INTO batches (run_id, {', '.join(BATCH_COLUMNS)}, committed_at) "
                      f"VALUES (?, {', '.join('?' * len(BATCH_COLUMNS))}, ?)", (run_id, *bvals, _now()))
        return True

    def done_batches(self, run_id: int) -> set[BatchKey]:
        rows = self.conn.execute(f"SELECT {', '.join(BATCH_COLUMNS)} FROM batches WHERE run_id = ?", (run_id,))
        return {BatchKey(a, s, int(m), int(b), float(e)) for a, s, m, b, e in rows}

    # -- queries -------------------------------------------------------------------------------
    def runs(self, **filters: Any) -> pd.DataFrame:
        """Runs matching column filters (``entry=``, ``protocol=``, ``status=``, ``run_id=`` ...; a list or
        tuple means any of), JSON columns decoded, oldest first."""
        where, params = _where(filters, {k: k for k in _RUN_FILTERS})
        df = pd.read_sql_query(f"SELECT * FROM runs{where} ORDER BY run_id", self.conn, params=params)
        for col in ("overrides", "versions", "meta"):
            df[col] = df[col].map(json.loads)
        return df

    def outcomes(self, run_id: int | Sequence[int] | None = None, **filters: Any) -> pd.DataFrame:
        """Outcome rows (columns :data:`OUTCOME_COLUMNS`). Filters: ``attack``, ``source``,
        ``source_member``, ``steps``, ``eps``, ``sample``, ``member`` on outcomes; ``entry``, ``protocol``,
        ``role``, ``status``, ``checkpoint_sha256`` on the run (a list or tuple means any of)."""
        if run_id is not None:
            filters["run_id"] = run_id
        columns = {**{k: f"r.{k}" for k in _RUN_FILTERS}, **{k: f"o.{k}" for k in _OUTCOME_FILTERS}}
        where, params = _where(filters, columns)
        order = ", ".join(f"o.{c}" for c in ("run_id", *KEY_COLUMNS, "eps", "sample", "member"))
        sql = (f"SELECT {', '.join('o.' + c for c in OUTCOME_COLUMNS)} FROM outcomes o "
               f"JOIN runs r ON r.run_id = o.run_id{where} ORDER BY {order}")
        df = pd.read_sql_query(sql, self.conn, params=params)
        df["margin"] = df["margin"].astype(float)
        return df

    def count_outcomes(self, run_id: int) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM outcomes WHERE run_id = ?", (run_id,)).fetchone()[0])


_OUTCOME_FILTERS = ("run_id", *KEY_COLUMNS, "eps", "sample", "member")
_RUN_FILTERS = ("run_id", "entry", "protocol", "role", "status", "checkpoint_sha256", "protocol_sha256", "seed")
_BATCH_MATCH = " AND ".join(f"{c} = ?" for c in BATCH_COLUMNS)


def _outcome_values(run_id: int, key: OutcomeKey | str, eps: Any, sample: Any, member: Any, correct: Any,
                    margin: Any) -> tuple[Any, ...]:
    k = OutcomeKey.of(key)
    return (run_id, k.attack, k.source, int(k.source_member), int(k.steps), float(eps), int(sample), int(member),
            int(bool(correct)), None if margin is None else float(margin))


def _where(filters: dict[str, Any], columns: dict[str, str]) -> tuple[str, list[Any]]:
    """`` WHERE col IN (?, ...) AND ...`` for filters named in ``columns`` (filter name -> SQL column)."""
    clauses, params = [], []
    for key, value in filters.items():
        if key not in columns:
            raise TypeError(f"unknown filter {key!r}; allowed: {', '.join(sorted(columns))}")
        col = columns[key]
        values = list(value) if isinstance(value, (list, tuple, set, frozenset, np.ndarray)) else [value]
        values = [v.item() if isinstance(v, np.generic) else v for v in values]
        clauses.append(f"{col} IN ({', '.join('?' * len(values))})" if values else "0")
        params.extend(values)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


# ----------------------------------------------------------------------------------------------
# Query helpers (pandas)
# ----------------------------------------------------------------------------------------------

def wilson_interval(k: Any, n: Any, z: float = 1.959963984540054) -> tuple[Any, Any]:
    """Wilson score interval for k successes in n trials (95% by default; z = Φ⁻¹(0.975)).
    Works on scalars or arrays; n = 0 gives NaN."""
    k_arr = np.asarray(k, dtype=float)
    n_arr = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k_arr / n_arr
        denom = 1.0 + z * z / n_arr
        centre = (p + z * z / (2 * n_arr)) / denom
        half = z * np.sqrt(p * (1 - p) / n_arr + z * z / (4 * n_arr * n_arr)) / denom
        lo, hi = np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)
    lo = np.where(n_arr > 0, lo, np.nan)
    hi = np.where(n_arr > 0, hi, np.nan)
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


def _keys(df: pd.DataFrame, *cols: str) -> list[str]:
    return (["run_id"] if "run_id" in df.columns else []) + list(cols)


def _with_accuracy(g: pd.DataFrame) -> pd.DataFrame:
    g["accuracy"] = g["correct"] / g["n"]
    g["ci_low"], g["ci_high"] = wilson_interval(g["correct"].to_numpy(), g["n"].to_numpy())
    return g


def key_columns(df: pd.DataFrame) -> list[str]:
    """The :class:`OutcomeKey` columns ``df`` carries (hand-built frames may hold ``attack`` alone)."""
    return [c for c in KEY_COLUMNS if c in df.columns]


def outcome_keys(df: pd.DataFrame) -> list[OutcomeKey]:
    """The distinct outcome keys of ``df``, in first-seen order."""
    cols = key_columns(df)
    return [OutcomeKey(**dict(zip(cols, t))) for t in df[cols].drop_duplicates().itertuples(index=False, name=None)]


def rows_of(df: pd.DataFrame, keys: Iterable[OutcomeKey]) -> pd.Series:
    """Boolean mask of the rows of ``df`` whose outcome key is one of ``keys``."""
    cols = key_columns(df)
    wanted = {tuple(getattr(k, c) for c in cols) for k in keys}
    if not len(df) or not wanted:
        return pd.Series(False, index=df.index)
    return pd.Series(pd.MultiIndex.from_frame(df[cols]).isin(list(wanted)), index=df.index)


def all_or_nothing(df: pd.DataFrame, attacks: Sequence[str] | None = None,
                   members: Sequence[int] | None = (-1,)) -> pd.DataFrame:
    """Per (run_id,) eps and member: the fraction of samples correct under EVERY outcome key present
    (``attacks``: only the keys of these attack ids, each of which must have rows). Columns: run_id,
    eps, member, n, correct, accuracy, ci_low, ci_high (Wilson 95%).

    A sample lacking a row for a key is an error when it would otherwise count as robust (never
    silently robust). It is accepted when another attack at that eps already fooled it: an
    early-stopping engine may skip the rest, and the result is the same."""
    d = df
    if members is not None:
        d = d[d["member"].isin(list(members))]
    if attacks is not None:
        d = d[d["attack"].isin(list(attacks))]
    keys = _keys(d, "eps", "member")
    kc = key_columns(d)
    out_cols = keys + ["n", "correct", "accuracy", "ci_low", "ci_high"]
    if d.empty:
        if attacks is not None and len(df):
            raise ValueError(f"no outcome rows for attacks {list(attacks)} and members {members}")
        return pd.DataFrame(columns=out_cols)
    expected = d.drop_duplicates(keys + kc).groupby(keys).size().rename("expected")
    if attacks is not None:  # a listed attack without any row is missing everywhere
        expected = expected + len(set(attacks) - set(d["attack"]))
    per = d.groupby(keys + ["sample"]).agg(rows=("attack", "size"), ok=("correct", "min")).reset_index()
    dup = d.duplicated(keys + ["sample"] + kc)
    if dup.any():
        raise ValueError(f"duplicate outcome rows, e.g. {d[dup].iloc[0][keys + ['sample'] + kc].to_dict()}")
    per = per.join(expected, on=keys)
    missing = (per["rows"] < per["expected"]) & (per["ok"] == 1)
    if missing.any():
        bad = per[missing].iloc[0]
        have = set(outcome_keys(d[(d[keys + ["sample"]] == bad[keys + ["sample"]]).all(axis=1)]))
        want = set(outcome_keys(d[(d[keys] == bad[keys]).all(axis=1)]))
        want |= {OutcomeKey(a) for a in set(attacks or ()) - set(d["attack"])}
        raise ValueError(f"{int(missing.sum())} sample(s) lack attack rows and are not fooled by any other: "
                         f"e.g. sample {int(bad['sample'])} at eps {bad['eps']} member {int(bad['member'])} "
                         f"misses {sorted(k.label() for k in want - have)}")
    g = per.groupby(keys).agg(n=("sample", "size"), correct=("ok", "sum")).reset_index()
    return _with_accuracy(g)[out_cols]


def per_attack_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per (run_id,) outcome key, eps, member with n and a Wilson 95% interval."""
    keys = _keys(df, *key_columns(df), "eps", "member")
    g = df.groupby(keys).agg(n=("correct", "size"), correct=("correct", "sum")).reset_index()
    return _with_accuracy(g)


def per_member_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """Wide table: rows (run_id,) outcome key, eps; one column per member id (-1 = whole model); accuracy."""
    acc = per_attack_accuracy(df)
    keys = _keys(df, *key_columns(df), "eps")
    wide = acc.pivot_table(index=keys, columns="member", values="accuracy")
    wide.columns.name = "member"
    return wide


def transfer_matrix(df: pd.DataFrame, attack: str, eps: float | None = None,
                    value: str = "accuracy") -> pd.DataFrame:
    """Within-ensemble transferability: rows = source member i (``attack`` crafted on member i),
    columns = target member 0..N-1 then ``ensemble`` (member -1). ``value``: ``accuracy`` or
    ``success`` (1 - accuracy: on samples every member classifies correctly, the attack success rate
    DVERGE's heatmaps show). Needs a single eps (pass ``eps`` when the rows hold several) and one run."""
    if value not in ("accuracy", "success"):
        raise ValueError("value must be 'accuracy' or 'success'")
    d = df[(df["attack"] == attack) & (df["source_member"] >= 0)] if "source_member" in df.columns else df.iloc[:0]
    if eps is not None:
        d = d[np.isclose(d["eps"], eps)]
    if d.empty:
        raise ValueError(f"no rows of attack {attack!r} crafted on a member" + (f" at eps {eps}" if eps else ""))
    if d["eps"].nunique() > 1:
        raise ValueError(f"rows hold several eps {sorted(d['eps'].unique())}; pass eps=")
    if "run_id" in d.columns and d["run_id"].nunique() > 1:
        raise ValueError("rows hold several runs; select one run")
    acc = d.groupby(["source_member", "member"])["correct"].mean().unstack("member")
    n_members = int(max(acc.index.max(), max((c for c in acc.columns if c >= 0), default=-1))) + 1
    acc = acc.reindex(index=range(n_members), columns=[*range(n_members), -1])
    acc.index = pd.Index([int(i) for i in acc.index], name="source")
    acc.columns = pd.Index([*range(n_members), "ensemble"], name="target")
    return 1.0 - acc if value == "success" else acc


def latest_runs(store: Store, protocol: str, role: str = "target") -> pd.DataFrame:
    """The newest done run per entry for ``protocol`` in ``role`` (by finish time, then run id)."""
    df = store.runs(protocol=protocol, status="done", role=role)
    if df.empty:
        return df
    df = df.sort_values(["finished", "run_id"])
    return df.groupby("entry", as_index=False).tail(1).sort_values("entry").reset_index(drop=True)

