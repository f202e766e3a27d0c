"""Training checkpoints that survive crashes.

A checkpoint is a folder ``step_0000500/`` holding model, EMA and optimizer tensors (safetensors) and a
``manifest.json`` with the step, the training state and a SHA-256 of every file. It is written into a
temporary folder and renamed into place, so a crash leaves either a complete checkpoint or none; on
resume a folder whose files do not match its manifest is skipped with a warning, and half-written
``.tmp-step_*`` folders of a killed save are removed. Files are fsynced before the manifest is written
and the manifest before the rename, so the rename publishes only data that is on disk.

The manifest carries a SHA-256 of its own content (``manifest_sha256``), and its ``step`` must match the
folder's name, so an edited manifest is rejected like a corrupt file; a manifest listing no files, or
file names outside its folder, is rejected too. Every write checks free space first and a full disk
raises ``DiskFullError`` with the previous checkpoints untouched. Non-finite weights are never written.

An FSDP checkpoint keeps its model/optimizer/EMA shards in a ``sharded/`` sub-folder written by
``torch.distributed.checkpoint``; those files are listed (with checksums) in the same manifest.

Optimizer state is matched to parameters by name: torch's ``Optimizer.load_state_dict`` pairs saved and
current parameters by position, so a model whose modules are registered in another order (same names
and shapes, after a refactor) would get another parameter's moments, or crash on their shapes inside the
step. A full checkpoint records the parameter names in the optimizer's numbering (``param_names`` in the
manifest's ``optimizer`` entry) and ``match_optimizer_state`` renumbers the state for today's model. (The
sharded state of FSDP is keyed by name already.)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings

import torch

from starflow.errors import CheckpointError
from starflow.io.hub import atomic_save_safetensors, atomic_write_bytes, check_finite, inside, load_safetensors

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-step_"
FULL_STEMS = ("model", "ema", "optimizer")  # the files of a full (non-sharded) training checkpoint


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def flatten_optimizer(state: dict, param_names: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state dict -> (tensors, JSON-able rest), since safetensors holds tensors only.
    ``param_names`` (``optimizer_param_names``) are kept in the rest, so the state can be matched by name."""
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    rest = {"param_groups": state["param_groups"], "scalars": scalars}
    if param_names is not None:
        rest["param_names"] = list(param_names)
    return tensors, rest


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(rest["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def new_temp_dir(root: str, step: int) -> str:
    """A fresh ``root/.tmp-step_XXXXXXX-*`` folder to write a checkpoint into before it is renamed."""
    os.makedirs(root, exist_ok=True)
    return tempfile.mkdtemp(dir=root, prefix=f"{TMP_PREFIX}{step:07d}-")


def write_tensors(folder: str, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """``tensors`` maps a file stem to a state dict; one safetensors file each (free space checked first)."""
    for stem, sd in tensors.items():
        atomic_save_safetensors(sd, os.path.join(folder, f"{stem}.safetensors"))


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of a manifest's canonical JSON without its own ``manifest_sha256`` entry."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _files_under(folder: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(folder):
        for n in names:
            out.append(os.path.relpath(os.path.join(dirpath, n), folder))
    return sorted(out)


def finalize(root: str, tmp: str, step: int, info: dict, keep_last: int) -> str:
    """Checksum every file in ``tmp`` (sub-folders too, e.g. FSDP's sharded state), write the manifest
    last, flush to disk, rename to ``root/step_XXXXXXX`` and drop all but the newest ``keep_last``."""
    final = os.path.join(root, f"step_{step:07d}")
    try:
        files = {}
        for name in _files_under(tmp):
            path = os.path.join(tmp, name)
            _fsync(path)
            files[name.replace(os.sep, "/")] = _sha256(path)
        manifest = {"step": step, "files": files, **info}
        manifest["manifest_sha256"] = manifest_digest(manifest)
        atomic_write_bytes(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1).encode())
        aside = None
        if os.path.exists(final):  # same step written again (after a rollback): swap, then delete the old
            aside = tmp + "-old"
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync(root)
        if aside:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, step, keep_last)
    return final


def save_checkpoint(root: str, step: int, tensors: dict[str, dict[str, torch.Tensor]], info: dict, keep_last: int) -> str:
    """Write ``root/step_XXXXXXX`` atomically; ``tensors`` maps a file stem to a state dict."""
    for stem, sd in tensors.items():
        check_finite(sd, f"checkpoint of step {step} ({stem})")
    tmp = new_temp_dir(root, step)
    try:
        write_tensors(tmp, tensors)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finalize(root, tmp, step, info, keep_last)


def step_of(path: str) -> int:
    return int(os.path.basename(path)[len("step_"):])


def prune(root: str, step: int, keep_last: int) -> None:
    """Keep the checkpoint of ``step`` and the ``keep_last - 1`` newest older ones. Folders of later steps
    (left by an abandoned timeline: a corrupt checkpoint resume skipped, or a rollback) are not counted,
    so they can never push the checkpoint just written out."""
    older = [p for p in list_checkpoints(root) if step_of(p) < step]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def clean_temp(root: str) -> list[str]:
    """Remove half-written ``.tmp-step_*`` folders a killed run left behind (call only when no other
    process is writing checkpoints into ``root``). Returns what was removed."""
    if not os.path.isdir(root):
        return []
    removed = []
    for n in sorted(os.listdir(root)):
        if n.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)
            removed.append(n)
    if removed:
        warnings.warn(f"removed {len(removed)} partial checkpoint folder(s) left by an interrupted save: {removed}")
    return removed


def list_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root)
                   if n.startswith("step_") and n[5:].isdigit() and os.path.isdir(os.path.join(root, n)))
    return [os.path.join(root, n) for n in names]


def read_manifest(path: str) -> dict:
    """The manifest of checkpoint folder ``path``, checked for shape, its own checksum and its step.

    Manifests written before the self-checksum existed are accepted (their step is still checked)."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt {MANIFEST}: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "step" not in manifest:
        raise CheckpointError(f"{path}: {MANIFEST} lacks 'step' or 'files'")
    if "manifest_sha256" in manifest and manifest["manifest_sha256"] != manifest_digest(manifest):
        raise CheckpointError(f"{path}: {MANIFEST} was modified after it was written (its checksum does not match)")
    name = os.path.basename(os.path.normpath(path))
    if name.startswith("step_") and name[5:].isdigit() and manifest["step"] != int(name[5:]):
        raise CheckpointError(f"{path}: {MANIFEST} says step {manifest['step']!r}, the folder says {int(name[5:])}")
    if not manifest["files"]:
        raise CheckpointError(f"{path}: {MANIFEST} lists no files")
    return manifest


def verify(path: str, required: tuple[str, ...] = ()) -> dict:
    """Return the manifest if every file is present and matches its checksum and the manifest lists the
    ``required`` file stems (e.g. ``FULL_STEMS``); raise ``CheckpointError`` otherwise."""
    manifest = read_manifest(path)
    for name, digest in manifest["files"].items():
        fpath = inside(path, name, f"{path}/{MANIFEST}")
        if not os.path.isfile(fpath) or _sha256(fpath) != digest:
            raise CheckpointError(f"{path}: {name} is missing or does not match its checksum")
    if required and manifest.get("format", "full") == "full":
        missing = [f"{stem}.safetensors" for stem in required if f"{stem}.safetensors" not in manifest["files"]]
        if missing:
            raise CheckpointError(f"{path}: {MANIFEST} does not list {missing}")
    return manifest


def latest_valid(root: str, quarantine: bool = False, required: tuple[str, ...] = ()) -> str | None:
    """The newest checkpoint whose files all match its manifest; corrupt or partial ones are skipped with a
    warning, and with ``quarantine`` renamed to ``.corrupt-step_*`` so they are kept for inspection but
    never listed again."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify(path, required)
            return path
        except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            warnings.warn(f"skipping corrupt checkpoint: {e}")
            if quarantine:
                aside = os.path.join(root, ".corrupt-" + os.path.basename(path))
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
    return None


def load_checkpoint(path: str, required: tuple[str, ...] = ()) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(manifest, {stem: state dict}) for the top-level safetensors files, after verifying every checksum.
    A sharded (FSDP) checkpoint's ``sharded/`` folder is read by ``distributed.load_sharded`` instead."""
    manifest = verify(path, required)
    tensors = {name[: -len(".safetensors")]: load_safetensors(os.path.join(path, name))
               for name in manifest["files"] if "/" not in name and name.endswith(".safetensors")}
    return manifest, tensors


# ---- optimizer state by parameter name --------------------------------------------------------------
def optimizer_param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The names of ``opt``'s parameters in the order its state dict numbers them (group by group)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = []
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) not in name_of:
                raise CheckpointError(f"the optimizer holds a parameter of shape {list(p.shape)} that is not "
                                      f"one of the {type(model).__name__}'s")
            names.append(name_of[id(p)])
    return names


def _check_moments(where: str, entry: dict, name: str, shape: torch.Size, position: str = "") -> None:
    for key, value in entry.items():
        if torch.is_tensor(value) and value.dim() and value.shape != shape:
            raise CheckpointError(f"{where}: the optimizer's {key} for parameter {name!r}{position} has shape "
                                  f"{list(value.shape)}, the parameter has {list(shape)}")


def _check_by_position(where: str, state: dict, names: list[str], shapes: dict[str, torch.Size]) -> None:
    """``names[k]`` is the parameter numbered k: count and every moment's shape must fit."""
    ids = [i for group in state["param_groups"] for i in group["params"]]
    if len(ids) != len(names):
        raise CheckpointError(f"{where}: the optimizer state covers {len(ids)} parameters, not {len(names)}")
    for k, (i, name) in enumerate(zip(ids, names)):
        _check_moments(where, state["state"].get(i, {}), name, shapes[name], f" (#{k} in order)")


def match_optimizer_state(state: dict, saved_names: list[str] | None, model: torch.nn.Module,
                          opt: torch.optim.Optimizer, where: str = "checkpoint") -> dict:
    """The optimizer state dict ``state`` (read from a checkpoint) renumbered for ``opt``, so that
    ``opt.load_state_dict`` gives each parameter its own moments whatever order the model registers its
    modules in. ``saved_names``: the parameter names in the saved numbering (``param_names``).

    Checkpoints written before the names were recorded: their model tensors cannot tell the old order
    (safetensors stores tensors sorted by dtype and name), so the saved numbering is taken as today's
    when every saved moment has the shape of today's parameter at its position, as ``load_state_dict``
    always assumed; otherwise ``record_param_names`` can add the names. Every mismatch raises
    ``CheckpointError`` naming the parameter."""
    current = optimizer_param_names(model, opt)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    saved_groups = state["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise CheckpointError(f"{where}: the optimizer state has {len(saved_groups)} parameter group(s), "
                              f"this optimizer {len(opt.param_groups)}")
    if saved_names is None:  # an older checkpoint: positions only, checked by shape
        try:
            _check_by_position(where, state, current, shapes)
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}. The checkpoint predates recorded parameter names, and this model registers its parameters "
                "in another order than the code that wrote it: add their names in that order with "
                "starflow.train.checkpoint.record_param_names(<checkpoint>, <names>), where <names> is "
                "[n for n, _ in model.named_parameters()] for a model built by that code") from None
        return state
    saved_ids = [i for group in saved_groups for i in group["params"]]
    if len(saved_names) != len(saved_ids) or len(set(saved_names)) != len(saved_names):
        raise CheckpointError(f"{where}: its {len(saved_names)} param_names do not number the optimizer's "
                              f"{len(saved_ids)} parameters one each")
    name_of_saved = dict(zip(saved_ids, saved_names))
    position = {name: k for k, name in enumerate(current)}
    groups, first = [], 0
    for g, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        names = current[first: first + len(group["params"])]
        first += len(group["params"])
        was = {name_of_saved[i] for i in saved["params"]}
        missing, extra = [n for n in names if n not in was], sorted(was - set(names))
        if missing:
            raise CheckpointError(f"{where}: the model's parameter {missing[0]!r} has no optimizer state in "
                                  f"parameter group {g} of the checkpoint")
        if extra:
            raise CheckpointError(f"{where}: the checkpoint's optimizer holds parameter {extra[0]!r}, which is not "
                                  f"in parameter group {g} of this model's optimizer")
        groups.append({**saved, "params": [position[name] for name in names]})
    renumbered = {}
    for i, entry in state["state"].items():
        name = name_of_saved[i]
        _check_moments(where, entry, name, shapes[name])
        renumbered[position[name]] = entry
    return {"state": renumbered, "param_groups": groups}


def record_param_names(path: str, names: list[str]) -> dict:
    """Write the parameter names into an older full checkpoint's manifest, so that a model registering its
    modules in another order can resume from it. ``names``: the model's parameter names in the order the
    code that wrote the checkpoint registered them (its ``named_parameters()``, the optimizer's numbering).
    Checked against the checkpoint itself: every name is one of its model's tensors and every optimizer
    moment has that tensor's shape. Returns the new manifest."""
    manifest, tensors = load_checkpoint(path, FULL_STEMS)
    rest = manifest.get("optimizer")
    if manifest.get("format", "full") != "full" or not isinstance(rest, dict):
        raise CheckpointError(f"{path}: not a full checkpoint with optimizer state")
    names = list(names)
    unknown = [n for n in names if n not in tensors["model"]]
    if unknown or len(set(names)) != len(names):
        raise CheckpointError(f"{path}: {unknown[0]!r} is not one of the checkpoint's parameters" if unknown
                              else f"{path}: a parameter name is listed twice")
    state = unflatten_optimizer(tensors["optimizer"], rest)
    _check_by_position(path, state, names, {n: tensors["model"][n].shape for n in names})
    if rest.get("param_names") not in (None, names):
        raise CheckpointError(f"{path}: already records other parameter names")
    manifest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    manifest["optimizer"] = {**rest, "param_names": names}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    atomic_write_bytes(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest
