"""Sections with budgets: one failure never loses the rest, and the clock never runs past the budget.

Every section is a function ``fn(sec) -> dict`` run inside its own ``try``; its record in the results is
``{"status", "seconds", "budget_s", "data"}`` with status

- ``ok``;
- ``failed: <last lines of the traceback>`` (an exception), or ``failed: tolerance: <checks>`` (it ran,
  and a correctness check exceeded its stated tolerance: the section's ``failed_checks``);
- ``skipped: <reason>`` (not selected, no CUDA, a missing package, the overall budget spent).

A section gets ``min(its budget, what is left overall)``; loops inside check ``sec.left()``. Sections run
in the main thread, so one that overruns cannot be interrupted: a watchdog thread writes the files with
the running section marked failed and ends the process ``GRACE_S`` seconds after the overall budget.
Results are written (JSON + markdown) after every section, atomically.
"""
from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

GRACE_S = 45.0        # the watchdog's slack past the overall budget
MIN_START_S = 3.0     # a section is not started with less than this left overall
TRACEBACK_LINES = 12  # lines of a traceback kept in a 'failed:' status


def traceback_tail(exc: BaseException, lines: int = TRACEBACK_LINES) -> str:
    """``Type: message`` on the first line, then the last ``lines`` lines of the traceback."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    head = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip()
    return head + "\n" + "\n".join(text.splitlines()[-lines:])


def missing_modules(names: tuple[str, ...] | list[str]) -> list[str]:
    """The import names among ``names`` that cannot be imported here (not installed)."""
    out = []
    for n in names:
        try:
            if importlib.util.find_spec(n) is None:
                out.append(n)
        except (ImportError, ValueError):
            out.append(n)
    return out


@dataclass
class Section:
    """What a section function sees: its deadline, the run's options, and the results so far."""

    name: str
    deadline: float
    options: Any
    results: dict[str, Any]
    budget_total: float = 0.0  # the seconds this section was given
    failed_checks: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def data(self, name: str) -> dict[str, Any]:
        """Another section's data ({} when it did not run or failed)."""
        rec = self.results["sections"].get(name) or {}
        return rec.get("data") or {}

    def check(self, name: str, ok: bool) -> bool:
        """Record a correctness check's verdict; a False one fails the section (after it finishes)."""
        if not ok:
            self.failed_checks.append(name)
        return ok


class Runner:
    def __init__(self, out_dir: Path, budget_s: float, options: Any,
                 write: Callable[[Path, dict[str, Any]], None], min_start_s: float = MIN_START_S) -> None:
        self.out_dir = out_dir
        self.min_start_s = min_start_s
        self.options = options
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.budget_s = budget_s
        self._write_fn = write
        self._lock = threading.Lock()
        self._current: str | None = None
        self.results: dict[str, Any] = {"meta": {"budget_s": budget_s}, "sections": {}}
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, daemon=True)
        self._watchdog.start()

    def close(self) -> None:
        """Stop the watchdog (the run is over; a process that goes on must not be ended by it)."""
        self._closed.set()
        self._watchdog.join(timeout=5)

    # -- files ----------------------------------------------------------------------------------
    def write(self) -> None:
        with self._lock:
            self.results["meta"]["elapsed_s"] = round(time.monotonic() - self.t0, 2)
            try:
                self._write_fn(self.out_dir, self.results)
            except Exception as e:  # a section's odd value must not stop the run; say so in the JSON
                self.results["meta"]["write_error"] = traceback_tail(e, 4)
                self._write_fn(self.out_dir, json.loads(json.dumps(self.results, default=str)))

    def _watch(self) -> None:
        while not self._closed.wait(1.0):
            if time.monotonic() > self.deadline + GRACE_S:
                name = self._current
                if name is not None:
                    self.results["sections"][name] = {
                        "status": f"failed: still running {GRACE_S:.0f} s past the overall budget; the process "
                                  "was ended by the watchdog", "seconds": None, "data": {}}
                self.results["meta"]["ended_by_watchdog"] = True
                try:
                    self.write()
                finally:
                    os._exit(3)

    # -- sections -------------------------------------------------------------------------------
    def run(self, name: str, fn: Callable[[Section], dict[str, Any] | None], budget_s: float, *,
            selected: bool = True, cuda_only: bool = False, has_cuda: bool = True,
            needs: tuple[str, ...] = ()) -> dict[str, Any]:
        reason = None
        left = self.deadline - time.monotonic()
        if not selected:
            reason = "skipped: not selected (--sections)"
        elif cuda_only and not has_cuda:
            reason = "skipped: no CUDA"
        elif (miss := missing_modules(needs)):
            reason = f"skipped: needs {', '.join(miss)} (not installed here)"
        elif left < self.min_start_s:
            reason = f"skipped: overall budget spent ({self.budget_s:.0f} s)"
        if reason is not None:
            rec = {"status": reason, "seconds": 0.0, "budget_s": budget_s, "data": {}}
            self.results["sections"][name] = rec
            self.write()
            return rec
        given = min(budget_s, left)
        sec = Section(name, time.monotonic() + given, self.options, self.results, given)
        self._current = name
        t = time.monotonic()
        data: dict[str, Any] = {}
        try:
            data = fn(sec) or {}
            status = "ok"
            if sec.failed_checks:
                status = "failed: tolerance: " + ", ".join(sec.failed_checks)
        except Exception as e:  # every section is isolated: record it and go on
            status = "failed: " + traceback_tail(e)
        seconds = time.monotonic() - t
        if seconds > given + 1.0:
            data = dict(data, overran_budget_by_s=round(seconds - given, 1))
        rec = {"status": status, "seconds": round(seconds, 2), "budget_s": round(given, 1), "data": data}
        self._current = None
        self.results["sections"][name] = rec
        self.write()
        print(f"[gpu-check] {name}: {status.splitlines()[0] if status else status} ({seconds:.1f} s)", flush=True)
        return rec
