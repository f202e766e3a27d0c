"""The best sample quality a latent flow can reach through its decoder: FD and precision/recall of
*real* training images sent through the latent space (encode, add the training noise sigma, decode with
the shipped decoder), against the same held-out reference and at the same n as `starflow eval`.

A latent model whose samples were exactly the noisy latents of real images would score this, so a
model's FD target below this figure is out of reach without a better decoder (or less noise); above
it, the gap is the flow's. The real-vs-real baseline is printed beside it.

    python benchmarks/decoder_ceiling.py --encoder mnist --decoder mnist_ft --sigma 0.3 --num-samples 1000
    python benchmarks/decoder_ceiling.py --encoder mnist --decoder mnist --sigma 0.0   # clean round trip
    python benchmarks/decoder_ceiling.py --decoder starflow/assets/starflow_mnist/autoencoder --clean-with mnist

``--clean-with MODEL`` cleans the noisy latents with MODEL's own Tweedie step (each image's class as the
condition) before decoding, as MODEL's pipeline cleans its samples: the ceiling of that whole pipeline.
"""
from __future__ import annotations

import argparse
import json

import torch

from starflow.components.autoencoder import resolve_autoencoder
from starflow.evaluation.report import _load_split, evaluate_model


def pixel_levels(images: torch.Tensor) -> dict:
    """Share of pixels that are exactly black, faint (1-29 of 255) and near white (>= 250): a decoder that
    leaves a faint halo on MNIST's pure-black background is far from the data in feature space although
    the halo is invisible."""
    from starflow.io.images import to_uint8

    t = (images if images.dtype == torch.uint8 else to_uint8(images)).float()
    return {"black": (t == 0).float().mean().item(), "faint": ((t > 0) & (t < 30)).float().mean().item(),
            "bright": (t >= 250).float().mean().item()}


class _RoundTrip(torch.nn.Module):
    """Looks like a model to `evaluate_model`: its "samples" are decoded noisy latents of train images."""

    def __init__(self, images, encoder, decoder, sigma, zero_faint=False, labels=None, clean=None):
        super().__init__()
        self.images, self.encoder, self.decoder, self.sigma = images, encoder, decoder, sigma
        self.zero_faint, self.labels, self.clean = zero_faint, labels, clean
        self.config = {"num_classes": 0}
        self.device = torch.device("cpu")

    @torch.no_grad()
    def sample(self, n, generator=None, **_):
        idx = torch.randint(len(self.images), (n,), generator=generator)
        z = self.encoder.encode(self.images[idx])  # uint8 or [-1, 1] float images
        z = z + self.sigma * torch.randn(z.shape, generator=generator)
        if self.clean is not None:
            z = self.clean(z, None if self.labels is None else self.labels[idx])
        y = self.decoder.decode(z)
        if self.zero_faint:  # diagnostic only: how much of the gap is the faint halo
            y = torch.where(y < -1 + 2 * 30 / 255, torch.full_like(y, -1.0), y)
        return y


def _tweedie(model_name: str):
    """(clean(z, labels), σ): one Tweedie step through the named latent flow, conditioned on the labels."""
    from functools import partial

    from starflow.pipeline import StarflowPipeline
    from starflow.train.decoder_inputs import tweedie_step

    pipe = StarflowPipeline.from_pretrained(model_name, denoise="tweedie")
    return partial(tweedie_step, pipe), float(pipe.noise_std)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--encoder", default="mnist", help="autoencoder (shipped name or folder) whose encoder makes the latents")
    p.add_argument("--decoder", default="mnist_ft", help="autoencoder (shipped name or folder) whose decoder draws them")
    p.add_argument("--sigma", type=float, default=0.3, help="training noise on the normalised latents")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clean-with", default=None, metavar="MODEL",
                   help="clean the noisy latents with this latent flow's Tweedie step before decoding (σ: its own)")
    p.add_argument("--zero-faint", action="store_true",
                   help="diagnostic: set decoded pixels below 30/255 to black before scoring")
    p.add_argument("--out", help="JSON file for the report")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    images, labels = _load_split(a.dataset, "train")
    clean = None
    if a.clean_with:
        clean, a.sigma = _tweedie(a.clean_with)
    model = _RoundTrip(images, resolve_autoencoder(a.encoder), resolve_autoencoder(a.decoder), a.sigma,
                       a.zero_faint, labels, clean)
    rep = evaluate_model(model, ["fd", "pr"], dataset=a.dataset, num_samples=a.num_samples, seed=a.seed,
                         log=lambda *x, **k: None)
    fd, pr = rep["metrics"]["fd"], rep["metrics"]["pr"]
    print(f"{a.encoder} -> +N(0,{a.sigma}^2) -> " + (f"{a.clean_with}'s Tweedie step -> " if a.clean_with else "")
          + f"{a.decoder}, n={a.num_samples}: FD {fd['value']:.1f} "
          f"(real vs real {fd['real_baseline']['value']:.1f}), precision {pr['precision']:.3f} recall "
          f"{pr['recall']:.3f} (real {pr['real_baseline']['precision']:.3f} / {pr['real_baseline']['recall']:.3f})")
    levels = {"real": pixel_levels(images[:a.num_samples]),
              "decoded": pixel_levels(model.sample(a.num_samples, generator=torch.Generator().manual_seed(a.seed)))}
    print("pixel levels (share black / faint 1-29 / >= 250): " + ", ".join(
        f"{k} {v['black']:.3f} / {v['faint']:.3f} / {v['bright']:.3f}" for k, v in levels.items()))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"encoder": a.encoder, "decoder": a.decoder, "sigma": a.sigma, "clean_with": a.clean_with, "pixel_levels": levels, **rep},
                      f, indent=1, default=str)


if __name__ == "__main__":
    main()
