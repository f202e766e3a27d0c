"""k-NN manifold precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric
for Assessing Generative Models").

Each set's manifold is the union of balls centred on its feature vectors, the radius of each ball being
the distance to that point's k-th nearest neighbour within the same set (the point itself excluded).

* precision = fraction of generated samples that fall inside the real manifold (fidelity);
* recall    = fraction of real samples that fall inside the generated manifold (coverage).

A point on the boundary (distance == radius) counts as inside. The paper uses k = 3. Both numbers depend
on the sample counts, so compare them at equal n.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["knn_radii", "manifold_membership", "precision_recall"]


def _as_tensor(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    t = t.detach().cpu().double()
    if t.dim() != 2:
        raise ValueError(f"features must be 2-D [n, d], got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("features contain NaN or inf")
    return t


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(features, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point in the same set."""
    f = _as_tensor(features)
    n = len(f)
    if k < 1:
        raise ValueError("k must be >= 1")
    if n <= k:
        raise ValueError(f"k-NN radii need more than k={k} points, got {n}")
    out = []
    for i in range(0, n, chunk):
        d = _pairwise(f[i:i + chunk], f)
        # k+1 smallest includes the point itself (distance 0)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def manifold_membership(manifold, radii: torch.Tensor, queries, chunk: int = 1024) -> torch.Tensor:
    """Bool [n_queries]: is each query within radius_j of some manifold point j."""
    m, q = _as_tensor(manifold), _as_tensor(queries)
    if m.shape[1] != q.shape[1]:
        raise ValueError(f"feature dimensions differ: {m.shape[1]} vs {q.shape[1]}")
    r = radii.double()
    out = []
    for i in range(0, len(q), chunk):
        d = _pairwise(q[i:i + chunk], m)
        out.append((d <= r[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real_features, fake_features, k: int = 3) -> dict:
    real, fake = _as_tensor(real_features), _as_tensor(fake_features)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]} vs generated {fake.shape[1]}")
    real_r = knn_radii(real, k)
    fake_r = knn_radii(fake, k)
    precision = manifold_membership(real, real_r, fake).double().mean().item()
    recall = manifold_membership(fake, fake_r, real).double().mean().item()
    return {"precision": precision, "recall": recall, "k": k, "n_real": len(real), "n_gen": len(fake)}
