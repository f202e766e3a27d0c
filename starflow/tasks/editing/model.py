"""The edit model (source latent as an extra deep-block prefix) and the pipeline that edits a user's image."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import torch

from starflow.components.autoencoder import Autoencoder
from starflow.components.postprocess import denoise_and_decode
from starflow.components.text_encoder import TextEncoder
from starflow.flow.config import FlowConfig
from starflow.flow.block import FlowBlock
from starflow.flow.condition import Condition
from starflow.flow.model import STARFlow
from starflow.pipeline import INDEX, StarflowPipeline
from starflow.tasks.encode import check_images, float_to_pixels, to_model_space


# ---------------------------------------------------------------------------------------------------
# The edit model
# ---------------------------------------------------------------------------------------------------


# The source image is a field of the one Condition; the old name stays importable.
EditCondition = Condition


# The deep block reads the source prefix itself when the config's ``source_prefix`` is set.
SourcePrefixBlock = FlowBlock


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


# ---------------------------------------------------------------------------------------------------
# Pipeline: edit a user's image
# ---------------------------------------------------------------------------------------------------


class EditPipeline(StarflowPipeline):
    """A StarflowPipeline around an EditSTARFlow. ``edit(images, instructions)`` -> uint8 images.
    ``sample`` (used by the trainer's previews) edits ``preview_sources`` when no source is given."""

    preview_sources: torch.Tensor | None = None

    @torch.no_grad()
    def edit(self, images: torch.Tensor, instructions, guidance: float = 0.0, guidance_rule: str = "starflow",
             temperature: float = 1.0, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
        images = check_images(self, images)
        x = self.sample(images.shape[0], prompt=instructions, source=images, guidance=guidance,
                        guidance_rule=guidance_rule, temperature=temperature, generator=generator, **kwargs)
        return float_to_pixels(self, x).cpu()

    @torch.no_grad()
    def sample(self, n, y=None, prompt=None, generator=None, device=None, source=None, **kwargs):
        if source is None:
            if self.preview_sources is None:
                raise ValueError("editing needs source images")
            source = self.preview_sources[torch.arange(n) % len(self.preview_sources)]
        if source.dtype == torch.uint8:
            source = to_model_space(self, source)
        source = source.to(self.device)
        if isinstance(prompt, str):
            prompt = [prompt] * n
        if prompt is not None and any(not p.strip() for p in prompt):
            raise ValueError("empty instruction")
        text = self.encode_prompts(prompt) if prompt is not None else None
        model = self.model
        x = model.sample(n, y=y, text=text, generator=generator, device=device or self.device, source=source, **kwargs)
        return denoise_and_decode(x, self.denoise, self.noise_std,
                                  lambda v: model.log_prob(v, y, text, source=source), self.autoencoder)

    @classmethod
    def from_pretrained(cls, directory: str, device="cpu", denoise: str | None = None) -> "EditPipeline":
        index_path = os.path.join(directory, INDEX)
        if not os.path.exists(index_path):
            raise FileNotFoundError(f"{directory} has no {INDEX}; is it a saved edit pipeline?")
        with open(index_path) as f:
            index = json.load(f)
        model = EditSTARFlow.from_pretrained(os.path.join(directory, index["model"]), map_location=device)
        autoencoder = text_encoder = None
        if index.get("autoencoder"):
            autoencoder = Autoencoder.from_pretrained(os.path.join(directory, index["autoencoder"]), device=device)
        if index.get("text_encoder"):
            text_encoder = TextEncoder.from_spec(index["text_encoder"]).to(device)
        return cls(model, autoencoder, text_encoder, index.get("noise_std", 0.0), denoise or index.get("denoise"))
