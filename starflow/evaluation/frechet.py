"""Fréchet distance between two sets of image features, and cached reference statistics.

Estimator
---------
Each set of n feature vectors is summarised by its sample mean ``mu`` and its unbiased sample
covariance ``sigma`` (divisor n - 1). The Fréchet (2-Wasserstein) distance between the Gaussians
N(mu1, S1) and N(mu2, S2) is

    FD = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1^1/2 S2 S1^1/2)^1/2)

computed in float64. The trace of the matrix square root, Tr((S1 S2)^1/2), is computed one of two
exactly equivalent ways:

* from the covariances: the eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2
  (``numpy.linalg.eigh``, tiny negative round-off clipped to 0) — no ``scipy.linalg.sqrtm`` and its
  complex round-off; costs a few d x d eigendecompositions;
* from the features, when both sets are at hand and min(n1, n2) < d: with centred feature matrices
  X1 [n1, d], X2 [n2, d], the nonzero eigenvalues of S1 S2 are the squared singular values of
  X1 X2^T / sqrt((n1-1)(n2-1)), so the trace is that matrix's nuclear norm — an n1 x n2 SVD instead of
  d x d eigendecompositions (much faster at the small n used for evaluation).

Bias
----
This plug-in estimator is biased upwards, roughly by a term proportional to 1/n (Chong & Forsyth 2020,
"Effectively Unbiased FID"): two independent samples of the *same* distribution give FD > 0, and FD at
different n is not comparable. With n <= d (feature dimension) the sample covariance has rank at most
n - 1 and is singular; FD is still defined but the bias is large. We therefore:

* refuse n < 2 (no covariance can be estimated) with a ``ValueError``;
* warn (``FDSampleSizeWarning``) and set ``singular_covariance: true`` in every report when n <= d;
* always report both sample counts next to the value, and the evaluation report adds the FD of real
  images against the same reference at the same n (the value a perfect model would get).

Reference statistics
--------------------
:func:`reference_stats` computes the features of a dataset split once and caches mean, covariance and
features in ``<cache_dir>/<dataset>-<split>-<extractor>-n<N>-seed<S>.npz``. ``cache_dir`` defaults to
``$STARFLOW_CACHE_DIR/eval_stats`` or ``~/.cache/starflow/eval_stats``.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import warnings

import numpy as np
import torch

from starflow.data import build_dataset
from starflow.io.hub import atomic_write_bytes

__all__ = [
    "FDSampleSizeWarning",
    "FeatureStats",
    "frechet_distance",
    "fd_from_features",
    "compare_stats",
    "default_cache_dir",
    "reference_stats",
]

CACHE_FORMAT = 1


class FDSampleSizeWarning(UserWarning):
    """n <= feature dimension: the sample covariance is singular and FD is strongly biased."""


@dataclasses.dataclass
class FeatureStats:
    mu: np.ndarray       # [d] float64
    sigma: np.ndarray    # [d, d] float64, unbiased (n - 1)
    n: int
    features: np.ndarray | None = dataclasses.field(default=None, repr=False)  # [n, d], optional

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @property
    def singular(self) -> bool:
        return self.n <= self.dim

    @classmethod
    def from_features(cls, features, warn: bool = True) -> "FeatureStats":
        f = _as_2d_float64(features)
        n, d = f.shape
        if n < 2:
            raise ValueError(
                f"Fréchet distance needs at least 2 samples to estimate a covariance, got n={n}"
            )
        if warn and n <= d:
            warnings.warn(
                f"n={n} samples <= feature dimension {d}: the sample covariance is singular (rank <= {n - 1}) "
                "and FD is biased upwards; compare FD values only at equal n",
                FDSampleSizeWarning,
                stacklevel=2,
            )
        mu = f.mean(axis=0)
        sigma = np.cov(f, rowvar=False, ddof=1)
        return cls(mu=mu, sigma=np.atleast_2d(sigma), n=n, features=f)


def _as_2d_float64(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be 2-D [n, d], got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    return f


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FD between N(mu1, sigma1) and N(mu2, sigma2) (exact for the given parameters)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be [{d}, {d}], got {s1.shape} and {s2.shape}")
    r1 = _sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def _fd_from_feature_matrices(a: FeatureStats, b: FeatureStats) -> float:
    x1 = np.asarray(a.features, np.float64) - a.mu
    x2 = np.asarray(b.features, np.float64) - b.mu
    scale = np.sqrt((a.n - 1) * (b.n - 1))
    tr_covmean = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / scale
    diff = a.mu - b.mu
    fd = float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def compare_stats(a: FeatureStats, b: FeatureStats, method: str = "auto") -> dict:
    """FD value plus the context needed to read it (sample counts, singularity).

    ``method``: ``"covariance"``, ``"features"`` (both stats must carry features) or ``"auto"``
    (features when available and min(n_a, n_b) < d; the two give the same value up to round-off)."""
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} vs {b.dim}")
    have = a.features is not None and b.features is not None
    if method == "auto":
        method = "features" if have and min(a.n, b.n) < a.dim else "covariance"
    if method == "features":
        if not have:
            raise ValueError("method='features' needs both FeatureStats to carry their features")
        fd = _fd_from_feature_matrices(a, b)
    elif method == "covariance":
        fd = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    else:
        raise ValueError(f"unknown method {method!r}")
    singular = a.singular or b.singular
    return {
        "value": fd,
        "n_a": a.n,
        "n_b": b.n,
        "feature_dim": a.dim,
        "singular_covariance": singular,
        "estimator": "plug-in FD with unbiased sample covariances; biased upwards ~1/n",
    }


def fd_from_features(features_a, features_b) -> dict:
    """FD between two feature sets; see :func:`compare_stats` for the returned fields."""
    return compare_stats(FeatureStats.from_features(features_a), FeatureStats.from_features(features_b))


# ----------------------------------------------------------------------------------------------
# cached reference statistics
# ----------------------------------------------------------------------------------------------

def default_cache_dir() -> str:
    root = os.environ.get("STARFLOW_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "starflow")
    return os.path.join(root, "eval_stats")


def _load_split_images(dataset: str, split: str) -> torch.Tensor:
    ds = build_dataset(dataset, split)
    if hasattr(ds, "images"):
        return ds.images
    return torch.stack([ds[i][0] if isinstance(ds[i], (tuple, list)) else ds[i] for i in range(len(ds))])


def _subsample(images: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    if n is None or n == len(images):
        return images
    if n > len(images):
        raise ValueError(f"asked for n={n} reference images but the split has only {len(images)}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=g)[:n].sort().values
    return images[idx]


def reference_stats(dataset: str, split: str, extractor, n: int | None = None, seed: int = 0,
                    cache_dir: str | None = None, images: torch.Tensor | None = None,
                    batch_size: int = 100) -> tuple[FeatureStats, np.ndarray]:
    """Statistics and features of ``n`` images (all when None) of a dataset split, cached on disk.

    ``images`` may be passed to avoid loading the split again (they must be that split). Returns
    ``(FeatureStats, features float32 [n, d])``. The cache key is dataset + split + extractor name + n
    (+ the subsampling seed); a file whose stored key differs is recomputed.
    """
    cache_dir = cache_dir or default_cache_dir()
    tag = f"{dataset}-{split}-{extractor.name}-n{'all' if n is None else n}-seed{seed}"
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in tag)
    path = os.path.join(cache_dir, safe + ".npz")
    meta = {"format": CACHE_FORMAT, "dataset": dataset, "split": split, "extractor": extractor.name,
            "n": n, "seed": seed}
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                stored = json.loads(str(z["meta"]))
                if stored == meta:
                    feats = z["features"]
                    stats = FeatureStats(mu=z["mu"], sigma=z["sigma"], n=int(z["n"]), features=feats)
                    return stats, feats
        except (OSError, ValueError, KeyError):
            pass  # unreadable or stale: recompute
    if images is None:
        images = _load_split_images(dataset, split)
    images = _subsample(images, n, seed)
    feats = extractor.extract(images, batch_size=batch_size).numpy().astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FDSampleSizeWarning)  # callers warn when they compare
        stats = FeatureStats.from_features(feats)
    buf = io.BytesIO()
    np.savez(buf, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n), features=feats,
             meta=np.array(json.dumps(meta, sort_keys=True)))

    atomic_write_bytes(path, buf.getvalue())
    return stats, feats
