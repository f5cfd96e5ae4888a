"""Black-box transfer sets: generated once from a source model, stored content-addressed, reused.

A set is the adversarial version of a list of samples crafted on one source (surrogate) model with one
attack configuration at one eps. Its key is the sha256 of the canonical JSON of everything that decides
its content (:func:`set_fields`): source checkpoint sha256, attack name and resolved options, norm, eps,
dataset, split, the sample-id list's sha256 and the seed. Layout (see ``docs/transfer-sets.md``)::

    <cache_dir>/transfer/<key>/adv.safetensors   x_adv float32 N×C×H×W in [0,1], labels int64 N,
                                                 sample_ids int64 N, source_correct uint8 N
    <cache_dir>/transfer/<key>/manifest.json     format, key, fields, file sha256, shapes, versions

Generation writes per-batch partial files under ``transfer/.partial/<group>/`` (a killed generation
resumes there) and publishes each finished set by renaming a complete temp directory, so a set directory
either does not exist or is complete. Loading checks the key, the file hash and the alignment of sample
ids and labels with what the caller expects.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save, save_file

from robbench import __version__
from robbench.data.subsets import indices_sha256
from robbench.errors import DataError
from robbench.paths import cache_dir
from robbench.schema import config_hash

FORMAT = "robbench-transfer-set"
FORMAT_VERSION = 1
TENSORS = "adv.safetensors"
MANIFEST = "manifest.json"


def set_fields(*, source: str, source_sha256: str, attack: str, params: dict[str, Any], norm: str,
               eps: float, dataset: str, split: str, sample_ids: Sequence[int], seed: int) -> dict[str, Any]:
    """Everything that decides a set's content (the key is the hash of this). ``source`` (the entry
    name) is informational only: the checkpoint hash identifies the model."""
    return {"source_sha256": source_sha256, "attack": attack, "params": params, "norm": norm,
            "eps": float(eps), "dataset": dataset, "split": split, "sample_ids_sha256": indices_sha256(sample_ids),
            "n": len(sample_ids), "seed": int(seed), "_source_name": source}


def set_key(fields: dict[str, Any]) -> str:
    return config_hash({k: v for k, v in fields.items() if not k.startswith("_")})


def transfer_root(root: str | Path | None = None) -> Path:
    return Path(root) if root is not None else cache_dir() / "transfer"


@dataclass
class TransferSet:
    key: str
    path: Path
    x_adv: torch.Tensor
    labels: torch.Tensor
    sample_ids: torch.Tensor
    source_correct: torch.Tensor
    manifest: dict[str, Any]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_set(key: str, *, root: str | Path | None = None, expect_ids: Sequence[int] | None = None,
             expect_labels: torch.Tensor | None = None) -> TransferSet:
    """Read and verify one set: key, file hash, tensor shapes, and sample/label alignment."""

    d = transfer_root(root) / key
    mf, tf = d / MANIFEST, d / TENSORS
    if not mf.is_file() or not tf.is_file():
        raise DataError("transfer set missing (manifest.json or adv.safetensors)", file=str(d))
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"corrupt manifest ({e})", file=str(mf)) from None
    if manifest.get("format") != FORMAT or manifest.get("key") != key:
        raise DataError(f"not the transfer set {key[:12]}... (format/key field differs)", file=str(mf), field="key")
    if set_key(manifest.get("fields", {})) != key:
        raise DataError("fields do not hash to the directory's key (edited or corrupt)", file=str(mf), field="fields")
    digest = _sha256_file(tf)
    if digest != manifest.get("sha256"):
        raise DataError(f"tensor file hash {digest[:12]}... does not match the manifest "
                        f"{str(manifest.get('sha256'))[:12]}... (corrupt or tampered)", file=str(tf))
    t = load_file(str(tf), device="cpu")
    x, labels, ids = t["x_adv"], t["labels"], t["sample_ids"]
    if not (len(x) == len(labels) == len(ids)):
        raise DataError(f"x_adv/labels/sample_ids lengths differ ({len(x)}, {len(labels)}, {len(ids)})", file=str(tf))
    if expect_ids is not None:
        exp = torch.as_tensor(list(expect_ids), dtype=torch.int64)
        if len(exp) != len(ids) or not torch.equal(exp, ids):
            raise DataError("sample ids are not aligned with the evaluation's samples", file=str(tf),
                            field="sample_ids")
    if expect_labels is not None:
        if not torch.equal(expect_labels.to(torch.int64).cpu(), labels):
            bad = int((expect_labels.cpu() != labels).sum())
            raise DataError(f"labels do not match the dataset's labels for these samples ({bad} differ)",
                            file=str(tf), field="labels")
    return TransferSet(key, d, x, labels, ids, t.get("source_correct", torch.zeros(0, dtype=torch.uint8)), manifest)


def exists(key: str, root: str | Path | None = None) -> bool:
    d = transfer_root(root) / key
    return (d / MANIFEST).is_file() and (d / TENSORS).is_file()


def _publish(root: Path, key: str, fields: dict[str, Any], tensors: dict[str, torch.Tensor],
             extra: dict[str, Any]) -> None:
    """Write a complete set into a temp dir, then rename it to ``<root>/<key>`` (atomic)."""


    final = root / key
    if final.exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=root))
    try:
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                    metadata={"format": FORMAT, "key": key})
        with open(tmp / TENSORS, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "key": key, "fields": fields,
            "sha256": hashlib.sha256(data).hexdigest(),
            "shape": list(tensors["x_adv"].shape), "dtype": str(tensors["x_adv"].dtype).replace("torch.", ""),
            "robbench_version": __version__, "torch_version": torch.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **extra,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():  # a concurrent writer published it first otherwise
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_set(fields: dict[str, Any], x_adv: torch.Tensor, labels: torch.Tensor, sample_ids: Sequence[int],
                source_correct: torch.Tensor, *, root: str | Path | None = None,
                extra: dict[str, Any] | None = None) -> str:
    """Write one complete set made elsewhere (e.g. a paper's released adversarial examples) under its key;
    returns the key. An existing set of that key is kept as it is."""
    key = set_key(fields)
    tensors = {"x_adv": x_adv.detach().float().cpu().contiguous(), "labels": labels.to(torch.int64).cpu(),
               "sample_ids": torch.as_tensor(list(sample_ids), dtype=torch.int64),
               "source_correct": source_correct.to(torch.uint8).cpu()}
    _publish(transfer_root(root), key, fields, tensors, dict(extra or {}))
    return key


RELEASED_DIR = "released"  # <root>/released/<source>.json: sets imported for a source that is not a model
RELEASED_FORMAT = "robbench-released-transfer-sets"


def eps_label(eps: float) -> str:
    return f"{float(eps):g}"


def released_index(source: str, root: str | Path | None = None) -> dict[str, Any] | None:
    """The index of released sets imported under ``source`` (``robbench convert dverge-transfer``), or None."""
    f = transfer_root(root) / RELEASED_DIR / f"{source}.json"
    if not f.is_file():
        return None
    try:
        index = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"corrupt released-set index ({e})", file=str(f)) from None
    if index.get("format") != RELEASED_FORMAT or not isinstance(index.get("sets"), dict):
        raise DataError(f"not a released-set index (format {index.get('format')!r})", file=str(f), field="format")
    return index


def write_released_index(source: str, index: dict[str, Any], root: str | Path | None = None) -> Path:
    d = transfer_root(root) / RELEASED_DIR
    d.mkdir(parents=True, exist_ok=True)
    f = d / f"{source}.json"
    tmp = d / f".{source}.json.tmp"
    tmp.write_text(json.dumps({"format": RELEASED_FORMAT, **index}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, f)
    return f


# A batch generator: (x, y, eps_per_sample) -> (x_adv, source_correct bool)
CraftFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def ensure_sets(fields_per_eps: dict[float, dict[str, Any]], *, sample_ids: Sequence[int],
                get_batch: Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor]], craft: CraftFn,
                batch_size: int, root: str | Path | None = None, progress: Callable[[int], None] | None = None,
                stats: dict[str, Any] | None = None, shard: tuple[int, int] = (0, 1),
                assemble: bool = True) -> dict[float, str]:
    """Make sure a set exists for each eps (generating the missing ones together); returns eps -> key.

    Missing eps values are crafted in one pass: each sample batch is repeated once per missing eps with
    a per-sample eps tensor. Every finished batch is saved under ``.partial/`` first, so a killed
    generation resumes at the next batch; ``stats['generated_batches']`` counts batches crafted here.
    ``shard=(rank, world)``: craft only batches ``b % world == rank`` (torchrun; the cache directory
    must be shared); ``assemble=False``: stop before publishing (rank 0 assembles after a barrier)."""

    root_p = transfer_root(root)
    keys = {e: set_key(f) for e, f in fields_per_eps.items()}
    missing = sorted(e for e, k in keys.items() if not exists(k, root_p))
    if not missing:
        return keys
    # partial batches depend on the batching, so it is part of the partial directory's name
    group = hashlib.sha256((",".join(keys[e] for e in missing) + f"|{batch_size}").encode()).hexdigest()[:32]
    part = root_p / ".partial" / group
    part.mkdir(parents=True, exist_ok=True)
    ids = [int(i) for i in sample_ids]
    nb = (len(ids) + batch_size - 1) // batch_size
    E = len(missing)
    rank, world = shard
    for b in range(nb):
        f = part / f"batch{b:06d}.safetensors"
        if f.is_file() or b % world != rank:
            continue
        bid = ids[b * batch_size:(b + 1) * batch_size]
        x, y = get_batch(bid)
        xr = x.repeat(E, *([1] * (x.dim() - 1)))
        yr = y.repeat(E)
        eps_t = torch.tensor(missing, dtype=torch.float32).repeat_interleave(len(bid)).to(x.device)
        x_adv, ok = craft(xr, yr, eps_t)
        tmpf = part / f".batch{b:06d}.tmp"
        save_file({"x_adv": x_adv.detach().float().cpu().contiguous(), "labels": yr.cpu().to(torch.int64),
                   "source_correct": ok.cpu().to(torch.uint8)}, str(tmpf))
        os.replace(tmpf, f)
        if stats is not None:
            stats["generated_batches"] = stats.get("generated_batches", 0) + 1
        if progress is not None:
            progress(len(bid))
    if not assemble:
        return keys
    # Assemble every missing eps from the partial batches and publish.
    lacking = [b for b in range(nb) if not (part / f"batch{b:06d}.safetensors").is_file()]
    if lacking:
        raise DataError(f"transfer set generation incomplete: {len(lacking)} batch(es) missing, e.g. {lacking[0]}",
                        file=str(part))
    chunks = [load_file(str(part / f"batch{b:06d}.safetensors")) for b in range(nb)]
    for j, e in enumerate(missing):
        xs, ls, oks = [], [], []
        for b, c in enumerate(chunks):
            m = len(ids[b * batch_size:(b + 1) * batch_size])
            xs.append(c["x_adv"][j * m:(j + 1) * m])
            ls.append(c["labels"][j * m:(j + 1) * m])
            oks.append(c["source_correct"][j * m:(j + 1) * m])
        tensors = {"x_adv": torch.cat(xs), "labels": torch.cat(ls),
                   "sample_ids": torch.tensor(ids, dtype=torch.int64), "source_correct": torch.cat(oks)}
        acc = float(tensors["source_correct"].float().mean()) if len(ids) else 0.0
        _publish(root_p, keys[e], fields_per_eps[e], tensors, {"source_accuracy": acc, "generated_with": {"batch_size": batch_size, "eps_batched": missing}})
    shutil.rmtree(part, ignore_errors=True)
    return keys
