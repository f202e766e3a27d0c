"""Mean negative log-likelihood over a data split, with a 95% confidence interval.

``evaluate_nll(fn, images, labels)`` calls ``fn(images_batch, labels_batch)``, which must return one
value per example (nats/dim or bits/dim, whatever the caller measures), and reports the mean over the
split with a Student-t confidence interval for the mean: mean +- t_{0.975, n-1} * s / sqrt(n), s the
sample standard deviation (ddof=1). The interval covers the variability from *which* test examples were
drawn (and from dequantisation noise, when ``fn`` draws it); it says nothing about training-run variance.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["mean_with_ci", "spread_summary", "evaluate_nll"]


def mean_with_ci(values, confidence: float = 0.95) -> dict:
    v = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64).ravel()
    n = v.size
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {n}")
    if not np.isfinite(v).all():
        raise ValueError(f"{int((~np.isfinite(v)).sum())} of {n} per-example values are NaN or inf")
    from scipy.stats import t

    mean = float(v.mean())
    std = float(v.std(ddof=1))
    sem = std / math.sqrt(n)
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sem
    return {"mean": mean, "std": std, "sem": sem, "ci95": [mean - half, mean + half], "confidence": confidence, "n": n}


def spread_summary(values) -> dict:
    """``mean_with_ci``'s mean and the half-width of its 95% Student-t interval (``ci95``), and the
    quantiles that show a heavy tail, of per-example values.

    Unlike ``mean_with_ci`` it accepts inf (a model that maps some image out of range must still be
    scored): the mean and the half-width are then inf."""
    v = values.double().sort().values
    n = len(v)
    q = lambda f: float(v[min(n - 1, int(f * (n - 1) + 0.5))])  # nearest-rank quantile
    keep = v[: n - n // 100]  # the top 1% dropped (nothing below 100 images)
    if n < 2:
        half = float("nan")
    elif not bool(torch.isfinite(v).all()):
        half = float("inf")
    else:
        lo, hi = mean_with_ci(v)["ci95"]
        half = (hi - lo) / 2
    return {"n": n, "mean": float(v.mean()), "ci95": half, "median": q(0.5), "p90": q(0.9), "p99": q(0.99),
            "max": float(v[-1]), "mean_without_top1pct": float(keep.mean())}


def evaluate_nll(fn, images: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 100,
                 unit: str = "nats/dim", seed: int | None = 0) -> dict:
    """Run ``fn`` over ``images`` in batches and summarise the per-example values (see module doc).

    ``seed`` seeds torch's global RNG first, so dequantisation noise drawn inside ``fn`` is repeatable.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if seed is not None:
        torch.manual_seed(seed)
    vals = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size]
            y = None if labels is None else labels[i:i + batch_size]
            out = torch.as_tensor(fn(x, y)).detach().float().cpu()
            if out.shape != (len(x),):
                raise ValueError(f"the NLL function must return one value per example, shape [{len(x)}], "
                                 f"got {tuple(out.shape)}")
            vals.append(out)
    res = mean_with_ci(torch.cat(vals))
    res["unit"] = unit
    return res
