"""Entry families: one ``zoo/<to>.family.toml`` derives a whole chain ``<to>_*`` from the file entries
``<from>_*`` (a sparsity sweep, a data-subset count, another base training), so a sweep is one file
instead of ~26 near-identical ones. ``copies`` adds members with no file entry of their own (a sub-model
group ``nis_3`` derived from ``nis_2``'s entries, its references renamed into its own group).

This module only reads and indexes family files and renames the references between chain members;
:mod:`robbench.config` merges the source entries and applies the family's overrides with the same code
as ``--set``, so a derived entry resolves exactly like a file entry. A leaf: it imports nothing of
robbench but the error type.
"""
from __future__ import annotations

import fnmatch
import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robbench.errors import ConfigError

SUFFIX = ".family.toml"
_KEYS = {"description", "description_replace", "from", "to", "entries", "copies", "tags", "tags_drop", "set",
         "set_for"}


def matches(suffix: str, pattern: str) -> bool:
    """``fnmatch`` pattern(s) of member suffixes; ``|`` separates alternatives (``"at|hydra*"``)."""
    return any(fnmatch.fnmatchcase(suffix, p) for p in pattern.split("|"))


@dataclass
class Family:
    file: Path
    sha256: str                      # of the family file's bytes: recorded in every derived entry
    source: str                      # ``from``: the prefix of the file entries it derives from
    target: str                      # ``to``: the prefix of the derived entries
    suffixes: list[str]              # members: ``<source>_<suffix>`` -> ``<target>_<suffix>``, then the copies
    description: str = ""
    description_replace: dict[str, str] = field(default_factory=dict)  # text in the source description -> new
    tags: list[str] = field(default_factory=list)       # appended to each member's tags
    tags_drop: list[str] = field(default_factory=list)  # removed from them (a source's "table1")
    overrides: list[tuple[str, Any]] = field(default_factory=list)          # [set]: (dotted key, value)
    overrides_for: list[tuple[str, str, Any]] = field(default_factory=list)  # [set_for.PATTERN]
    # ``copies``: a copy member's suffix -> (its source entry's suffix, the new group, the old group)
    copied: dict[str, tuple[str, str, str]] = field(default_factory=dict)

    def source_suffix(self, suffix: str) -> str:
        """The suffix of the file entry member ``suffix`` derives from (itself, but for a copy)."""
        return self.copied[suffix][0] if suffix in self.copied else suffix

    def rename(self, suffix: str | None = None) -> dict[str, str]:
        """Source entry name -> derived entry name, for every member that derives from its namesake; in
        copy member ``suffix``, the old group's source names go to the copy's own group instead."""
        out = {f"{self.source}_{s}": f"{self.target}_{s}" for s in self.suffixes if s not in self.copied}
        if suffix in self.copied:
            _, new, old = self.copied[suffix]
            out.update({f"{self.source}_{src}": f"{self.target}_{d}" for d, (src, n, o) in self.copied.items()
                        if (n, o) == (new, old)})
        return out

    def overrides_of(self, suffix: str) -> list[tuple[str, Any]]:
        """The (key, value) pairs applied to member ``suffix``, in order: [set], then every matching
        [set_for] pattern (later ones win)."""
        return self.overrides + [(k, v) for pat, k, v in self.overrides_for if matches(suffix, pat)]

    def describe(self, text: str, suffix: str | None = None) -> str:
        """A member's description: the source's, with ``description_replace`` applied and the family's
        ``description`` appended in brackets; a copy says which group it copies (the source's text
        names the old group's index)."""
        for old, new in self.description_replace.items():
            text = text.replace(old, new)
        notes = [self.description] if self.description else []
        if suffix in self.copied:
            _, new, old = self.copied[suffix]
            notes.append(f"{new}: a copy of {old}")
        return f"{text} [{'; '.join(notes)}]".strip() if notes else text

    def retag(self, tags: list[str]) -> list[str]:
        return list(dict.fromkeys([*(t for t in tags if t not in self.tags_drop), *self.tags]))


def is_family_file(path: Path) -> bool:
    return path.name.endswith(SUFFIX)


def _flatten(table: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"train": {"epochs": 3}}`` and ``{"train.epochs": 3}`` -> [("train.epochs", 3)]: a table value
    sets its keys one by one, as a ``--set`` of each leaf would."""
    out: list[tuple[str, Any]] = []
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.extend(_flatten(v, key))
        else:
            out.append((key, v))
    return out


def read_family(path: Path, file_entries: set[str]) -> Family:
    """Parse and check one family file against the zoo's file entries (names without ``.toml``)."""
    f = str(path)
    try:
        blob = path.read_bytes()
        data = tomllib.loads(blob.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"not a readable TOML file ({e})", file=f) from None
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown key; allowed here: {', '.join(sorted(_KEYS))}", file=f, field=unknown[0])
    for key in ("from", "to"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ConfigError("required: the name prefix of a chain (a string)", file=f, field=key)
    source, target = data["from"], data["to"]
    if target == source:
        raise ConfigError("must differ from 'from'", file=f, field="to")
    chain = sorted(n[len(source) + 1:] for n in file_entries if n.startswith(source + "_"))
    if not chain:
        raise ConfigError(f"no zoo entry named {source}_*; 'from' names the prefix of existing file entries",
                          file=f, field="from")
    entries = data.get("entries")
    if entries is None:
        suffixes = chain
    else:
        if not isinstance(entries, list) or not entries or not all(isinstance(s, str) and s for s in entries):
            raise ConfigError("expected a non-empty list of entry suffixes (e.g. ['nis_0_prune', 'team'])",
                              file=f, field="entries")
        missing = [s for s in entries if s not in chain]
        if missing:
            raise ConfigError(f"no file entry {source}_{missing[0]}; known suffixes: {', '.join(chain)}",
                              file=f, field="entries")
        suffixes = list(dict.fromkeys(entries))
    copied = _read_copies(data.get("copies", {}), chain, suffixes, source, f)
    suffixes += list(copied)
    for key in ("tags", "tags_drop"):
        v = data.get(key, [])
        if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
            raise ConfigError("expected a list of strings", file=f, field=key)
    desc = data.get("description", "")
    if not isinstance(desc, str):
        raise ConfigError("expected a string", file=f, field="description")
    repl = data.get("description_replace", {})
    if not isinstance(repl, dict) or not all(isinstance(v, str) for v in repl.values()):
        raise ConfigError("expected a table of 'text in the source description' = 'replacement'", file=f,
                          field="description_replace")
    over = data.get("set", {})
    if not isinstance(over, dict):
        raise ConfigError("expected a table of dotted keys -> values (as --set key=value)", file=f, field="set")
    per = data.get("set_for", {})
    if not isinstance(per, dict) or not all(isinstance(v, dict) for v in per.values()):
        raise ConfigError("expected tables [set_for.'<suffix pattern>'] of dotted keys -> values",
                          file=f, field="set_for")
    overrides_for = []
    for pat, table in per.items():
        if not any(matches(s, pat) for s in suffixes):
            raise ConfigError(f"pattern matches no member; members: {', '.join(suffixes)}", file=f,
                              field=f"set_for.{pat}")
        overrides_for += [(pat, k, v) for k, v in _flatten(table)]
    return Family(file=path, sha256=hashlib.sha256(blob).hexdigest(), source=source, target=target,
                  suffixes=suffixes, description=desc, description_replace=dict(repl),
                  tags=list(data.get("tags", [])), tags_drop=list(data.get("tags_drop", [])),
                  overrides=_flatten(over), overrides_for=overrides_for, copied=copied)


def _in_group(suffix: str, group: str) -> bool:
    return suffix == group or suffix.startswith(group + "_")


def _read_copies(table: Any, chain: list[str], members: list[str], source: str,
                 f: str) -> dict[str, tuple[str, str, str]]:
    """``copies = { nis_3 = "nis_2" }``: for each source suffix of group ``nis_2`` (``nis_2``,
    ``nis_2_prune``) a member of group ``nis_3`` (``nis_3``, ``nis_3_prune``) derived from it."""
    if not isinstance(table, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                              for k, v in table.items()):
        raise ConfigError("expected a table of new group = 'source group' (e.g. { nis_3 = 'nis_2' })",
                          file=f, field="copies")
    out: dict[str, tuple[str, str, str]] = {}
    taken = set(members)
    for new, old in table.items():
        group = [s for s in chain if _in_group(s, old)]
        if not group:
            raise ConfigError(f"no file entry {source}_{old} or {source}_{old}_*; known suffixes: "
                              f"{', '.join(chain)}", file=f, field=f"copies.{new}")
        for src in group:
            suffix = new + src[len(old):]
            if suffix in taken:
                raise ConfigError(f"the copy {suffix!r} is also a member of this family; name another group",
                                  file=f, field=f"copies.{new}")
            taken.add(suffix)
            out[suffix] = (src, new, old)
    return out


# directory -> (what the index was built from, the index): listing the zoo resolves every derived entry,
# and re-reading every family file for each of them made that several seconds slower
_CACHE: dict[Path, tuple[Any, dict[str, tuple[Family, str]]]] = {}


def index(directory: Path) -> dict[str, tuple[Family, str]]:
    """Every derived entry of the family files in ``directory``: name -> (family, member suffix).
    A derived name that is also a file entry, or that two families derive, is refused. Cached until a
    family file or the folder's list of files changes (their modification times and sizes: resolving
    each of a thousand entries must not re-read every family file). Paths are absolute (the cache
    outlives a chdir)."""
    directory = directory.resolve()
    files = sorted(directory.glob(f"*{SUFFIX}"))
    if not files:
        return {}
    try:
        stats = [(p.name, p.stat()) for p in files]
        key = (directory.stat().st_mtime_ns, tuple((n, st.st_mtime_ns, st.st_size) for n, st in stats))
    except OSError:
        key = None  # read_family names the unreadable file
    hit = _CACHE.get(directory)
    if key is not None and hit is not None and hit[0] == key:
        return hit[1]
    file_entries = {p.stem for p in directory.glob("*.toml") if not is_family_file(p)}
    out: dict[str, tuple[Family, str]] = {}
    for path in files:
        fam = read_family(path, file_entries)
        for s in fam.suffixes:
            name = f"{fam.target}_{s}"
            if name in file_entries:
                raise ConfigError(f"derives {name!r}, which is also a file entry ({directory / (name + '.toml')}); "
                                  "rename one", file=str(path), field="to")
            if name in out:
                raise ConfigError(f"derives {name!r}, which {out[name][0].file.name} derives too", file=str(path),
                                  field="to")
            out[name] = (fam, s)
    _CACHE[directory] = (key, out)
    return out


def rename_refs(value: Any, mapping: dict[str, str]) -> Any:
    """Every string equal to a member's source name (``extends``, ``train.init_from``,
    ``train.params.dense_from``, ``train.params.team`` items, ...) -> the derived name, so the derived
    chain points at itself; names outside the family (a shared AT base) are kept."""
    if isinstance(value, str):
        return mapping.get(value, value)
    if isinstance(value, list):
        return [rename_refs(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: rename_refs(v, mapping) for k, v in value.items()}
    return value
