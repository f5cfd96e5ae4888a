"""Run directories: final weights, manifest, resume state and log of one trained zoo entry.

``<runs_dir>/<entry>/`` holds
- ``model.safetensors``: the state dict of the whole :class:`~robbench.models.Ensemble` (keys
  ``members.0.…``), contiguous CPU tensors; safetensors cannot execute code on load.
- ``manifest.json``: entry name, resolved config and its sha256, overrides, ``files`` {name: sha256},
  library versions, seed, git commit, times, status ``training|complete``, epochs done, ``extra``.
- ``train_state.pt``: resume state (tensors and plain Python only), loaded with ``weights_only=True``.
- ``log.jsonl``: one JSON object per line (per epoch), appended by the training loop.

Every file is written through :func:`atomic_save` (temp file in the same directory, fsync, rename,
fsync of the directory), so a crash never leaves a partial file under a final name. Loading checks
every sha256 the manifest records and the architecture (keys and shapes) before any weight is used.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import pickle
import random
import re
import time
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import torch

from robbench.config import entry_exists
from robbench.errors import CheckpointError
from robbench.paths import PROJECT_ROOT, ZOO_DIR, ensure_dir, filesystem_error, runs_dir as default_runs_dir

if TYPE_CHECKING:  # only for hints; the models package imports torch modules we do not need here
    from torch import nn

    from robbench.config import ZooEntry

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.pt"
LOG = "log.jsonl"
MANIFEST_FORMAT = "robbench-run/1"
STALE_MARK = ".stale-"  # a run moved aside by `train --fresh`: <entry>.stale-<UTC time>
STATUSES = ("training", "complete")


# ----------------------------------------------------------------------------------------------
# Atomic files and hashes
# ----------------------------------------------------------------------------------------------

def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import (single threaded then): mkstemp creates 0600 files; final files get the usual mode.
_FILE_MODE = 0o666 & ~_current_umask()


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(path: str | Path, writer: Callable[[IO[bytes]], Any]) -> None:
    """Call ``writer(fh)`` on an open binary temp file beside ``path``, fsync it, then rename it to
    ``path``. If the writer raises (or the process dies) nothing is left under ``path``: an existing
    file stays as it was and a stray temp file ``.<name>.*.tmp`` is removed when possible. An OS
    refusal (read-only folder, a parent that is a file, a full disk) is a one-line :class:`UserError`."""
    path = Path(path)
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise filesystem_error(e, path.parent, f"write {path.name} in this folder") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise filesystem_error(e, path, "write the file") from None
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_save`)."""
    atomic_save(path, lambda fh: fh.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str | None]:
    """Versions that decide numerics (recorded in manifests and result runs)."""
    import platform
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "numpy": np.__version__}
    for dist in ("torchvision", "robbench", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["cuda"] = torch.version.cuda
    return out


def git_commit(root: Path = PROJECT_ROOT) -> tuple[str | None, bool | None]:
    """(HEAD commit, tracked files modified) of the project checkout; (None, None) when not a git
    checkout or git is missing. Never raises: provenance must not stop a run."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() or None, (bool(dirty.stdout.strip()) if dirty.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


# ----------------------------------------------------------------------------------------------
# RNG state in weights_only-safe form
# ----------------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Every global RNG state as tensors/ints/floats/None only, so ``torch.load(weights_only=True)``
    reads it back (numpy arrays and Python's tuple-of-625-ints become int64 tensors)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss},
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only when CUDA is present)."""
    torch.set_rng_state(state["torch"].cpu())
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda][: torch.cuda.device_count()])


# ----------------------------------------------------------------------------------------------
# State dict files
# ----------------------------------------------------------------------------------------------

def state_dict_for_save(model: "nn.Module") -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of every state tensor. Each tensor is cloned, so tied parameters (the
    Ensemble-in-One reference shares conv weights across paths) become separate tensors, which
    safetensors requires; loading copies the same values into the shared storage again."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header in one canonical form.

    safetensors writes ``__metadata__`` from a hash map whose order changes per process, so equal
    weights gave different bytes (and a different sha256, the checkpoint's identity in the results
    store). The header is rewritten with ``__metadata__`` first and its keys sorted, then the tensor
    entries in the writer's own (offset) order, compact, padded with spaces to 8 bytes as the format
    requires; the tensor data is untouched (offsets count from the end of the header)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    canon: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    canon.update(header)
    text = json.dumps(canon, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def save_state_dict_file(path: str | Path, tensors: Mapping[str, torch.Tensor],
                         metadata: Mapping[str, str] | None = None) -> str:
    """Write a safetensors file atomically; returns its sha256. Tensors are copied to contiguous CPU
    memory first (so tied or channels_last tensors are fine). Equal tensors and metadata give equal
    bytes in every process (:func:`canonical_safetensors`)."""
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    data = canonical_safetensors(save(clean, metadata=dict(metadata) if metadata else None))
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _flatten_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten_tensors(v, f"{prefix}.{k}" if prefix else str(k), out)


def _torch_load_safe(path: Path) -> Any:
    """``torch.load(weights_only=True)``; a file that needs code to unpickle is refused, one line."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    # torch files are zip archives ("PK") or protocol-2+ pickles ("\x80"); anything else (an HTML error
    # page saved by a failed download, a text file) is not a checkpoint, not an attack.
    if head != b"PK" and head[:1] != b"\x80":
        raise CheckpointError(f"not a readable checkpoint (starts with {head!r}; expected a torch zip file "
                              "or a pickle); was the download complete?", file=str(path))
    try:
        with warnings.catch_warnings():  # "pickle protocol 4" chatter; refusals are errors below
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights only" in msg.lower() or "weights_only" in msg:
            glob = re.search(r"GLOBAL ([\w.]+)", msg)
            op = re.search(r"Unsupported operand (\d+)", msg)
            why = (f"it imports {glob.group(1)}" if glob else f"pickle opcode {op.group(1)} is not allowed"
                   if op else "not weights-only")
            raise CheckpointError(f"refused: unpickling it could run code ({why}); only tensors and plain "
                                  "data are accepted (convert it to safetensors)", file=str(path)) from None
        raise CheckpointError(f"not a readable checkpoint ({msg.splitlines()[0][:120]})", file=str(path)) from None
    except (RuntimeError, EOFError, ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"not a readable checkpoint ({str(e).splitlines()[0][:120]})",
                              file=str(path)) from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a torch checkpoint read with ``weights_only=True``.

    Nested dicts are flattened with dots (DVERGE's ``{'model_0': sd, ...}`` becomes
    ``model_0.model.conv1.weight``) and a single ``state_dict``/``model`` wrapper is unwrapped. A
    pickle that would run code is refused with a :class:`CheckpointError`; nothing in it runs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("file not found", file=str(path))
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"corrupt safetensors file ({str(e).splitlines()[0][:120]})",
                                  file=str(path)) from None
    obj = _torch_load_safe(path)
    # {'state_dict': sd, 'epoch': ...} (common training scripts) or a lone {'model': sd} wrapper.
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and set(obj) == {"model"} and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    out: dict[str, torch.Tensor] = {}
    _flatten_tensors(obj, "", out)
    if not out:
        raise CheckpointError("holds no tensors", file=str(path))
    return out


def check_state_dict(model: "nn.Module", tensors: Mapping[str, torch.Tensor], file: str) -> None:
    """Keys and shapes must match the model exactly; one line naming a few offenders otherwise."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k} file {tuple(tensors[k].shape)} vs model {expected[k]}"
              for k in sorted(set(expected) & set(tensors)) if tuple(tensors[k].shape) != expected[k]]

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    parts = []
    if missing:
        parts.append(f"missing keys {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {few(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch {few(shapes)}")
    if parts:
        raise CheckpointError("weights do not fit the architecture in the manifest: " + "; ".join(parts),
                              file=file, reason="checkpoint-architecture")


# ----------------------------------------------------------------------------------------------
# Run directories
# ----------------------------------------------------------------------------------------------

def entry_name(spec: "str | ZooEntry") -> str:
    """``zoo/NAME``, ``NAME``, ``NAME.toml`` or a path to the TOML -> ``NAME`` (the run directory)."""
    if not isinstance(spec, str):
        return spec.name
    p = Path(spec)
    return p.name[:-5] if p.name.endswith(".toml") else p.name


class RunDir:
    """``<root>/<entry_name>/`` and the files in it (root defaults to :func:`robbench.paths.runs_dir`)."""

    def __init__(self, root: str | Path | None, entry_name: str) -> None:
        self.root = Path(root) if root is not None else default_runs_dir()
        self.name = entry_name
        self.path = self.root / entry_name

    @classmethod
    def from_path(cls, path: str | Path) -> "RunDir":
        p = Path(path)
        return cls(p.parent, p.name)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    @property
    def train_state_path(self) -> Path:
        return self.path / TRAIN_STATE

    @property
    def log_path(self) -> Path:
        return self.path / LOG

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def fresh_hint(self) -> str:
        return f"start over with: robbench train zoo/{self.name} --fresh (moves this run aside, keeps it)"

    def _missing_hint(self) -> str:
        """How to get a run of this name: train its zoo entry, or say there is none."""
        if entry_exists(self.name):
            return f"; train it with: robbench train zoo/{self.name}"
        return (f", and no zoo entry of that name ({ZOO_DIR / (self.name + '.toml')} does not exist); list the "
                "entries with: robbench zoo list")

    def orphans(self) -> list[str]:
        """Run files present without a manifest (a deleted or never-written manifest.json)."""
        if self.exists() or not self.path.is_dir():
            return []
        return [n for n in (WEIGHTS, TRAIN_STATE, LOG) if (self.path / n).exists()]

    def damage(self) -> CheckpointError | None:
        """Why this run folder cannot be trained on or reused as it is (None when it can, or when there
        is none): a file in its place, run files without a manifest, an unreadable manifest, a recorded
        file whose sha256 differs. Every reason names the file and the ``--fresh`` remedy."""
        if self.path.exists() and not self.path.is_dir():
            return CheckpointError(f"is a file, not a run folder; {self.fresh_hint()}", file=str(self.path))
        orphans = self.orphans()
        if orphans:
            return CheckpointError(f"holds {', '.join(orphans)} but no {MANIFEST} (deleted?), so its origin "
                                   f"cannot be checked; {self.fresh_hint()}", file=str(self.manifest_path),
                                   reason="checkpoint-hash")
        if not self.exists():
            return None
        try:
            m = self.read_manifest()
            self.verify(manifest=m)
        except CheckpointError as e:
            return e
        return None

    # -- manifest ------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        f = self.manifest_path
        if not f.is_file():
            raise CheckpointError(f"no trained run for {self.name!r}{self._missing_hint()}",
                                  file=str(f), reason="checkpoint-missing")
        try:
            m = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"corrupt manifest ({str(e).splitlines()[0][:120]}); {self.fresh_hint()}",
                                  file=str(f)) from None
        except OSError as e:
            raise filesystem_error(e, f, "read the manifest") from None
        if not isinstance(m, dict):
            raise CheckpointError(f"corrupt manifest (not a JSON object); {self.fresh_hint()}", file=str(f))
        for key in ("entry", "config", "entry_sha256", "files", "status"):
            if key not in m:
                raise CheckpointError(f"corrupt manifest (field missing); {self.fresh_hint()}", file=str(f), field=key)
        if not isinstance(m["files"], dict) or not all(isinstance(v, str) for v in m["files"].values()):
            raise CheckpointError(f"corrupt manifest (expected a table of sha256 strings); {self.fresh_hint()}",
                                  file=str(f), field="files")
        if m["status"] not in STATUSES:
            raise CheckpointError(f"unknown status {m['status']!r}; allowed: {', '.join(STATUSES)}",
                                  file=str(f), field="status")
        return m

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest["updated"] = _now()
        atomic_write_json(self.manifest_path, manifest)

    def new_manifest(self, entry: "ZooEntry", extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        commit, dirty = git_commit()
        return {
            "format": MANIFEST_FORMAT,
            "entry": entry.name,
            "config": entry.resolved(),
            "entry_sha256": entry.sha256(),
            "overrides": list(entry.overrides),
            "seed": entry.train.seed,
            "epochs": entry.train.epochs,
            "epochs_done": 0,
            "status": "training",
            "files": {},
            "versions": library_versions(),
            "git_commit": commit,
            "git_dirty": dirty,
            "created": _now(),
            "updated": _now(),
            "extra": dict(extra or {}),
        }

    def matches(self, entry: "ZooEntry") -> bool:
        """True when the run on disk was made from exactly this resolved entry (config + overrides)."""
        return self.exists() and self.read_manifest()["entry_sha256"] == entry.sha256()

    def move_aside(self) -> Path:
        """Rename this run to ``<entry>.stale-<UTC time>`` (kept, never deleted); returns the new path."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.path.with_name(f"{self.path.name}{STALE_MARK}{stamp}")
        n = 1
        while dest.exists():
            n += 1
            dest = self.path.with_name(f"{self.path.name}{STALE_MARK}{stamp}-{n}")
        os.replace(self.path, dest)
        return dest

    def begin(self, entry: "ZooEntry", extra: Mapping[str, Any] | None = None, fresh: bool = False) -> dict[str, Any]:
        """Start (or continue) training ``entry`` here; returns the manifest.

        An existing run of a different resolved config is an error unless ``fresh`` (which drops the
        old weights and resume state): resuming it would silently mix two configurations. So are run
        files without a manifest: their origin cannot be checked."""
        orphans = self.orphans()
        if orphans and not fresh:
            raise CheckpointError(f"holds {', '.join(orphans)} but no {MANIFEST}; {self.fresh_hint()}",
                                  file=str(self.manifest_path), reason="checkpoint-hash")
        if self.exists() and not fresh:
            m = self.read_manifest()
            if m["entry_sha256"] != entry.sha256():
                raise CheckpointError(
                    f"holds a run of a different configuration (overrides {m.get('overrides', [])}, now "
                    f"{list(entry.overrides)}); rerun with --fresh to move it aside and train anew", file=str(self.manifest_path),
                    field="entry_sha256")
            if extra:
                m.setdefault("extra", {}).update(extra)
                self.write_manifest(m)
            return m
        if fresh:
            for f in (self.weights_path, self.train_state_path, self.log_path):
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
        m = self.new_manifest(entry, extra)
        self.write_manifest(m)
        return m

    def verify(self, names: list[str] | None = None, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check the sha256 of every recorded file (or of ``names``); one line naming the file on failure.
        ``train_state.pt`` may be absent (deleting resume state after training is allowed)."""
        m = manifest if manifest is not None else self.read_manifest()
        files: dict[str, str] = m["files"]
        for name in names if names is not None else sorted(files):
            f = self.path / name
            if name not in files:
                raise CheckpointError("not recorded in the manifest", file=str(f))
            if not f.is_file():
                if name == TRAIN_STATE and names is None:
                    continue
                raise CheckpointError(f"missing (the manifest records it); {self.fresh_hint()}", file=str(f),
                                      reason="checkpoint-missing")
            try:
                got = file_sha256(f)
            except OSError as e:
                raise filesystem_error(e, f, "read the file") from None
            # a kill between writing a resume state and recording it leaves the announced one
            if got != files[name] and got != (m.get("pending") or {}).get(name):
                raise CheckpointError(f"sha256 mismatch (file {got[:12]}…, manifest {files[name][:12]}…): "
                                      f"corrupt or modified after it was written; refused; {self.fresh_hint()}",
                                      file=str(f), reason="checkpoint-hash")
        return m

    # -- weights -------------------------------------------------------------------------------
    def save_weights(self, model: "nn.Module", epochs_done: int | None = None) -> str:
        """Write the current weights to ``model.safetensors`` (status unchanged); returns its sha256."""
        m = self.read_manifest()
        sha = save_state_dict_file(self.weights_path, model.state_dict(),  # copies to contiguous CPU
                                   {"entry": m["entry"], "entry_sha256": m["entry_sha256"]})
        m["files"][WEIGHTS] = sha
        if epochs_done is not None:
            m["epochs_done"] = int(epochs_done)
        self.write_manifest(m)
        return sha

    def save_final(self, model: "nn.Module", entry: "ZooEntry", extra: Mapping[str, Any] | None = None,
                   epochs_done: int | None = None) -> dict[str, Any]:
        """Final weights + manifest with status ``complete``. Works without :meth:`begin` (derived models)."""
        if not self.exists() or not self.matches(entry):
            self.write_manifest(self.new_manifest(entry))
        self.save_weights(model)
        m = self.read_manifest()
        m["status"] = "complete"
        m["epochs_done"] = int(entry.train.epochs if epochs_done is None else epochs_done)
        m["finished"] = _now()
        if extra:
            m.setdefault("extra", {}).update(extra)
        self.write_manifest(m)
        return m

    # -- resume state --------------------------------------------------------------------------
    def save_train_state(self, state: Mapping[str, Any], epochs_done: int | None = None) -> str:
        """``torch.save`` of tensors/plain Python (checked by reading it back the way it will be loaded:
        a state that needs pickled classes fails now, not at resume). Returns its sha256."""
        buf = io.BytesIO()
        torch.save(dict(state), buf)
        data = buf.getvalue()
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise TypeError(f"train state must hold only tensors and plain Python data: {str(e).splitlines()[0]}") from None
        m = self.read_manifest()
        sha = hashlib.sha256(data).hexdigest()
        # announce the new state's hash before writing it: a kill between the file and the manifest then
        # leaves a state the manifest vouches for, and any other bytes there are refused
        m["pending"] = {TRAIN_STATE: sha}
        self.write_manifest(m)
        atomic_write_bytes(self.train_state_path, data)
        m["files"][TRAIN_STATE] = sha
        m.pop("pending", None)
        if epochs_done is not None:
            m["epochs_done"] = int(epochs_done)
        self.write_manifest(m)
        return sha

    def load_train_state(self) -> dict[str, Any] | None:
        """The resume state (sha256 verified), or None when the run has none yet. Tensors on CPU."""
        if not self.exists():
            return None
        m = self.read_manifest()
        if TRAIN_STATE not in m["files"]:
            return None
        self.verify([TRAIN_STATE], m)
        return _torch_load_safe(self.train_state_path)

    # -- log -----------------------------------------------------------------------------------
    def append_log(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line (flushed and fsynced: the log survives a kill as far as it was written)."""
        ensure_dir(self.path)
        try:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(dict(record), sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:
            raise filesystem_error(e, self.log_path, "append to the log") from None

    def read_log(self) -> list[dict[str, Any]]:
        """Log records; a torn last line (killed mid-write) is dropped."""
        if not self.log_path.is_file():
            return []
        out = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def checkpoint_sha256(run: "RunDir | str | Path") -> str:
    """sha256 of the run's ``model.safetensors`` (what result rows record), as the manifest records it."""
    rd = run if isinstance(run, RunDir) else RunDir.from_path(run)
    m = rd.read_manifest()
    if WEIGHTS not in m["files"]:
        raise CheckpointError(f"no final weights yet; finish training with: robbench train zoo/{rd.name}",
                              file=str(rd.weights_path), reason="checkpoint-incomplete")
    return m["files"][WEIGHTS]


def weights_sha256(manifest: Mapping[str, Any]) -> str | None:
    """The sha256 a manifest records for the final weights (None before training saved them)."""
    return manifest.get("files", {}).get(WEIGHTS)


def run_dirs(root: str | Path | None) -> list[RunDir]:
    """Every run directory under ``root`` that has a manifest, by name; runs moved aside by
    ``train --fresh`` (``<name>.stale-<time>``) are kept on disk but not listed."""
    base = Path(root) if root is not None else default_runs_dir()
    return [RunDir(base, mf.parent.name) for mf in sorted(base.glob(f"*/{MANIFEST}"))
            if STALE_MARK not in mf.parent.name]


def entry_from_manifest(manifest: Mapping[str, Any], file: str) -> "ZooEntry":
    """Rebuild the validated :class:`ZooEntry` from the manifest's resolved config (not from zoo/,
    which may have changed since training). The config must hash to the recorded ``entry_sha256``."""
    from robbench.config import config_hash, resolve_entry

    cfg = manifest["config"]
    if config_hash(cfg) != manifest["entry_sha256"]:
        raise CheckpointError("config does not hash to entry_sha256: the manifest was edited", file=file,
                              field="config")
    return resolve_entry(dict(cfg), file, list(manifest.get("overrides", [])), prefix="config")


def load_trained(entry_or_name: "str | ZooEntry", runs_dir: str | Path | None = None,
                 device: "str | torch.device | None" = None, require_complete: bool = True,
                 ) -> tuple["nn.Module", dict[str, Any]]:
    """Load a trained run as an eval-mode :class:`~robbench.models.Ensemble` plus its manifest.

    Verifies every recorded sha256, rebuilds the model from the manifest's resolved config, checks
    keys and shapes, loads the weights. Every failure is a one-line :class:`CheckpointError`."""
    from robbench.data import get_info
    from robbench.device import pick_device
    from robbench.models import build_model

    name = entry_name(entry_or_name)
    run = RunDir(runs_dir, name)
    m = run.read_manifest()
    if require_complete and m["status"] != "complete":
        raise CheckpointError(f"training is not complete (epoch {m.get('epochs_done', '?')} of "
                              f"{m.get('epochs', '?')}); resume it with: robbench train zoo/{name}",
                              file=str(run.manifest_path), field="status", reason="checkpoint-incomplete")
    if WEIGHTS not in m["files"]:
        raise CheckpointError(f"no weights saved yet; train it with: robbench train zoo/{name}",
                              file=str(run.weights_path), reason="checkpoint-incomplete")
    run.verify(manifest=m)
    entry = entry_from_manifest(m, str(run.manifest_path))
    if not isinstance(entry_or_name, str) and entry_or_name.sha256() != m["entry_sha256"]:
        warnings.warn(f"{run.path}: trained from a different config than the zoo entry now resolves to; "
                      "using the manifest's config", stacklevel=2)
    model = build_model(entry, get_info(entry.data.dataset))
    tensors = load_state_dict_file(run.weights_path)
    check_state_dict(model, tensors, str(run.weights_path))
    model.load_state_dict(tensors, strict=True)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    model.to(dev).eval()
    return model, m
