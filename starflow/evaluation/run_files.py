"""Reading a training run folder for the figures: the trainer's ``log.jsonl`` (step and event lines, a
half-written last line skipped), the run's train config, FD points from ``eval/*.json`` reports and the
``samples/step_*.png`` grids. The file formats are described in ``starflow.evaluation.plots``.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re


# ---------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------
def read_log(path: str) -> tuple[list[dict], list[dict], int]:
    """log.jsonl -> (step records with a loss, event records, number of unreadable lines)."""
    records, events, bad = [], [], 0
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(rec, dict) or "step" not in rec:
                bad += 1
            elif "event" in rec:
                events.append(rec)
            elif "loss" in rec or "fd" in rec:
                records.append(rec)
    records.sort(key=lambda r: r["step"])
    return records, events, bad


def run_info(run_dir: str) -> dict:
    """{"space": "pixel" | "latent" | "unknown", "noise_std": float | None, "source": str | None}."""
    cfg, source = None, None
    yml = os.path.join(run_dir, "model", "train_config.yaml")
    if os.path.isfile(yml):
        import yaml

        with open(yml) as f:
            cfg = (yaml.safe_load(f) or {}).get("train")
        source = yml
    if cfg is None:
        manifests = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step_*", "manifest.json")))
        for m in reversed(manifests):
            try:
                with open(m) as f:
                    cfg = json.load(f).get("train_config")
                source = m
                break
            except (OSError, json.JSONDecodeError):
                continue
    if not isinstance(cfg, dict):
        return {"space": "unknown", "noise_std": None, "source": None}
    return {"space": "latent" if cfg.get("autoencoder") else "pixel", "noise_std": cfg.get("noise_std"),
            "source": source}


def _step_from(rep: dict, path: str) -> int | None:
    if isinstance(rep.get("step"), int):
        return rep["step"]
    for text in (str(rep.get("checkpoint", "")), path):
        m = re.search(r"step_(\d+)", text)
        if m:
            return int(m.group(1))
    return None


def fd_points(run_dir: str, records: list[dict]) -> tuple[list[tuple[int, float]], float | None, str]:
    """FD points (step, value) from log lines and eval/*.json reports, the real-data baseline, the metric name."""
    pts, baseline, name = [], None, "FD"
    for r in records:
        v = r.get("fd")
        v = v.get("value") if isinstance(v, dict) else v
        if isinstance(v, (int, float)) and math.isfinite(v):
            pts.append((int(r["step"]), float(v)))
    for path in sorted(glob.glob(os.path.join(run_dir, "eval", "*.json"))):
        try:
            with open(path) as f:
                rep = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        fd = (rep.get("metrics") or {}).get("fd") if isinstance(rep, dict) else None
        step = _step_from(rep, path) if isinstance(rep, dict) else None
        if not isinstance(fd, dict) or fd.get("status", "ok") != "ok" or step is None:
            continue
        if isinstance(fd.get("value"), (int, float)):
            pts.append((step, float(fd["value"])))
            name = fd.get("name", name)
            rb = fd.get("real_baseline")
            if isinstance(rb, dict) and isinstance(rb.get("value"), (int, float)):
                baseline = float(rb["value"])
    return sorted(pts), baseline, name


def sample_grids(run_dir: str) -> list[tuple[int, str]]:
    out = []
    for p in glob.glob(os.path.join(run_dir, "samples", "step_*.png")):
        m = re.fullmatch(r"step_(\d+)\.png", os.path.basename(p))
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)
