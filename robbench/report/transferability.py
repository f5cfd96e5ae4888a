"""Within-ensemble transferability as text, in the unit of the heatmaps: attack success rate (%) of
examples crafted on member i (rows) against member j and the whole ensemble (columns). For command-line
summaries, so the CLI, the markdown, the CSV/JSON and the figures show one number in one unit."""
from __future__ import annotations

import numpy as np
import pandas as pd

from robbench.store import transfer_matrix

UNIT_HEADER = "attack success rate (%): rows = source member i, columns = target member j, ensemble"


def success_matrices(outcomes: pd.DataFrame) -> list[tuple[str, float, pd.DataFrame]]:
    """(attack id, eps, N x (N+1) success rates in [0, 1]) for every attack crafted on members."""
    d = outcomes[outcomes["source_member"] >= 0] if "source_member" in outcomes.columns else outcomes.iloc[:0]
    out = []
    for attack in sorted(set(d["attack"])):
        for eps in sorted(set(np.round(d.loc[d["attack"] == attack, "eps"].astype(float), 10))):
            out.append((attack, float(eps), transfer_matrix(d, attack, eps=eps, value="success")))
    return out


def success_lines(outcomes: pd.DataFrame) -> list[str]:
    """The matrices as aligned text lines (empty when the run has no transferability rows)."""
    lines: list[str] = []
    for attack, eps, m in success_matrices(outcomes):
        lines += [f"{attack} at eps {eps:g}, {UNIT_HEADER}",
                  f"{'source':>8s} " + " ".join(f"{str(c):>9s}" for c in m.columns)]
        for i in m.index:
            lines.append(f"{int(i):>8d} " + " ".join(
                f"{'':>9s}" if pd.isna(v) else f"{100 * float(v):8.1f}%" for v in m.loc[i]))
    return lines
