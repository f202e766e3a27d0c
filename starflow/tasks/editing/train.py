"""Training an edit model with the project trainer (``python -m starflow.tasks.editing``)."""
from __future__ import annotations

import os

import torch

from starflow.components.autoencoder import resolve_autoencoder
from starflow.components.text_encoder import TextEncoder
from starflow.flow.config import FlowConfig
from starflow.train.config import TrainConfig
from starflow.data.captioned import TextTable
from starflow.flow.condition import Condition
from starflow.pipeline import StarflowPipeline
from starflow.tasks.editing.data import EditDataset
from starflow.tasks.editing.model import EditPipeline, EditSTARFlow
from starflow.tasks.encode import to_model_space
from starflow.train.trainer import Trainer

# ---------------------------------------------------------------------------------------------------
# Training (the project trainer)
# ---------------------------------------------------------------------------------------------------


class _EditTrainingSet(torch.utils.data.Dataset):
    """Targets in model space (uint8 pixels, dequantised by the trainer, or latents) + example ids as labels."""

    def __init__(self, targets: torch.Tensor):
        self.targets = targets
        self.ids = torch.arange(len(targets))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.targets[i], self.ids[i]

    def get_batch(self, idx):
        return self.targets[idx], self.ids[idx]


def build_edit_trainer(model: EditSTARFlow, data: EditDataset, train_cfg, text_encoder, autoencoder=None,
                       decoder=None):
    """A project ``Trainer`` that fits ``model`` on ``data``: x = target (model space), condition =
    (instruction states, source in model space). ``train_cfg`` is a ``TrainConfig``. ``autoencoder`` encodes
    sources and targets (latent models); ``decoder`` (default: the same) is what the exported pipeline
    decodes with (e.g. a decoder fine-tuned on noisy latents)."""
    src = torch.stack([data[i][0] for i in range(len(data))])
    tgt = torch.stack([data[i][1] for i in range(len(data))])
    pipe_probe = EditPipeline(model, autoencoder, text_encoder, train_cfg.noise_std)

    with torch.no_grad():
        sources = torch.cat([to_model_space(pipe_probe, src[i:i + 256]) for i in range(0, len(src), 256)]).cpu()
        targets = tgt if autoencoder is None else torch.cat(
            [to_model_space(pipe_probe, tgt[i:i + 256]) for i in range(0, len(tgt), 256)]).cpu()
    texts = sorted(set(data.instructions))
    table = TextTable(text_encoder, texts)
    which = torch.tensor([texts.index(t) for t in data.instructions])

    def condition_fn(ids):
        ids = ids.cpu()
        states, mask, _ = table.lookup(which[ids])
        dev = next(model.parameters()).device
        return {"cond": Condition(text=states.to(dev), text_mask=mask.to(dev), source=sources[ids].to(dev))}

    preview_idx = torch.arange(min(16, len(data)))

    def factory(m):
        dec = decoder or autoencoder
        # a decoder fine-tuned on noisy latents cleans samples itself; otherwise one Tweedie step does
        denoise = "decoder" if dec is not None and getattr(dec, "decoder_noise_sigma", None) else "tweedie"
        p = EditPipeline(m, dec, text_encoder, train_cfg.noise_std, denoise)
        p.preview_sources = sources[preview_idx]
        return p

    preview = {"prompt": [data.instructions[int(i)] for i in preview_idx]}
    return Trainer(model, _EditTrainingSet(targets), train_cfg, condition_fn=condition_fn, preview=preview,
                   pipeline_factory=factory)


# The recipe of a latent edit model trained from scratch: the architecture of configs/shapes_t2i.yaml but
# 2x2 latent patches (16 tokens of 16 dims instead of 64 of 4), which made a training step ~4x cheaper on
# the shared 2-core CPU (measured 0.65 s vs ~3 s per batch of 64).
SCRATCH_CONFIG = dict(in_channels=4, image_size=8, patch_size=2, width=128, head_dim=32, num_blocks=4,
                      layers_per_block=1, deep_layers=6, cond_dim=384, max_text_tokens=32, cond_drop_prob=0.1)


def train_main(argv=None) -> str:
    """``python -m starflow.tasks.editing``: train (or fine-tune with --base) an edit model on EditDataset('train').

    With ``--base DIR`` (a text-to-image pipeline, e.g. starflow/assets/starflow_shapes) every weight, the
    autoencoder, the text encoder and noise_std come from it (the paper's fine-tuning). Without it a latent
    model of ``SCRATCH_CONFIG`` is trained from scratch on the shipped shapes autoencoder."""
    import argparse


    p = argparse.ArgumentParser(prog="python -m starflow.tasks.editing", description=train_main.__doc__.split("\n")[0])
    p.add_argument("--base", help="text-to-image pipeline to fine-tune (default: train from scratch)")
    p.add_argument("--autoencoder", default="shapes", help="scratch only: encoder (shipped name or directory)")
    p.add_argument("--decoder", default="shapes_ft", help="scratch only: decoder to ship (shipped name or directory); "
                                                        "one not fine-tuned on noisy latents ships with Tweedie cleaning")
    p.add_argument("--text-encoder", default="minilm", help="scratch only")
    p.add_argument("--noise-std", type=float, default=0.3, help="scratch only: latent noise of training")
    p.add_argument("--size", type=int, default=8000, help="training triples")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out-dir", default="runs/edit")
    p.add_argument("--ship", help="copy the exported pipeline here (e.g. starflow/assets/starflow_edit)")
    p.add_argument("--resume", default="auto", help="'auto' (latest valid checkpoint in --out-dir), 'none', or a path")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.base:
        base = StarflowPipeline.from_pretrained(args.base)
        if base.text_encoder is None:
            raise ValueError(f"{args.base} is not a text-conditional pipeline")
        model = EditSTARFlow.from_base(base.model)
        encoder = decoder = base.autoencoder
        text_encoder, noise_std = base.text_encoder, base.noise_std
    else:
        encoder, decoder = resolve_autoencoder(args.autoencoder), resolve_autoencoder(args.decoder)
        text_encoder, noise_std = TextEncoder.from_pretrained(args.text_encoder), args.noise_std
        model = EditSTARFlow(FlowConfig(**SCRATCH_CONFIG))
    side = model.config.image_size * (encoder.downsample if encoder is not None else 1)
    data = EditDataset("train", size=args.size, image_size=side)
    cfg = TrainConfig(out_dir=args.out_dir, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      noise_std=noise_std, warmup_steps=min(100, args.steps // 10 + 1), ema_decay=0.995,
                      ckpt_every=250, sample_every=max(args.steps, 1), log_every=50, seed=args.seed, device="cpu")
    trainer = build_edit_trainer(model, data, cfg, text_encoder, encoder, decoder)
    out = trainer.train(resume=None if args.resume == "none" else args.resume)
    print(f"exported edit pipeline -> {out}")
    if args.ship:
        pipe = EditPipeline.from_pretrained(out)
        recipe = ("python -m starflow.tasks.editing " + " ".join(argv if argv is not None else __import__("sys").argv[1:]))
        save_shipped(pipe, args.ship, recipe)
        print(f"shipped (float16 weights) -> {args.ship}")
    return out


def save_shipped(pipe: EditPipeline, directory: str, recipe: str = "") -> None:
    """Write an edit pipeline for shipping: the flow and the autoencoder stored as float16 (loaded back as
    float32), plus RECIPE.md with the command that trained it."""
    import shutil

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



if __name__ == "__main__":
    train_main()
