"""Training views from ``runs/<entry>/log.jsonl``: curves of every logged accuracy and loss per epoch,
and seconds per epoch relative to the baseline beside DVERGE Table 1's ratios."""
from __future__ import annotations

from typing import Any

TIME_KEYS = ("epoch_time", "epoch_seconds", "seconds", "time_s", "time", "elapsed")


def numeric_series(log: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """key -> (epochs, values) for every numeric key of the per-epoch records (last record per epoch wins)."""
    by_epoch: dict[float, dict[str, Any]] = {}
    for i, rec in enumerate(log):
        ep = rec.get("epoch", i + 1)
        if isinstance(ep, (int, float)):
            by_epoch[float(ep)] = rec
    out: dict[str, tuple[list[float], list[float]]] = {}
    for ep in sorted(by_epoch):
        flat: dict[str, Any] = {}
        for k, v in by_epoch[ep].items():
            if isinstance(v, dict):  # the loop logs {"losses": {"ce": ...}}: one series per inner key
                flat.update({f"{k}/{ik}": iv for ik, iv in v.items()})
            else:
                flat[k] = v
        for k, v in sorted(flat.items()):
            if k == "epoch" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            xs, ys = out.setdefault(k, ([], []))
            xs.append(ep)
            ys.append(float(v))
    return out


def accuracy_keys(series: dict[str, Any]) -> list[str]:
    """Accuracy series, the whole model's first (``test_acc`` before ``member_test_acc/0``)."""
    return sorted((k for k in series if "acc" in k.lower()), key=lambda k: (k.count("/"), "member" in k, k))


def loss_keys(series: dict[str, Any]) -> list[str]:
    """Loss series, the total first (``losses/loss`` before ``losses/loss/0``)."""
    return sorted((k for k in series if "loss" in k.lower()), key=lambda k: (k.count("/"), k))


def seconds_per_epoch(log: list[dict[str, Any]]) -> float | None:
    """Mean logged time per epoch (the first time-like key present)."""
    series = numeric_series(log)
    for k in TIME_KEYS:
        if k in series and series[k][1]:
            ys = series[k][1]
            return sum(ys) / len(ys)
    return None
