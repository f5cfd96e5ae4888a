"""The papers' released checkpoints as imported runs (``robbench convert``).

Key layouts (read in the reference code; notes: dverge-reference-code.md §1-2, methods-reference-code.md §A):

- **Ensemble-in-One** (cai-y13/Ensemble-in-One, ``exp_resnet20_aug2_batch3_eps007/checkpoint/model.pth.tar``):
  ``{'state_dict': sd, ...}``; ``sd`` has ``net.normalizer.{mean,std}`` (advertorch, shape [3]) and
  ``net.model.<layer>`` of a ResNet-20 whose every 3x3 conv is an ``RGB`` (``augment_op.py``):
  ``<layer>.candidate_ops.<k>.0`` the conv, ``<layer>.candidate_ops.<k>.1`` its BatchNorm, and the
  never-trained ``AP_path_alpha`` / ``AP_path_wb`` gate parameters (dropped); ``downsample.{0,1}`` (1x1
  conv + BN) and ``fc`` are plain. The released code hands the same conv object to every candidate, so
  the convs are equal across paths: that file becomes robbench's ``share_conv = true`` RGN; a file whose
  convs differ becomes ``share_conv = false``.
- **DVERGE** (zjysteven/DVERGE, ``epoch_<e>.pth``): ``{'model_0': sd, 'model_1': sd, ...}``, each ``sd`` a
  ``ModelWrapper``: ``normalizer.{mean,std}`` and ``model.<key>`` of ``models/resnet.py`` (``downsample``
  where robbench says ``shortcut``). GAL's members use LeakyReLU(0.1): pick the matching zoo entry.

Every converter maps each robbench key to one file key; a key the file lacks, or a file key nothing
reads (beyond the dropped gate parameters), is an error naming a few of them; shapes must match.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from robbench.checkpoint import file_sha256, load_state_dict_file
from robbench.config import ZOO_KIND, apply_overrides, load_raw
from robbench.errors import CheckpointError
from robbench.imported.add import AddResult, import_weights, prepare_entry
from robbench.paths import ZOO_DIR

# never trained (the optimizer gets only weight_parameters(); notes §A), not part of the model's function
_EIO_IGNORED = re.compile(r".*\.AP_path_(alpha|wb)$")


def _strip_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if tensors and all(k.startswith(prefix) for k in tensors):
        return {k[len(prefix):]: v for k, v in tensors.items()}
    return dict(tensors)


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def map_keys(expected: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor],
             source_key: Callable[[str], str | None], file: str, ignored: re.Pattern[str] | None = None,
             what: str = "") -> dict[str, torch.Tensor]:
    """robbench key -> tensor, taking each from ``source[source_key(key)]`` (reshaped when only the
    layout differs, e.g. a [3] normaliser mean into [1, 3, 1, 1]). ``source_key`` None: keep robbench's
    own value (a counter the file may predate)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing, shapes = [], []
    for k, ref in expected.items():
        sk = source_key(k)
        if sk is None:
            out[k] = ref.clone()
            continue
        if sk not in source:
            if k.endswith("num_batches_tracked"):  # files written before torch 0.4.1 lack the counter
                out[k] = ref.clone()
                continue
            missing.append(sk)
            continue
        v = source[sk]
        used.add(sk)
        if tuple(v.shape) != tuple(ref.shape):
            if v.numel() == ref.numel() and k.endswith(("normalize.mean", "normalize.std")):
                v = v.reshape(ref.shape)
            else:
                shapes.append(f"{sk} {tuple(v.shape)} vs {tuple(ref.shape)}")
                continue
        out[k] = v.to(ref.dtype)
    unread = sorted(k for k in source if k not in used and not (ignored and ignored.match(k)))
    parts = ([f"missing keys {_few(sorted(set(missing)))}"] if missing else []) + (
        [f"shape mismatch {_few(shapes)}"] if shapes else []) + ([f"keys nothing reads {_few(unread)}"] if unread else [])
    if parts:
        raise CheckpointError(f"not {what} in the expected key layout: " + "; ".join(parts), file=file,
                              reason="checkpoint-architecture")
    return out


def _entry_raw(like: str, overrides: list[str], name: str) -> tuple[dict[str, Any], Path]:
    raw, path = load_raw(like, ZOO_DIR, ZOO_KIND)
    raw = apply_overrides(raw, overrides)
    raw["name"] = name
    raw.pop("train", None)
    tags = [t for t in raw.get("tags", []) if t != "pretrain"]
    raw["tags"] = tags + ["released"]
    return raw, path


def _convert(raw: dict[str, Any], like_path: Path, file: Path, tensors: dict[str, torch.Tensor],
             key_of: Callable[[str], str | None], ignored: re.Pattern[str] | None, what: str, kind: str,
             runs_dir: str | Path | None, force: bool, extra: Mapping[str, Any]) -> AddResult:
    from robbench.data import get_info
    from robbench.models import build_model

    raw, entry = prepare_entry(raw, str(like_path), like_path.parent)
    expected = build_model(entry, get_info(entry.data.dataset, entry.data.options)).state_dict()
    mapped = map_keys(expected, tensors, key_of, str(file), ignored, what)
    imported = {"kind": kind, "weights_file": str(file.resolve()), "weights_sha256": file_sha256(file),
                "weights_format": "torch (weights_only=True)", "like": like_path.stem,
                **extra}
    return import_weights(raw, entry, mapped, file=str(file), imported=imported, runs_dir=runs_dir, force=force)


# ----------------------------------------------------------------------------------------------
# Ensemble-in-One random gated network
# ----------------------------------------------------------------------------------------------

def _eio_rgb_layers(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``net.model.<layer>`` -> number of candidate paths, from the ``candidate_ops.<k>.0.weight`` keys."""
    out: dict[str, int] = {}
    for k in sd:
        m = re.fullmatch(r"net\.model\.(.+)\.candidate_ops\.(\d+)\.0\.weight", k)
        if m:
            out[m.group(1)] = max(out.get(m.group(1), 0), int(m.group(2)) + 1)
    return out


def convert_eio_rgn(file: str | Path, name: str, *, like: str = "eio_resnet20", runs_dir: str | Path | None = None,
                    force: bool = False) -> AddResult:
    """Ensemble-in-One's released random gated network (``model.pth.tar``) -> an imported RGN run."""
    file = Path(file)
    sd = _strip_prefix(load_state_dict_file(file), "module.")
    layers = _eio_rgb_layers(sd)
    if not layers:
        raise CheckpointError("no Ensemble-in-One gated blocks (keys net.model.<layer>.candidate_ops.<k>.0.weight)",
                              file=str(file), reason="checkpoint-architecture")
    paths = sorted(set(layers.values()))
    if len(paths) != 1:
        raise CheckpointError(f"gated blocks with different path counts {paths}", file=str(file),
                              reason="checkpoint-architecture")
    n = paths[0]
    shared = all(torch.equal(sd[f"net.model.{layer}.candidate_ops.0.0.weight"],
                             sd[f"net.model.{layer}.candidate_ops.{k}.0.weight"])
                 for layer in layers for k in range(1, n))
    raw, like_path = _entry_raw(like, [f"model.transform_options.augment_factor={n}",
                                       f"model.transform_options.share_conv={'true' if shared else 'false'}"], name)
    raw["description"] = (f"Ensemble-in-One released RGN ({len(layers)} gates, n={n}, "
                          f"{'shared' if shared else 'independent'} convs) converted from {file.name}")
    raw["citation"] = "cai-y13/Ensemble-in-One released checkpoint; augment_op.py RGB, resnet.py"

    def key_of(k: str) -> str | None:
        rest = k[len("members.0."):]
        if rest.startswith("net.normalize."):
            return "net.normalizer." + rest[len("net.normalize."):]
        m = re.fullmatch(r"net\.(.+)\.convs\.(\d+)\.weight", rest)
        if m:
            return f"net.model.{m.group(1)}.candidate_ops.{m.group(2)}.0.weight"
        m = re.fullmatch(r"net\.(.+)\.norms\.(\d+)\.(\w+)", rest)
        if m:
            return f"net.model.{m.group(1)}.candidate_ops.{m.group(2)}.1.{m.group(3)}"
        body = rest[len("net."):].replace(".shortcut.", ".downsample.")
        return f"net.model.{body}"

    # with one shared conv robbench stores candidate 0's tensor; the other candidates' copies are read too
    ignored = _EIO_IGNORED if not shared else re.compile(
        _EIO_IGNORED.pattern + r"|.*\.candidate_ops\.[1-9]\d*\.0\.weight$")
    return _convert(raw, like_path, file, sd, key_of, ignored, "an Ensemble-in-One RGN", "released checkpoint (eio rgn)",
                    runs_dir, force, {"gates": len(layers), "paths_per_gate": n, "share_conv": shared,
                                      "dropped": "AP_path_alpha, AP_path_wb (gate parameters, never trained)"})


# ----------------------------------------------------------------------------------------------
# DVERGE ensembles
# ----------------------------------------------------------------------------------------------

def convert_dverge_ensemble(file: str | Path, name: str, *, like: str = "baseline_resnet20_x3",
                            runs_dir: str | Path | None = None, force: bool = False) -> AddResult:
    """DVERGE's released ``epoch_<e>.pth`` (``{'model_0': sd, ...}``) -> an imported ensemble run shaped
    like zoo entry ``like`` (its activation: GAL's are LeakyReLU(0.1), e.g. ``like = gal_resnet20_x3``)."""
    file = Path(file)
    sd = load_state_dict_file(file)
    members = sorted({int(m.group(1)) for k in sd if (m := re.match(r"model_(\d+)\.", k))})
    if not members or members != list(range(len(members))):
        raise CheckpointError("no DVERGE ensemble members (keys model_0.model.…, model_1.model.…)", file=str(file),
                              reason="checkpoint-architecture")
    raw, like_path = _entry_raw(like, [f"model.members={len(members)}"], name)
    raw["description"] = f"DVERGE released ensemble of {len(members)} converted from {file.name} (like {like})"
    raw["citation"] = "zjysteven/DVERGE released checkpoint; models/resnet.py, utils.py ModelWrapper"

    def key_of(k: str) -> str | None:
        m = re.fullmatch(r"members\.(\d+)\.(.+)", k)
        assert m is not None
        i, rest = m.group(1), m.group(2)
        if rest.startswith("normalize."):
            return f"model_{i}.normalizer.{rest[len('normalize.'):]}"
        return f"model_{i}.model.{rest.replace('.shortcut.', '.downsample.')}"

    return _convert(raw, like_path, file, sd, key_of, None, "a DVERGE ensemble", "released checkpoint (dverge ensemble)",
                    runs_dir, force, {"members": len(members)})
