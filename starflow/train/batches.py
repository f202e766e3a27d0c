"""Batch preparation for ``Trainer``: which examples form the global batch of a step, the
per-example randomness (dequantisation noise, noise augmentation, condition dropout) drawn for the whole
global batch and sliced per rank, so every world size sees the same numbers for row j, and the
``Condition`` each micro-batch's loss reads, with the dropout mask on it.

Condition dropout of training is drawn here, for every model family: the loss of a flow or a peer gets
a ``Condition`` whose ``drop`` rows already read the null, and draws no mask itself (the peers never do;
STARFlow only for a direct caller that gives no mask)."""
from __future__ import annotations

import inspect

import torch

from starflow.data.spaces import add_dequantization_noise
from starflow.flow.condition import Condition


class BatchMixin:
    """Needs ``cfg``, ``dataset``, ``steps_per_epoch``, ``dist``, ``micro_batch``, ``device``, ``model``
    and ``model_class`` on the trainer."""

    def batch_indices(self, step: int) -> torch.Tensor:
        """Indices of the global batch of ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if hasattr(self.dataset, "epoch_batches"):
            return self.dataset.epoch_batches(self.cfg.batch_size, self.cfg.seed, epoch)[i]
        perm = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch))
        return perm[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]

    def _draws_cond_drop(self) -> bool:
        """Whether the trainer draws a condition-dropout mask: a conditional model (class labels or text)
        with ``cond_drop_prob > 0`` whose ``loss`` reads a ``Condition`` (``cond=``), whatever its family.
        A bare ``loss(x, y)`` gets its labels and no mask."""
        c = self.model.config
        conditional = getattr(c, "num_classes", 0) or getattr(c, "cond_dim", 0)
        if not (conditional and getattr(c, "cond_drop_prob", 0) > 0):
            return False
        return "cond" in inspect.signature(self.model_class.loss).parameters

    def loss_condition(self, y: torch.Tensor, drop: torch.Tensor | None) -> dict:
        """Keyword arguments of ``model.loss`` for labels ``y``: ``condition_fn``'s, with the legacy
        ``y`` / ``text`` keywords gathered into one ``Condition`` and the dropout mask ``drop`` on it."""
        kwargs = dict(self.condition_fn(y))
        if drop is None:
            return kwargs
        cond = kwargs.pop("cond", None)
        if cond is None:
            cond = Condition.from_args(kwargs.pop("y", None), kwargs.pop("text", None))
        if cond is not None:
            kwargs["cond"] = cond.with_drop(drop)
        return kwargs

    def get_batch(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """This rank's micro-batches of the global batch of ``step``: ``[(x, y, cond_drop or None), ...]``.

        Random numbers are drawn from the global RNG for all ``batch_size`` rows in a fixed order
        (dequantisation noise, noise augmentation, condition-dropout mask) and sliced, so row j gets the
        same numbers on any world size. Call after seeding the global RNG."""
        B, A, mb = self.cfg.batch_size, self.cfg.grad_accum_steps, self.micro_batch
        lo = self.dist.rank * A * mb
        idx = self.batch_indices(step)[lo:lo + A * mb]
        if hasattr(self.dataset, "get_batch"):
            x, y = self.dataset.get_batch(idx)
        else:
            items = [self.dataset[int(i)] for i in idx]
            x = torch.stack([it[0] for it in items])
            y = torch.stack([torch.as_tensor(it[1]) for it in items])
        x, y = x.to(self.device), y.to(self.device)
        shape = (B, *x.shape[1:])
        rows = slice(lo, lo + A * mb)
        if x.dtype == torch.uint8:  # uniform dequantisation, as starflow.data.spaces.dequantize
            x = add_dequantization_noise(x, torch.rand(shape, device=self.device)[rows])
        else:
            x = x.float()
        if self.cfg.noise_std > 0:
            x = x + self.cfg.noise_std * torch.randn(shape, device=self.device)[rows]
        drop = None  # drawn after the data noise, so the data's random numbers do not depend on it
        if self._draws_cond_drop():
            drop = (torch.rand(B, device=self.device) < self.model.config.cond_drop_prob)[rows]
        return [(x[m * mb:(m + 1) * mb], y[m * mb:(m + 1) * mb], None if drop is None else drop[m * mb:(m + 1) * mb])
                for m in range(A)]

