"""DVERGE's released black-box transfer sets (``transfer_adv_examples/``) into robbench's transfer-set cache,
so ``dverge-blackbox`` runs on the authors' exact adversarial examples.

Reference layout (zjysteven/DVERGE ``eval/eval_bbox.py``; notes: dverge-reference-code.md §4):
``eps_<e>/from_<surrogate><N>_<loss>_<attack>_steps_100[_<start>]/{inputs.pt, labels.pt}`` with
``inputs.pt`` N×3×32×32 in [0, 1] and ``labels.pt`` N, loss ``xent`` | ``cw``, attack ``mpgd`` (starts 0, 1,
2), ``mdi2_0.5``, ``sgm_0.2``; an optional ``clean/``. Each surrogate (``baseline3``, ``baseline5``,
``baseline8``) becomes a source named ``<name>_<surrogate>``; its sets are stored under the attack ids of
``protocols/dverge-blackbox.toml`` (``mpgd-ce-0`` ... ``sgm-cw``) and listed in
``<cache>/transfer/released/<source>.json``, which the engine reads instead of loading a source model.

The files hold no sample ids. The reference draws its 1000 test samples with ``random.seed(0);
random.sample(range(10000), 1000)`` (eval scripts), so the sets are taken to be those samples in that
order; the import checks every set's labels against the dataset's labels at those ids and refuses
the folder when they differ. Files are read with ``weights_only=True`` (a pickle with code is refused).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from robbench.checkpoint import file_sha256, load_state_dict_file
from robbench.data import get_info, load_split
from robbench.data.subsets import make_subset
from robbench.errors import DataError
from robbench.evaluate import transfer

FOLDER = re.compile(r"from_(?P<source>[a-z]+\d+)_(?P<loss>xent|cw)_(?P<attack>mpgd|mdi2_0\.5|sgm_0\.2)_steps_100"
                    r"(?:_(?P<start>\d+))?")
LOSSES = {"xent": "ce", "cw": "cw"}


def attack_id(loss: str, attack: str, start: str | None) -> str:
    """The dverge-blackbox.toml attack id of a reference folder's (loss, attack, start)."""
    l = LOSSES[loss]
    if attack == "mpgd":
        return f"mpgd-{l}-{start or 0}"
    return f"{attack.split('_')[0]}-{l}"


@dataclass
class TransferImport:
    sources: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # source -> id -> eps -> key
    n: int = 0
    dataset: str = ""

    def summary(self) -> str:
        count = sum(len(v) for ids in self.sources.values() for v in ids.values())
        names = sorted(self.sources)
        return (f"imported {count} transfer sets of {self.n} {self.dataset} samples as sources {', '.join(names)}; "
                "evaluate with: robbench evaluate --protocol dverge-blackbox --set 'sources=["
                + ", ".join(f'"{n}"' for n in names) + "]'")


def _tensor(path: Path) -> torch.Tensor:
    found = load_state_dict_file(path)  # weights_only=True; a lone tensor comes back under the key ""
    if list(found) != [""]:
        raise DataError(f"expected one tensor, found a dict of {len(found)}", file=str(path))
    return found[""].cpu()


def import_dverge_transfer(folder: str | Path, name: str, *, dataset: str = "cifar10",
                           cache_root: str | Path | None = None, data_root: str | Path | None = None) -> TransferImport:
    """Check every set of ``folder`` and write them into the cache (nothing is written before all pass)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("not a folder (expected transfer_adv_examples/ with eps_<e>/from_<...>/ inside)", file=str(folder))
    found: list[tuple[float, str, str, Path]] = []
    for eps_dir in sorted(folder.glob("eps_*")):
        try:
            eps = float(eps_dir.name[len("eps_"):])
        except ValueError:
            raise DataError("expected eps_<number>", file=str(eps_dir)) from None
        for d in sorted(p for p in eps_dir.iterdir() if p.is_dir()):
            m = FOLDER.fullmatch(d.name)
            if m is None:
                raise DataError("not a DVERGE transfer folder name (from_<surrogate><N>_<xent|cw>_<mpgd|mdi2_0.5|"
                                "sgm_0.2>_steps_100[_<start>])", file=str(d))
            found.append((eps, m.group("source"), attack_id(m.group("loss"), m.group("attack"), m.group("start")), d))
    if not found:
        raise DataError("no eps_<e>/from_<...>/ folders", file=str(folder))
    info = get_info(dataset)
    tensors: list[tuple[float, str, str, Path, torch.Tensor, torch.Tensor]] = []
    n = None
    for eps, src, aid, d in found:
        x, y = _tensor(d / "inputs.pt"), _tensor(d / "labels.pt")
        shape = (info.in_channels, info.image_size, info.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != shape or len(y) != len(x):
            raise DataError(f"inputs {tuple(x.shape)} / labels {tuple(y.shape)}: expected N×{'×'.join(map(str, shape))} "
                            f"{dataset} images and N labels", file=str(d))
        if float(x.min()) < 0.0 or float(x.max()) > 1.0:
            raise DataError(f"inputs outside [0, 1] (min {float(x.min()):.3g}, max {float(x.max()):.3g})", file=str(d / "inputs.pt"))
        if n is None:
            n = len(x)
        elif len(x) != n:
            raise DataError(f"{len(x)} samples; the other sets have {n}", file=str(d))
        tensors.append((eps, src, aid, d, x.float(), y.to(torch.int64)))
    assert n is not None
    info_size = info.test_size
    ids = list(make_subset("dverge", dataset, "test", n, 0, size=info_size).indices)
    data = load_split(dataset, "test", data_root, {})
    _, labels = data.get(ids)
    for eps, src, aid, d, x, y in tensors:
        if not torch.equal(y, labels.cpu().to(torch.int64)):
            bad = int((y != labels.cpu()).sum())
            raise DataError(f"labels differ from the {dataset} test labels at the DVERGE seed-0 sample ids in {bad} of "
                            f"{n} rows: these sets were drawn from other samples", file=str(d / "labels.pt"))
    out = TransferImport(n=n, dataset=dataset)
    for eps, src, aid, d, x, y in tensors:
        source = f"{name}_{src}"
        digest = hashlib.sha256((file_sha256(d / "inputs.pt") + file_sha256(d / "labels.pt")).encode()).hexdigest()
        fields = transfer.set_fields(source=source, source_sha256=f"released:{digest}", attack="released",
                                     params={"folder": f"{d.parent.name}/{d.name}"}, norm="linf", eps=eps,
                                     dataset=dataset, split="test", sample_ids=ids, seed=0)
        key = transfer.publish_set(fields, x, y, ids, torch.zeros(n, dtype=torch.uint8), root=cache_root,
                                   extra={"origin": "imported", "source_correct": "unknown (released files)",
                                          "imported_from": str(d.resolve())})
        out.sources.setdefault(source, {}).setdefault(aid, {})[transfer.eps_label(eps)] = key
    for source, sets in out.sources.items():
        transfer.write_released_index(source, {
            "source": source, "dataset": dataset, "split": "test", "n": n, "folder": str(folder.resolve()),
            "sample_ids": "dverge seed 0 (random.seed(0); random.sample(range(test size), n)); labels checked",
            "sets": sets}, cache_root)
    return out
