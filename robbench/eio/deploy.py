"""Random-path deployment of a trained random gated network (Ensemble-in-One §3.4: "deploy the entire
RGN, then in inference stage, the gates throughout the network will be randomly selected to process an
input ... the accuracy is unstable owing to the dynamic choice of inference path, where the fluctuation
reaches 1-2 percentage").

A loaded RGN run is already the randomized model (``randomized = True``; the protocols attack it with
EOT). :func:`random_path_accuracy` measures the fluctuation: clean accuracy over independent draws.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from robbench.eio.rgn import GateMode, path_draw_accuracy


def random_path_accuracy(entry: str, runs_dir: str | Path | None = None, *, draws: int = 10, seed: int = 0,
                         mode: GateMode = "per_input", split: str = "test", data_root: str | Path | None = None,
                         device: str | None = None, limit: int | None = None) -> dict[str, Any]:
    """Clean accuracy of the trained RGN ``entry`` under ``draws`` seeded random-path draws (a new path
    per input, or per forward call). Returns mean, std (population), per-draw accuracies and the setup."""
    from robbench.checkpoint import WEIGHTS, RunDir, entry_from_manifest, load_trained
    from robbench.data import load_split

    model, manifest = load_trained(entry, runs_dir, device)
    e = entry_from_manifest(manifest, str(RunDir(runs_dir, entry).manifest_path))
    data = load_split(e.data.dataset, split, e.data.root or data_root, e.data.options)
    n = len(data) if limit is None else min(limit, len(data))
    x, y = data.get(list(range(n)))
    dev = next(model.parameters()).device
    out = path_draw_accuracy(model, x.to(dev), y.to(dev), draws=draws, seed=seed, mode=mode)
    out.update({"entry": entry, "split": split, "samples": n,
                "checkpoint_sha256": manifest["files"].get(WEIGHTS)})
    return out
