"""``python -m robbench.eed.select --pool PREFIX``: RD team selection over the 12 pool entries
``PREFIX_{nis,erm,ase,bnsf}_{0,1,2}`` from the results store (their PGD-20 outcomes), written as JSON
with every team's RD, the threshold and the choice; prints the lines to put in the team entry."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from robbench.eed.diversity import RD_THRESHOLD

SCORES = ("nis", "erm", "ase", "bnsf")


def pool_entries(prefix: str, scores: Sequence[str] = SCORES, subsets: Sequence[int] = (0, 1, 2)) -> list[str]:
    return [f"{prefix}_{s}_{m}" for s in scores for m in subsets]


def main(argv: list[str] | None = None) -> int:
    from robbench.eed.pool import select_from_store, selection_path, write_selection
    from robbench.paths import results_db

    ap = argparse.ArgumentParser(prog="python -m robbench.eed.select", description=__doc__)
    ap.add_argument("--pool", required=True, help="entry prefix, e.g. demo_eed or eed_resnet18_cifar10")
    ap.add_argument("--db", default=None, help="results store (default: $ROBBENCH_DB or results/robbench.db)")
    ap.add_argument("--attack", default="pgd20", help="attack id in the store (eed-suite: pgd20)")
    ap.add_argument("--protocol", default=None)
    ap.add_argument("--threshold", type=float, default=RD_THRESHOLD, help="RD threshold (EED §5.1: 0.7)")
    ap.add_argument("--out", default=None, help="JSON path (default: <pool>_selection.json beside the store)")
    a = ap.parse_args(argv)
    names = pool_entries(a.pool)
    db = a.db or results_db()
    if not Path(db).is_file():  # opening a Store would create an empty one
        print(f"error: {db}: no results store; evaluate the pool first: robbench evaluate --protocol "
              f"{a.protocol or 'eed-suite'} {' '.join(names)}", file=sys.stderr)
        return 2
    try:
        sel = select_from_store(db, names, a.attack, a.threshold, a.protocol)
    except LookupError as e:
        print(f"error: {e}; evaluate the pool first: robbench evaluate --protocol {a.protocol or 'eed-suite'} "
              f"{' '.join(names)}", file=sys.stderr)
        return 2
    out = write_selection(a.out or selection_path(db, a.pool), sel,
                          {"pool": names, "attack": a.attack, "protocol": a.protocol})
    print(f"{len(sel.teams)} teams scored; chose {sel.members} (RD {sel.rd:.3f}, threshold {sel.threshold}, "
          f"{'met' if sel.threshold_met else 'NOT met'}) -> {out}")
    print(f"model.options.size = {len(sel.members)}\ntrain.params.team = {sel.members!r}".replace("'", '"'))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
