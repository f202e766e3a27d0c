"""The pipeline that edits a user's image with an edit model (``starflow.flow.edit.EditSTARFlow``, re-exported
here with the older editing names), and how a trained one is stored for shipping. Training goes through
``starflow train`` (configs/shapes_edit.yaml), which exports an ``EditPipeline`` folder."""
from __future__ import annotations

import json
import os
import shutil

import torch

from starflow.components.autoencoder import Autoencoder
from starflow.components.postprocess import denoise_and_decode
from starflow.components.text_encoder import TextEncoder
from starflow.flow.block import FlowBlock
from starflow.flow.condition import Condition
from starflow.flow.edit import EditSTARFlow
from starflow.pipeline import INDEX, StarflowPipeline
from starflow.tasks.encode import check_images, float_to_pixels, to_model_space


# The source image is a field of the one Condition; the old name stays importable.
EditCondition = Condition


# The deep block reads the source prefix itself when the config's ``source_prefix`` is set.
SourcePrefixBlock = FlowBlock


# ---------------------------------------------------------------------------------------------------
# Pipeline: edit a user's image
# ---------------------------------------------------------------------------------------------------


class EditPipeline(StarflowPipeline):
    """A StarflowPipeline around an EditSTARFlow. ``edit(images, instructions)`` -> uint8 images.
    ``sample`` (used by the trainer's previews) edits ``preview_sources`` when no source is given."""

    preview_sources: torch.Tensor | None = None

    @torch.no_grad()
    def edit(self, images: torch.Tensor, instructions, guidance: float | None = None, guidance_rule: str | None = None,
             temperature: float | None = None, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
        """Settings left None take the model's own (``sampling_defaults``: model_index.json, else the library's)."""
        d = self.sampling_defaults
        guidance = d["guidance"] if guidance is None else guidance
        guidance_rule = d["guidance_rule"] if guidance_rule is None else guidance_rule
        temperature = d["temperature"] if temperature is None else temperature
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


def save_shipped(pipe: EditPipeline, directory: str, recipe: str = "") -> None:
    """Write an edit pipeline for shipping: the flow and the autoencoder stored as float16 (loaded back as
    float32), plus RECIPE.md with the command that trained it."""
    if os.path.exists(directory):
        shutil.rmtree(directory)
    pipe.save_pretrained(directory)
    pipe.model.save_pretrained(os.path.join(directory, "model"), dtype=torch.float16)
    if pipe.autoencoder is not None:
        pipe.autoencoder.save_pretrained(os.path.join(directory, "autoencoder"), dtype=torch.float16)
    with open(os.path.join(directory, "RECIPE.md"), "w") as f:
        f.write("# starflow_edit: instruction-editing model (starflow.tasks.editing.EditSTARFlow)\n\n"
                f"Trained with:\n\n    {recipe}\n\nWeights stored as float16. Scores: benchmarks/apps.py "
                "section [3] (benchmarks/results/apps.txt).\n")
