"""``robbench derive``: roll single paths out of a trained random gated network as ordinary runs.

Ensemble-in-One §3.4: "By sampling a random path and eliminating the other redundant modules, an
individual model can be rolled out. We can also sample multiple paths and derive multiple models to
combine as an ensemble ... the derived models can be slightly finetuned with small learning rate".
The released ``derive_one_path.py`` exports one random path with no selection criterion.

``ENTRY`` is either
- the RGN entry itself (``model.transform = 'rgn'``): writes the derived paths only, or
- a fine-tuning entry (a plain architecture whose ``train.init_from`` names the RGN run, e.g.
  ``zoo/eio_resnet20_ft40``): writes the derived paths, then fine-tunes each with that entry's
  training spec as a run of its own.

Run names (the report groups them by these; Appendix A.1 / A.4 stability = ``--count 8``):
``<rgn>_path<i>`` (i = 0..K-1, paths drawn from a generator seeded with ``--seed``; ``<rgn>_seed<s>_path<i>``
when the seed is not 0), ``<rgn>_path-<gates>`` for an explicit ``--path``, ``<rgn>[_seed<s>]_ens<K>`` for
the K-member ensemble of the derived paths; fine-tuned runs replace ``<rgn>`` by the fine-tuning entry's
name (``<ft>_path<i>``, ``<ft>_ens<K>``, the latter assembled from the K fine-tuned members).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from robbench.checkpoint import WEIGHTS, RunDir, entry_from_manifest, load_trained
from robbench.config import ZooEntry, load_entry, to_dict
from robbench.data.base import seeded_generator
from robbench.data import get_info
from robbench.eio.rgn import Path as GatePath
from robbench.eio.rgn import RandomGatedNetwork, find_rgn
from robbench.errors import CheckpointError, ConfigError


def parse_path_arg(text: str) -> GatePath | None:
    """'random' -> None; '0,1,1,0,...' -> the gate tuple."""
    t = text.strip()
    if t == "random":
        return None
    try:
        return tuple(int(g) for g in t.split(",") if g.strip() != "")
    except ValueError:
        raise ConfigError(f"got {text!r}; allowed: 'random' or comma-separated gate indices (e.g. 0,1,0,...)",
                          field="--path") from None


def draw_paths(rgn: RandomGatedNetwork, count: int, seed: int) -> list[GatePath]:
    """``count`` distinct uniform paths from a generator seeded with ``seed`` (same seed, same paths)."""
    if count < 1:
        raise ConfigError(f"got {count}; allowed: 1 or more", field="--count")
    total = rgn.n ** rgn.num_gates
    if count > total:
        raise ConfigError(f"got {count}; the network has only {total} paths", field="--count")
    gen = seeded_generator("eio-derive", seed)
    out: list[GatePath] = []
    while len(out) < count:
        p = rgn.sample_path(gen)
        if p not in out:
            out.append(p)
    return out


def path_tag(path: Sequence[int]) -> str:
    sep = "" if max(path, default=0) < 10 else "."
    return sep.join(str(g) for g in path)


def plain_entry(src: ZooEntry, name: str, members: int, init_from: str, description: str) -> ZooEntry:
    """The source entry with the transform removed: ``members`` plain networks of the same architecture."""
    model = dataclasses.replace(src.model, members=members, transform=None, transform_options={})
    train = dataclasses.replace(src.train, epochs=0, init_from=init_from)
    tags = sorted((set(src.tags) - {"rgn", "pretrain"}) | {"eio-derived"})  # a plain model now
    return dataclasses.replace(src, name=name, model=model, train=train, tags=tags, description=description,
                               overrides=[])


def write_derived(rgn: RandomGatedNetwork, src: ZooEntry, source_run: str, paths: list[GatePath], names: list[str],
                  runs_dir: str | Path | None, extra: dict[str, Any]) -> None:
    """One run per name: a single path, or (len(paths) > 1) an ensemble of the paths as members."""
    from robbench.models import build_model

    for name, group in zip(names, _groups(paths, names)):
        entry = plain_entry(src, name, len(group), source_run,
                            f"Ensemble-in-One: {'ensemble of ' if len(group) > 1 else ''}path(s) "
                            f"{'; '.join(path_tag(p) for p in group)} of {source_run} (not fine-tuned)")
        run, run_extra = RunDir(runs_dir, name), {**extra, "eio_paths": [list(p) for p in group]}
        if run.exists():  # the same paths of the same RGN weights: already written, keep it untouched
            m = run.read_manifest()
            old = m.get("extra") or {}
            if m["status"] == "complete" and m["entry_sha256"] == entry.sha256() and all(
                    old.get(k) == run_extra[k] for k in ("derived_from_sha256", "eio_paths")):
                continue
        model = build_model(entry, get_info(entry.data.dataset, entry.data.options))
        for member, p in zip(model.members, group):
            member.load_state_dict(rgn.derive_state_dict(p), strict=True)
        run.save_final(model, entry, extra=run_extra, epochs_done=0)


def _groups(paths: list[GatePath], names: list[str]) -> list[list[GatePath]]:
    # names = one per path, then (optionally) one more for the ensemble of all paths
    groups = [[p] for p in paths]
    if len(names) > len(paths):
        groups.append(list(paths))
    return groups


def _run_names(base: str, paths: list[GatePath], explicit: bool, seed: int) -> list[str]:
    if explicit:
        return [f"{base}_path-{path_tag(paths[0])}"]
    stem = base if seed == 0 else f"{base}_seed{seed}"
    names = [f"{stem}_path{i}" for i in range(len(paths))]
    if len(paths) > 1:
        names.append(f"{stem}_ens{len(paths)}")
    return names


def _check_same_architecture(ft: ZooEntry, src: ZooEntry) -> None:
    a = to_dict(dataclasses.replace(ft.model, members=1, combine="log_mean_softmax"))
    b = to_dict(dataclasses.replace(src.model, members=1, combine="log_mean_softmax", transform=None,
                                    transform_options={}))
    for key in a:
        if a[key] != b[key]:
            raise ConfigError(f"is {a[key]!r} but the random gated network {src.name!r} was built with {b[key]!r}; "
                              "a fine-tuning entry must use the RGN's architecture", file=ft.source,
                              field=f"model.{key}")
    if ft.data.dataset != src.data.dataset:
        raise ConfigError(f"is {ft.data.dataset!r} but {src.name!r} was trained on {src.data.dataset!r}",
                          file=ft.source, field="data.dataset")


def derive_paths(entry: str, path: str = "random", count: int = 1, seed: int = 0, device: str | None = None,
                 runs_dir: str | Path | None = None, data_root: str | Path | None = None,
                 fresh: bool = False, memory_format: str = "auto") -> list[str]:
    """Derive ``count`` paths (or the explicit ``path``) of a trained RGN as runs; returns the run names
    written (fine-tuned ones last). See the module docstring for names and fine-tuning."""
    e = load_entry(entry)
    if e.model.transform == "rgn":
        source, finetune = e.name, None
    elif e.train.init_from:
        source, finetune = e.train.init_from, e
    else:
        raise ConfigError("derive needs an Ensemble-in-One entry (model.transform = 'rgn') or a fine-tuning entry "
                          "whose train.init_from names one", file=e.source, field="model.transform")
    model, manifest = load_trained(source, runs_dir, device="cpu")
    src = entry_from_manifest(manifest, str(RunDir(runs_dir, source).manifest_path))
    if src.model.transform != "rgn":
        raise ConfigError(f"names {source!r}, which is not a random gated network (model.transform = "
                          f"{src.model.transform!r}); allowed: an entry with model.transform = 'rgn'",
                          file=e.source, field="train.init_from")
    if finetune is not None:
        _check_same_architecture(finetune, src)
    rgn = find_rgn(model)
    explicit = parse_path_arg(path)
    if explicit is not None:
        if count != 1:
            raise ConfigError(f"got {count} with an explicit --path; allowed: 1 (or --path random)", field="--count")
        paths = [rgn.check_path(explicit)]
    else:
        paths = draw_paths(rgn, count, seed)
    extra = {"derived_from": source, "derived_from_sha256": manifest["files"].get(WEIGHTS),
             "derive_seed": None if explicit is not None else seed}
    names = _run_names(source, paths, explicit is not None, seed)
    write_derived(rgn, src, source, paths, names, runs_dir, extra)
    for name, p in zip(names, paths):
        print(f"{name}: path {path_tag(p)} of {source}", file=sys.stderr)
    if len(names) > len(paths):
        print(f"{names[-1]}: ensemble of the {len(paths)} paths", file=sys.stderr)
    if finetune is None:
        return names
    return names + finetune_derived(finetune, names[:len(paths)], paths, explicit is not None, seed, device,
                                    runs_dir, data_root, fresh, memory_format)


def finetune_derived(ft: ZooEntry, derived: list[str], paths: list[GatePath], explicit: bool, seed: int,
                     device: str | None, runs_dir: str | Path | None, data_root: str | Path | None,
                     fresh: bool = False, memory_format: str = "auto") -> list[str]:
    """Fine-tune each derived path with ``ft``'s training spec (a run per path, resumable like any
    training), then assemble the K fine-tuned members into one ensemble run."""
    from robbench.models import build_model
    from robbench.train.run import train_entry

    names = _run_names(ft.name, paths, explicit, seed)
    for name, src_run in zip(names, derived):
        # a tuned run started from older derived weights (the RGN was retrained) is stale: train_entry
        # refuses it, or with ``fresh`` moves it aside
        train_entry(ft.source, overrides=[*ft.overrides, f"name={name}", f"train.init_from={src_run}"],
                    device=device, runs_dir=runs_dir, data_root=data_root, fresh=fresh, memory_format=memory_format)
    if len(names) > len(paths):
        ens_name = names[-1]
        members = []
        for name in names[:len(paths)]:
            m, _ = load_trained(name, runs_dir, device="cpu")
            members.append(m.members[0])
        entry = dataclasses.replace(ft, name=ens_name, model=dataclasses.replace(ft.model, members=len(paths)),
                                    tags=sorted(set(ft.tags) | {"eio-derived"}), overrides=[],
                                    description=f"Ensemble-in-One: the {len(paths)} fine-tuned paths "
                                                f"{', '.join(names[:len(paths)])} as one ensemble")
        ens = build_model(entry, get_info(entry.data.dataset, entry.data.options))
        with torch.no_grad():
            for dst, m in zip(ens.members, members):
                dst.load_state_dict(m.state_dict(), strict=True)
        RunDir(runs_dir, ens_name).save_final(ens, entry, extra={"assembled_from": names[:len(paths)],
                                                                 "eio_paths": [list(p) for p in paths]})
    return names
