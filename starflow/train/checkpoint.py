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


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state dict -> (tensors, JSON-able rest), since safetensors holds tensors only."""
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


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
