"""What a decoder fine-tune decodes when the pipeline cleans its samples with the flow's own Tweedie step.

A latent flow trained on z + σε samples noisy latents; the pipeline's ``denoise: tweedie`` cleans them with
one step x̂ = x̃ + σ² ∇ log p(x̃) before decoding. That step is a posterior *mean*, smoother than any real
latent, so a decoder trained on clean (or on noisy) latents meets inputs at sampling time that it never
saw in training. Fine-tuning it on Tweedie-cleaned noisy latents of the training images — exactly what the
sampling pipeline will hand it — closes that mismatch (``starflow finetune-decoder --clean-with MODEL``).
"""
from __future__ import annotations

import torch

from starflow.components.denoise import tweedie_denoise
from starflow.flow.condition import Condition


def tweedie_cleaned_latents(pipe, images: torch.Tensor, labels: torch.Tensor | None = None, draws: int = 1,
                            seed: int = 0, batch_size: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws`` noisy copies z + σε of every image's latent, each cleaned by ``pipe``'s flow with one Tweedie
    step (σ = the flow's training noise, the class label as its condition). Returns (cleaned latents
    [draws·N, ...] on the CPU, index of each one's image [draws·N])."""
    from starflow.tasks.encode import to_model_space  # lazy: the tasks package pulls in the pipelines

    if pipe.autoencoder is None:
        raise ValueError("--clean-with needs a latent flow (a model folder with an autoencoder)")
    sigma = float(pipe.noise_std)
    if sigma <= 0:
        raise ValueError("--clean-with needs a flow trained on noisy latents (noise_std > 0); this one has none")
    if pipe.is_text_conditional:
        raise ValueError("--clean-with supports unconditional and class-conditional flows, not text-conditional "
                         "ones (the training captions are not kept with the images)")
    if pipe.num_classes and labels is None:
        raise ValueError("a class-conditional flow needs the images' class labels")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.arange(i, min(i + batch_size, len(images))) for i in range(0, len(images), batch_size)]
    latents = [to_model_space(pipe, images[idx]).cpu() for idx in batches]  # encoded once, noised per draw
    out, index = [], []
    for _ in range(draws):
        for idx, z in zip(batches, latents):
            noisy = (z + sigma * torch.randn(z.shape, generator=gen)).to(pipe.device)
            out.append(tweedie_step(pipe, noisy, None if labels is None else labels[idx]).float().cpu())
            index.append(idx)
    return torch.cat(out), torch.cat(index)


def tweedie_step(pipe, noisy: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """``pipe``'s flow cleans noisy latents with one Tweedie step at its training σ, each with its class label
    as the condition (ignored by an unconditional flow): how the pipeline cleans its own samples."""
    cond = Condition.from_args(labels.to(pipe.device) if labels is not None and pipe.num_classes else None)
    return tweedie_denoise(lambda v: pipe.model.log_prob(v, cond=cond), noisy, float(pipe.noise_std))
