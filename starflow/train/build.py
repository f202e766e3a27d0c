"""Everything a recipe needs before the loop starts: data (pixels or cached latents), text table,
model, and the pipeline that wraps it for previews and export.

Edit data (``shapes-edit``) adds the source image of every example: put in the model's space once
(encoded and cached like the targets, or pixel bin centres) and handed to the model as
``Condition.source`` next to the instruction; previews and the export use the edit pipeline, which
``starflow edit`` loads."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from starflow.data import build_dataset
from starflow.data.spaces import bin_centres
from starflow.errors import ConfigError
from starflow.flow.condition import Condition
from starflow.models import model_class
from starflow.train.recipe import RunConfig, record_noise_std
from starflow.train.trainer import Trainer


def _check_shape(shape, mcfg, what: str) -> None:
    expected = (mcfg.in_channels, mcfg.image_size, mcfg.image_size)
    if tuple(shape) != expected:
        raise ValueError(f"{what} has shape {tuple(shape)} but the model expects {expected} "
                         "(model.in_channels, model.image_size)")


def build_trainer(run: RunConfig) -> Trainer:
    mcfg, tcfg = run.model, run.train
    record_noise_std(mcfg, tcfg)
    base = build_dataset(tcfg.dataset, "train", tcfg.image_size, tcfg.channels, tcfg.dataset_size,
                         tcfg.scene_categories)
    if tcfg.shift_augment:
        from starflow.data.augment import ShiftedCopies  # lazy: only the components a recipe uses are imported

        base = ShiftedCopies(base, tcfg.shift_augment)
    dataset, autoencoder, decoder = base, None, None
    if tcfg.autoencoder:
        # lazy: only the components a recipe uses are imported
        from starflow.components.autoencoder import resolve_autoencoder
        from starflow.data.latents import LatentDataset  # lazy: only the components a recipe uses are imported

        autoencoder = resolve_autoencoder(tcfg.autoencoder, image_channels=base.image_shape[0])
        dataset = LatentDataset(autoencoder, base, f"{tcfg.dataset}-{tcfg.dataset_size}", "train")
        _check_shape(dataset.latent_shape, mcfg, f"the {tcfg.autoencoder!r} latent of {tcfg.dataset!r}")
        decoder = resolve_autoencoder(tcfg.decoder) if tcfg.decoder else autoencoder
    elif getattr(mcfg, "buckets", None):
        from starflow.data.buckets import BucketedImages  # lazy: only the components a recipe uses are imported

        if not hasattr(base, "load_pil"):
            raise ValueError("model.buckets (aspect-ratio buckets) needs an image-folder dataset (folder:PATH)")
        dataset = BucketedImages([base.load_pil(p) for p, _ in base.samples], [lab for _, lab in base.samples],
                                 mcfg.image_sizes(), channels=mcfg.in_channels)
    else:
        _check_shape(base.image_shape, mcfg, f"dataset {tcfg.dataset!r}")

    # Seeded initialisation (same recipe and seed -> same weights) without disturbing the global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tcfg.seed)
        model = model_class(run.model_type)(mcfg)
    if tcfg.init_from:
        _start_from(model, tcfg.init_from)
    sources = _edit_sources(base, model, autoencoder, tcfg)
    condition_fn = preview = text_encoder = None
    if tcfg.text_encoder:
        from starflow.data.captioned import TextTable  # lazy: only the components a recipe uses are imported
        from starflow.components.text_encoder import TextEncoder  # lazy: only the components a recipe uses are imported

        if not hasattr(base, "captions"):
            raise ValueError(f"dataset {tcfg.dataset!r} has no captions; text_encoder needs a captioned dataset")
        text_encoder = TextEncoder.from_pretrained(tcfg.text_encoder)
        if getattr(mcfg, "cond_dim", None) != text_encoder.dim:
            raise ValueError(f"model.cond_dim is {getattr(mcfg, 'cond_dim', None)} but the text encoder gives {text_encoder.dim}-d states")
        table = TextTable(text_encoder, base.captions)
        # edit data: labels are example ids, each with its row in the caption table and its source image
        rows = getattr(base, "caption_ids", None)

        def condition_fn(ids):  # one Condition for every family; each reads the fields it needs
            states, mask, pooled = table.lookup(ids if rows is None else rows[ids.cpu()])
            cond = Condition(text=states, text_mask=mask, pooled=pooled)
            return {"cond": cond if sources is None else replace(cond, source=sources[ids.cpu()])}

        if sources is None:
            preview = {"prompt": [base.captions[int(i)] for i in torch.linspace(0, len(base.captions) - 1, 16).long()]}
        else:  # the first examples: their instructions, with their sources given to the edit pipeline
            preview = {"prompt": [base.captions[int(rows[i])] for i in range(min(16, len(base)))]}
    elif getattr(mcfg, "num_classes", 0) and getattr(base, "num_classes", 0) > mcfg.num_classes:
        raise ValueError(f"dataset has {base.num_classes} classes but model.num_classes is {mcfg.num_classes}")

    def pipeline_factory(m):
        if sources is not None:
            from starflow.tasks.editing.model import EditPipeline  # lazy: only the components a recipe uses are imported

            pipe = EditPipeline(m, decoder, text_encoder, tcfg.noise_std)
            pipe.preview_sources = sources[:len(preview["prompt"])]
            return pipe
        from starflow.pipeline import StarflowPipeline  # lazy: only the components a recipe uses are imported

        return StarflowPipeline(m, decoder, text_encoder, tcfg.noise_std)

    return Trainer(model, dataset, tcfg, condition_fn=condition_fn, preview=preview, pipeline_factory=pipeline_factory)


def _edit_sources(base, model, autoencoder, tcfg) -> torch.Tensor | None:
    """The source image of every example in the model's space (None for data without sources): latents
    cached like the targets', or pixel bin centres (the pipeline's own map for pixel models)."""
    if not hasattr(base, "sources"):  # an edit model on other data gets its sources from the caller's condition_fn
        return None
    if not getattr(model.config, "source_prefix", False):
        raise ConfigError(f"model_type: dataset {tcfg.dataset!r} pairs each target with a source image, which "
                          "only an edit model reads (model_type: starflow-edit)")
    if not tcfg.text_encoder:
        raise ConfigError(f"train.text_encoder: dataset {tcfg.dataset!r} conditions on instructions; name a text "
                          "encoder (e.g. minilm)")
    if autoencoder is None:
        return bin_centres(base.sources)
    from starflow.data.latents import LatentDataset  # lazy: only the components a recipe uses are imported

    return LatentDataset(autoencoder, base.source_images(), f"{tcfg.dataset}-{tcfg.dataset_size}-sources",
                         "train").latents


@dataclass(frozen=True)
class AddableSwitch:
    """A model switch a fine-tune may turn on (``train.init_from`` a model without it): its weights start
    as the identity, so the started-from model's function is kept at step 0."""
    switch: str  # the config field that turns it on
    fields: tuple[str, ...]  # other config fields it governs, free to differ when it is added
    weights: str  # the names of its weights contain this

    def owns(self, key: str) -> bool:
        return self.weights in key


ADDABLE_SWITCHES = (
    AddableSwitch("text_positions", (), "condition.text_pos"),  # a zero position table
    AddableSwitch("input_spline_bins", ("input_spline_bound",), "input_spline."),  # knots on the diagonal
)


def _start_from(model, path: str) -> None:
    """Load the weights of the model saved in ``path`` (a model or pipeline folder, or a shipped name) into
    ``model``: a fine-tune. The architectures must match field for field (the training noise and the edit
    flag aside). An edit model started from a plain STARFlow gets every weight and a zero source
    projection (``EditSTARFlow.from_base``, the paper's fine-tuning recipe); a switch in ``ADDABLE_SWITCHES``
    that the recipe turns on and the start lacks keeps its new weights, which start as the identity."""
    from starflow.pipeline import StarflowPipeline  # lazy: only the components a recipe uses are imported

    start = StarflowPipeline.from_pretrained(path).model
    ours, theirs = asdict(model.config), asdict(start.config)
    added = [a for a in ADDABLE_SWITCHES if ours.get(a.switch) and not theirs.get(a.switch)]
    free = {"noise_std", "source_prefix"} | {f for a in added for f in (a.switch, *a.fields)}
    differ = [k for k in sorted(set(ours) | set(theirs)) if k not in free and ours.get(k) != theirs.get(k)]
    if differ:
        listing = ", ".join(f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ[:6])
        raise ConfigError(f"train.init_from: the model in {path} does not match the recipe's model ({listing})")
    if type(start) is not type(model):
        if not (hasattr(type(model), "from_base") and getattr(model.config, "source_prefix", False)):
            raise ConfigError(f"train.init_from: {path} holds a {start.model_type!r} model, the recipe trains "
                              f"{model.model_type!r}")
        start = type(model).from_base(start)
    missing, unexpected = model.load_state_dict(start.state_dict(), strict=False)
    new = [k for k in missing if not any(a.owns(k) for a in added)]
    if new or unexpected:
        raise ConfigError(f"train.init_from: {path} has no weights for {new} and weights nothing here reads: {unexpected}")
