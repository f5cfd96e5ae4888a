"""``robbench add zoo/my_cnn.toml``: the user's own model (a factory in their code + trained weights) as
an imported run that every protocol can evaluate.

The entry file is a zoo entry without ``[train]``; ``model.arch`` names the factory
(``python:pkg.mod:Factory`` or ``file:path.py:Factory``, :mod:`robbench.models.user_code`) or a built-in
architecture, ``model.options`` its keyword options and ``model.weights`` the trained weights
(``.safetensors``, or a ``.pt``/``.pth`` state dict read with ``weights_only=True``). Paths are relative
to the entry file. Before anything is written the model is built, the weights are checked key by key and
shape by shape and loaded, and one forward pass checks the output shape (and warns when the outputs look
like probabilities: attacks need logits).
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from robbench.checkpoint import file_sha256, load_state_dict_file
from robbench.config import ZOO_KIND, load_raw, resolve_entry
from robbench.data import get_info
from robbench.errors import CheckpointError, ConfigError
from robbench.imported.record import imported_config, write_imported_run
from robbench.models import build_model
from robbench.models.user_code import is_factory_name, parse_factory, register_live, source_file
from robbench.paths import ZOO_DIR
from robbench.registry import ARCHITECTURES

INPUT_CONTRACT = "NCHW float32 in [0, 1]; normalisation inside the model; outputs logits (or log-probabilities)"
# ModelSpec fields that shape robbench's own architectures; a user factory ignores them, so setting one
# would record a claim about the model that is not true
_BUILTIN_ONLY = ("normalization", "norm_layer", "activation", "leaky_slope", "width")


@dataclass
class AddResult:
    name: str
    path: Path
    manifest_imported: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def fit_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], members: int, what: str,
                file: str) -> dict[str, torch.Tensor]:
    """The weights in robbench's layout (``members.<i>.`` + the member's keys): a bare state dict of one
    member gets the ``members.0.`` prefix. Keys and shapes must match exactly."""
    keys = dict(tensors)
    if not any(k.startswith("members.") for k in keys):
        if members != 1:
            raise CheckpointError(f"holds one model's keys but the entry has {members} members; save the "
                                  "ensemble's state dict (keys members.<i>.…)", file=file)
        keys = {f"members.0.{k}": v for k, v in keys.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    strip = (lambda k: k[len("members.0."):]) if members == 1 else (lambda k: k)
    missing = sorted(strip(k) for k in set(expected) - set(keys))
    unexpected = sorted(strip(k) for k in set(keys) - set(expected))
    shapes = [f"{strip(k)} file {tuple(keys[k].shape)} vs model {expected[k]}"
              for k in sorted(set(expected) & set(keys)) if tuple(keys[k].shape) != expected[k]]
    parts = ([f"missing keys {_few(missing)}"] if missing else []) + (
        [f"unexpected keys {_few(unexpected)}"] if unexpected else []) + (
        [f"shape mismatch {_few(shapes)}"] if shapes else [])
    if parts:
        raise CheckpointError(f"weights do not fit {what}: " + "; ".join(parts), file=file,
                              reason="checkpoint-architecture")
    return keys


def check_outputs(model: nn.Module, info: Any, what: str, file: str) -> list[str]:
    """One forward pass on seeded random inputs in [0, 1]: output shape [B, classes], finite values.
    Returns warnings (outputs that look like probabilities)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, info.in_channels, info.image_size, info.image_size, generator=gen)
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as e:  # the user's forward failing on the dataset's input shape
        raise ConfigError(f"{what} fails on a {tuple(x.shape)} input in [0, 1] ({info.name}): "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:160]}", file=file, field="model.arch") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (4, info.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{what} returns {shape} for 4 {info.name} images; expected (4, {info.num_classes}) "
                          "logits", file=file, field="model.arch")
    if not torch.isfinite(out).all():
        raise ConfigError(f"{what} returns non-finite outputs on inputs in [0, 1]", file=file, field="model.arch")
    if bool((out >= 0).all()) and torch.allclose(out.sum(1), torch.ones(4), atol=1e-3):
        return [f"{what}: outputs look like probabilities (non-negative, rows sum to 1); attacks and "
                "AutoAttack need logits or log-probabilities: return the scores before softmax"]
    return []


def _weights_file(model_tbl: dict[str, Any], base: Path, file: str) -> Path:
    w = model_tbl.pop("weights", None)
    if w is None:
        raise ConfigError("required: the trained weights (.safetensors, or a .pt state dict)", file=file,
                          field="model.weights")
    if not isinstance(w, str):
        raise ConfigError(f"expected a file path, got {w!r}", file=file, field="model.weights")
    p = Path(w).expanduser()
    p = (p if p.is_absolute() else base / p).resolve()
    if not p.is_file():
        raise CheckpointError(f"weights file {p} not found", file=file, reason="checkpoint-missing")
    if p.suffix not in (".safetensors", ".pt", ".pth", ".bin", ".tar"):
        raise ConfigError(f"{p.name}: allowed weight files: .safetensors, or .pt/.pth/.bin/.tar torch files "
                          "(read with weights_only=True)", file=file, field="model.weights")
    return p


def prepare_entry(raw: dict[str, Any], file: str, base: Path) -> tuple[dict[str, Any], Any]:
    """Validate an imported entry's data: factory name made absolute, [train] refused, then the typed
    :class:`~robbench.config.ZooEntry` (factory options checked against its signature)."""
    if "train" in raw:
        raise ConfigError("an imported model is not trained by robbench; remove the [train] table (robbench add "
                          "records where the weights came from instead)", file=file, field="train")
    model_tbl = raw.get("model")
    if not isinstance(model_tbl, dict) or "arch" not in model_tbl:
        raise ConfigError("required: the model factory (python:<module>:<factory>, file:<path.py>:<factory>) or a "
                          "built-in architecture", file=file, field="model.arch")
    arch = model_tbl["arch"]
    if isinstance(arch, str) and is_factory_name(arch):
        set_here = [k for k in _BUILTIN_ONLY if k in model_tbl]
        if set_here:
            raise ConfigError(f"does not apply to a user factory (it builds its own layers and "
                              f"normalisation); remove it or pass it in model.options", file=file,
                              field=f"model.{set_here[0]}")
        ref = parse_factory(arch, base_dir=base, file=file)
        if ref.scheme == "memory":
            raise ConfigError("memory: models come from robbench.evaluate(model) in Python; name a python: or "
                              "file: factory here", file=file, field="model.arch")
        model_tbl["arch"] = ref.text
        ARCHITECTURES.forget(ref.text)  # the file may have changed since this process first read it
    entry = resolve_entry(raw, file)
    return raw, entry


def import_weights(raw: dict[str, Any], entry: Any, tensors: Mapping[str, torch.Tensor], *, file: str,
                   imported: dict[str, Any], runs_dir: str | Path | None, force: bool) -> AddResult:
    """Build ``entry``'s model, fit and load ``tensors``, check one forward pass, write the imported run."""
    info = get_info(entry.data.dataset, entry.data.options)
    torch.manual_seed(0)  # the factory's own init is overwritten by the weights; seeded for determinism
    model = build_model(entry, info)
    what = entry.model.arch + (f"({', '.join(f'{k}={v!r}' for k, v in entry.model.options.items())})"
                               if entry.model.options else "")
    fitted = fit_tensors(model, tensors, entry.model.members, what, file)
    model.load_state_dict(fitted, strict=True)
    warnings = check_outputs(model, info, what, file)
    arch = entry.model.arch
    factory_src: str | None = None
    src_sha: str | None = None
    if is_factory_name(arch) and not arch.startswith("memory:"):
        p = source_file(parse_factory(arch), file=file)
        factory_src, src_sha = str(p), file_sha256(p)
    record = {"factory": arch, "options": dict(entry.model.options), "source_file": factory_src,
              "source_sha256": src_sha, "input": INPUT_CONTRACT, "warnings": warnings, **imported}
    config = imported_config(raw)
    config["model"] = {**config["model"], "members": entry.model.members}  # what the leaderboard counts
    run = write_imported_run(runs_dir, entry.name, config, model, record, force=force)
    return AddResult(entry.name, run.path, record, warnings)


def add_entry(spec: str, *, runs_dir: str | Path | None = None, name: str | None = None,
              force: bool = False) -> AddResult:
    """``robbench add``: read the entry file, check everything, write ``<runs>/<name>/`` (nothing on error)."""
    raw, path = load_raw(spec, ZOO_DIR, ZOO_KIND)
    file = str(path)
    raw = dict(raw)
    raw["name"] = name or raw.get("name") or path.stem
    model_tbl = raw.get("model")
    if not isinstance(model_tbl, dict):
        raise ConfigError("required table is missing", file=file, field="model")
    raw["model"] = dict(model_tbl)
    wfile = _weights_file(raw["model"], path.parent, file)
    raw, entry = prepare_entry(raw, file, path.parent)
    tensors = load_state_dict_file(wfile)
    imported = {"kind": "user model", "weights_file": str(wfile), "weights_sha256": file_sha256(wfile),
                "weights_format": "safetensors" if wfile.suffix == ".safetensors" else "torch (weights_only=True)",
                "added_from": file, "added_from_sha256": file_sha256(path)}
    return import_weights(raw, entry, tensors, file=file, imported=imported, runs_dir=runs_dir, force=force)


def module_weights_sha256(model: nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, shapes and bytes, in key order): the identity of the
    weights handed to :func:`robbench.evaluate` (which has no file to hash)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def add_module(model: nn.Module, name: str, dataset: str, *, runs_dir: str | Path | None = None,
               factory: str | None = None, options: Mapping[str, Any] | None = None, members: int = 1,
               force: bool = False) -> AddResult:
    """An ``nn.Module`` object as an imported run (``robbench.evaluate(model, ...)``). With ``factory``
    (``python:``/``file:``) the run can be rebuilt by any process; without, the module is held as
    ``memory:<name>`` for this process only (its class's source, when Python can find it, is hashed and
    recorded for provenance)."""
    file = f"robbench.evaluate(name={name!r})"
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if factory is None:
        ref = register_live(name, model)
        arch = ref.text
        opts: dict[str, Any] = {}
    else:
        arch, opts = factory, dict(options or {})
    raw: dict[str, Any] = {"name": name, "description": f"{type(model).__qualname__} handed to robbench.evaluate",
                           "model": {"arch": arch, "options": opts, "members": members},
                           "data": {"dataset": dataset}}
    if factory is not None:
        raw, entry = prepare_entry(raw, file, Path.cwd())
    else:
        entry = resolve_entry(raw, file)
    cls_file, cls_sha = None, None
    try:
        src = inspect.getsource(type(model))
        cls_file, cls_sha = inspect.getsourcefile(type(model)), hashlib.sha256(src.encode()).hexdigest()
    except (OSError, TypeError):
        pass
    imported = {"kind": "python object", "class": f"{type(model).__module__}.{type(model).__qualname__}",
                "class_source_file": cls_file, "class_source_sha256": cls_sha, "weights_file": None,
                "weights_sha256": module_weights_sha256(model)}
    return import_weights(raw, entry, state, file=file, imported=imported, runs_dir=runs_dir, force=force)
