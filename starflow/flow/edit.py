"""The edit model: a STARFlow whose config's ``source_prefix`` is forced on, so ``Condition.source`` (the
source image in the model's space) becomes a prefix of the deep block. Registered as ``starflow-edit``;
it keeps the ``source=`` keyword adapters of the older editing API."""
from __future__ import annotations

from dataclasses import replace

import torch

from starflow.flow.condition import Condition
from starflow.flow.config import FlowConfig
from starflow.flow.model import STARFlow


class EditSTARFlow(STARFlow):
    """STARFlow conditioned on a source image (deep-block prefix) and an instruction (text or class)."""

    model_type = "starflow-edit"

    def __init__(self, config: FlowConfig):
        if not config.conditional or config.cond_mode != "prefix":
            raise ValueError("an edit model needs a conditional config with cond_mode='prefix' "
                             "(set cond_dim for text instructions)")
        super().__init__(config if config.source_prefix else replace(config, source_prefix=True))

    @classmethod
    def from_base(cls, base: STARFlow) -> "EditSTARFlow":
        """An edit model initialised from a trained STARFlow: every weight copied, the source projection new
        (zero-initialised, so the source first enters through its position embedding only)."""
        model = cls(base.config)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        new = [k for k in missing if "source_" not in k]
        if new or unexpected:
            raise ValueError(f"base model does not match: missing {new[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            model.blocks[-1].source_proj.weight.zero_()
            model.blocks[-1].source_proj.bias.zero_()
        return model.to(next(base.parameters()).device)

    def make_condition(self, batch, y=None, text=None, device=None, cond=None, source=None):
        """The instruction as ``STARFlow.make_condition`` reads it, plus the source image (``source=`` in the
        model's space [B, C, H, W], or ``cond.source``)."""
        if source is not None:
            if cond is not None and cond.source is not None:
                raise ValueError("give the source image once (source=... or cond.source)")
            base = cond if cond is not None else (Condition.from_args(y, text) or Condition())
            cond, y, text = replace(base, source=source), None, None
        made = super().make_condition(batch, y, text, device, cond)
        if made is None or made.source is None:
            raise ValueError("an edit model needs the source image (source=...)")
        return made

    def forward(self, x, y=None, text=None, cond=None, source=None):
        return super().forward(x, cond=self.make_condition(x.shape[0], y, text, x.device, cond, source))

    def log_prob(self, x, y=None, text=None, cond=None, source=None):
        return super().log_prob(x, cond=self.make_condition(x.shape[0], y, text, x.device, cond, source))

    def nll(self, x, y=None, text=None, source=None, cond=None):
        return -self.log_prob(x, y, text, cond, source=source) / x[0].numel()

    def loss(self, x, y=None, text=None, source=None, cond_drop: torch.Tensor | None = None, cond=None):
        """Mean NLL (nats/dim) of targets x given (instruction, source); the instruction (never the source)
        is dropped to the null as in ``STARFlow.loss``."""
        return super().loss(x, cond_drop=cond_drop, cond=self.make_condition(x.shape[0], y, text, x.device, cond, source))

    @torch.no_grad()
    def inverse(self, z, y=None, text=None, source=None, cond=None, **kwargs):
        return super().inverse(z, cond=self.make_condition(z.shape[0], y, text, z.device, cond, source), **kwargs)
