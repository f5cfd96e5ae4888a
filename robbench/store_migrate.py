"""Migration of older results stores to the current schema, run by :class:`robbench.store.Store` when it
opens a store of an older version (inside the transaction that holds the write lock).

Version 1 kept an outcome's identity in strings the engine built: attack ids ``<id>@source=<entry>``,
``<id>@source_member=<i>`` and ``<id>@steps=<K>`` (suffixes in that order, each optional), batch keys
``<attack id>|b<N>`` (one sample batch) and ``<attack id>|eps=<e>`` (a source's accuracy at one eps),
and a transfer source's own-accuracy runs under the protocol ``<name>:source``. Version 2 stores these
as columns (:mod:`robbench.outcomes`). This module is the only place that reads the old strings.
"""
from __future__ import annotations

import sqlite3

from robbench.errors import UserError
from robbench.outcomes import BATCH_COLUMNS, KEY_COLUMNS, NO_BATCH, NO_EPS, BatchKey, OutcomeKey

SOURCE_SUFFIX_V1 = ":source"


def outcome_key_v1(attack: str) -> OutcomeKey:
    """A version-1 stored attack id as its key."""
    base, *suffixes = attack.split("@")
    fields: dict[str, str] = {}
    for s in suffixes:
        name, sep, value = s.partition("=")
        if not sep or name not in ("source", "source_member", "steps") or name in fields:
            raise ValueError(f"not a version-1 attack id: {attack!r}")
        fields[name] = value
    return OutcomeKey(base, fields.get("source", ""), int(fields.get("source_member", -1)),
                      int(fields.get("steps", -1)))


def batch_key_v1(key: str) -> BatchKey:
    """A version-1 batch key as its key."""
    attack, sep, unit = key.rpartition("|")
    if not sep:
        raise ValueError(f"not a version-1 batch key: {key!r}")
    k = outcome_key_v1(attack)
    if unit.startswith("eps="):
        return BatchKey(k.attack, k.source, k.source_member, NO_BATCH, float(unit[4:]))
    if unit.startswith("b") and unit[1:].isdigit():
        return BatchKey(k.attack, k.source, k.source_member, int(unit[1:]), NO_EPS)
    raise ValueError(f"not a version-1 batch key: {key!r}")


OUTCOME_COLUMNS_V2 = ("run_id", *KEY_COLUMNS, "eps", "sample", "member", "correct", "margin")


def _v1_to_v2(conn: sqlite3.Connection, file: str, tables: dict[str, str]) -> None:
    OUTCOME_COLUMNS = OUTCOME_COLUMNS_V2
    conn.execute("ALTER TABLE outcomes RENAME TO outcomes_v1")
    conn.execute("ALTER TABLE batches RENAME TO batches_v1")
    conn.execute(tables["outcomes"])
    conn.execute(tables["batches"])
    try:
        keys = {a: outcome_key_v1(a) for (a,) in conn.execute("SELECT DISTINCT attack FROM outcomes_v1")}
        rows = conn.execute("SELECT run_id, attack, eps, sample, member, correct, margin FROM outcomes_v1")
        conn.executemany(
            f"INSERT INTO outcomes ({', '.join(OUTCOME_COLUMNS)}) VALUES ({', '.join('?' * len(OUTCOME_COLUMNS))})",
            ((r, keys[a].attack, keys[a].source, keys[a].source_member, keys[a].steps, e, s, m, c, mg)
             for r, a, e, s, m, c, mg in rows))
        batches = [(r, batch_key_v1(k), t) for r, k, t in conn.execute(
            "SELECT run_id, batch_key, committed_at FROM batches_v1")]
    except ValueError as e:
        raise UserError(f"cannot migrate the results store from version 1 ({e})", file=file,
                        reason="store-migration") from None
    conn.executemany(
        f"INSERT INTO batches (run_id, {', '.join(BATCH_COLUMNS)}, committed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        ((r, b.attack, b.source, b.source_member, b.batch, b.eps, t) for r, b, t in batches))
    conn.execute("DROP TABLE outcomes_v1")
    conn.execute("DROP TABLE batches_v1")
    conn.execute("ALTER TABLE runs ADD COLUMN role TEXT NOT NULL DEFAULT 'target' "
                 "CHECK (role IN ('target', 'source'))")
    n = len(SOURCE_SUFFIX_V1)
    conn.execute("UPDATE runs SET role = 'source', protocol = substr(protocol, 1, length(protocol) - ?) "
                 "WHERE substr(protocol, -?) = ?", (n, n, SOURCE_SUFFIX_V1))


_STEPS = {1: _v1_to_v2}


def migrate(conn: sqlite3.Connection, version: int, target: int, *, file: str, tables: dict[str, str]) -> None:
    """Bring a store from ``version`` to ``target`` in the caller's transaction (all or nothing).
    ``tables``: the current ``CREATE TABLE`` statement of each table, by name."""
    while version < target:
        if version not in _STEPS:
            raise UserError(f"schema version {version} cannot be migrated; this robbench reads version {target}",
                            file=file, field="meta.schema_version", reason="store-version")
        _STEPS[version](conn, file, tables)
        version += 1
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(target),))
