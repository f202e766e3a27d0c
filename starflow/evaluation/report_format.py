"""The ``starflow eval`` report on the way out: the schema name, a plain-text table, JSON writing and
a schema check (``validate_report``). The report itself is made by ``starflow.evaluation.report``.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from starflow.io.hub import atomic_write_bytes

SCHEMA = "starflow.eval/1"


def _f(x, nd=4):
    return "n/a" if x is None else f"{x:.{nd}f}"


def format_table(report: dict) -> str:
    rows = [("metric", "value", "detail")]
    m = report["metrics"]
    for key in ("fd", "fid"):
        if key in m:
            r = m[key]
            if r["status"] != "ok":
                rows.append((key, "n/a", r.get("reason", "")))
                continue
            detail = f"n_gen={r['n_gen']} n_ref={r['n_ref']} ({report['dataset']}/{report['reference_split']})"
            if r.get("real_baseline"):
                b = r["real_baseline"]
                detail += f"; real train images at n={b['n_real']}: {b['value']:.3f}"
            if r["singular_covariance"]:
                detail += f"; n <= {r['feature_dim']} dims: biased, compare at equal n"
            rows.append((r["name"], f"{r['value']:.3f}", detail))
    if "pr" in m:
        r = m["pr"]
        b = r.get("real_baseline") or {}
        tail = f"; real train images: {b['precision']:.3f} / {b['recall']:.3f}" if b else ""
        rows.append(("precision", _f(r["precision"], 3), f"k={r['k']} n_gen={r['n_gen']} n_ref={r['n_ref']}{tail}"))
        rows.append(("recall", _f(r["recall"], 3), ""))
    if "acc" in m:
        r = m["acc"]
        if r["status"] == "ok":
            ca = r.get("classifier_test_accuracy")
            rows.append(("cond. accuracy", _f(r["accuracy"], 3),
                         f"n={r['n']}; classifier on real test digits: {_f(ca, 3)}"))
        else:
            rows.append(("cond. accuracy", "n/a", r["reason"]))
    if "nll" in m:
        r = m["nll"]
        space = r.get("space", "pixel")
        for key, label in (("nats_per_dim", f"NLL nats/dim ({space})"), ("bits_per_dim", "NLL bits/dim")):
            s = r.get(key)
            if s is None:
                rows.append((label, "n/a", r["reasons"].get(key, "")))
            else:
                extra = f", +N(0, {r['noise_std']:g}^2) noise" if key == "nats_per_dim" and r.get("noise_std") else ""
                rows.append((label, f"{s['mean']:.4f}",
                             f"95% CI [{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}], n={s['n']} {r['split']} images{extra}"))
    w = [max(len(str(row[i])) for row in rows) for i in range(2)]
    lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c}".rstrip() for a, b, c in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    head = (f"starflow eval {report['checkpoint']}  dataset={report['dataset']}  num_samples={report['num_samples']}"
            f"  seed={report['seed']}")
    return "\n".join([head, *lines])


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    return o


def write_json(report: dict, path: str) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(report), indent=2) + "\n").encode())


_TOP_KEYS = {"schema": str, "checkpoint": str, "dataset": str, "reference_split": str, "num_samples": int,
             "seed": int, "device": str, "created": str, "model": dict, "sample_kwargs": dict, "timing_s": dict,
             "warnings": list, "metrics": dict}
_METRIC_KEYS = {
    "fd": {"name", "value", "n_gen", "n_ref", "feature_dim", "singular_covariance", "estimator", "real_baseline"},
    "fid": {"name", "value", "n_gen", "n_ref", "feature_dim", "singular_covariance", "estimator", "real_baseline"},
    "pr": {"precision", "recall", "k", "n_gen", "n_ref", "real_baseline"},
    "acc": {"accuracy", "n", "per_class", "labels", "classifier_test_accuracy"},
    "nll": {"split", "conditioned_on_labels", "space", "noise_std", "nats_per_dim", "bits_per_dim", "reasons"},
}
_STAT_KEYS = {"mean", "std", "sem", "ci95", "confidence", "n", "unit"}


def validate_report(report: dict) -> None:
    """Raise ``ValueError`` if ``report`` does not follow the documented schema."""
    for k, t in _TOP_KEYS.items():
        if k not in report:
            raise ValueError(f"report lacks {k!r}")
        if not isinstance(report[k], t):
            raise ValueError(f"report[{k!r}] should be {t.__name__}, got {type(report[k]).__name__}")
    if report["schema"] != SCHEMA:
        raise ValueError(f"unknown schema {report['schema']!r}")
    if "feature_extractor" not in report:
        raise ValueError("report lacks 'feature_extractor'")
    for name, r in report["metrics"].items():
        if name not in _METRIC_KEYS:
            raise ValueError(f"unknown metric {name!r} in report")
        if r.get("status") not in ("ok", "n/a"):
            raise ValueError(f"metric {name!r}: status must be 'ok' or 'n/a', got {r.get('status')!r}")
        if r["status"] == "n/a":
            if not isinstance(r.get("reason"), str) or not r["reason"]:
                raise ValueError(f"metric {name!r} is n/a without a reason")
            continue
        missing = _METRIC_KEYS[name] - set(r)
        if missing:
            raise ValueError(f"metric {name!r} lacks {sorted(missing)}")
        if name == "nll":
            for key in ("nats_per_dim", "bits_per_dim"):
                if r[key] is not None and _STAT_KEYS - set(r[key]):
                    raise ValueError(f"nll.{key} lacks {sorted(_STAT_KEYS - set(r[key]))}")
