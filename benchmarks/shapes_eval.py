"""ShapesEval of a text-to-image model (default: the shipped shapes model), GenEval-style table.

    python benchmarks/shapes_eval.py                         # 300 test prompts (50 per category), w = 2
    python benchmarks/shapes_eval.py --guidance 0,1,2,3 --num-prompts 240
    python benchmarks/shapes_eval.py --guidance default --prompt "two red circles above a blue square" --prompt-images 8

Prompts are the captions of the first N scenes of the shapes *test* split (categories cycle, so every
category gets N/6); each prompt is scored against its own structured spec, from the generated image
alone. Also prints FD-EffNetLite0 against the real test scenes rendered at the model's image size (same n).
``--prompt`` also scores one free prompt (the README's set-up prompt) on ``--prompt-images`` images.
``--guidance default`` uses the model's stored sampling defaults (model_index.json). ``--scene-seed S``
draws the prompts from scenes of another seed: a validation set for choosing sampling settings.
``--round-trip SIGMA`` scores the real scenes sent through the latent space instead: the decoder's ceiling.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


@torch.no_grad()
def round_trip(pipe, scenes, sigma: float, batch_size: int) -> torch.Tensor:
    """Real scenes -> latents + sigma noise -> the pipeline's own cleaning and decoder, in [-1, 1]: what a
    flow whose samples were exactly the noisy latents of real scenes would score."""
    from starflow.tasks import encode as E

    g = torch.Generator().manual_seed(0)
    images, out = scenes.images(), []
    for i in range(0, len(images), batch_size):
        z = E.to_model_space(pipe, images[i:i + batch_size])
        x = z + sigma * torch.randn(z.shape, generator=g).to(z.device)
        _, text = E.condition_args(pipe, len(x), prompt=scenes.captions[i:i + batch_size])
        out.append(pipe.finish(x, text=text).cpu())
    return torch.cat(out)


def main(argv=None):
    from starflow.io.shipped import DEFAULT_TEXT_MODEL

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_TEXT_MODEL)
    p.add_argument("--num-prompts", type=int, default=300)
    p.add_argument("--scene-seed", type=int, default=None,
                   help="prompts from scenes of this seed instead of the test split (a validation set for "
                        "choosing sampling settings without looking at the test prompts)")
    p.add_argument("--guidance", default="2", help="one weight, a comma-separated list, or 'default'")
    p.add_argument("--prompt", default=None, help="also score this prompt (caption grammar) on --prompt-images images")
    p.add_argument("--prompt-images", type=int, default=8)
    p.add_argument("--guidance-rule", default="starflow")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--decoder", default=None, help="decode through this autoencoder of the same latent space")
    p.add_argument("--denoise", default=None, choices=["decoder", "tweedie", "none"],
                   help="how to clean the noisy latent (default: the model's own)")
    p.add_argument("--round-trip", type=float, default=None, metavar="SIGMA",
                   help="score the real prompt scenes sent through the model's latent space (encode, add SIGMA "
                        "noise, clean and decode as samples are) instead of samples: the decoder's ceiling")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="benchmarks/results/shapes_eval.json")
    p.add_argument("--grid", default="docs/images/shapes_samples.png", help="save the first 16 samples here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from starflow.data.shapes import ShapesDataset
    from starflow.evaluation import shapes_eval
    from starflow.evaluation.features import get_extractor
    from starflow.evaluation.frechet import FeatureStats, compare_stats, reference_stats
    from starflow.io.images import save_images, to_uint8
    from starflow.pipeline import StarflowPipeline

    pipe = StarflowPipeline.from_pretrained(args.checkpoint, device=args.device, decoder=args.decoder,
                                            denoise=args.denoise)
    side = pipe.image_shape[-1]
    test = ShapesDataset("test", size=args.num_prompts, image_size=side, seed=args.scene_seed)
    split = "test" if args.scene_seed is None else f"seed{args.scene_seed}"  # the FD reference cache key
    extractor = get_extractor("effnetlite0", device=args.device)
    ref, _ = reference_stats("shapes" if side == 32 else f"shapes{side}", split, extractor, images=test.images(),
                             n=args.num_prompts)
    out = {"checkpoint": args.checkpoint, "prompts": split, "round_trip_sigma": args.round_trip, "decoder": args.decoder, "denoise": pipe.denoise, "n": args.num_prompts, "rule": args.guidance_rule,
           "temperature": args.temperature, "runs": []}
    defaults = pipe.sampling_defaults
    if args.round_trip is not None:
        weights = [None]  # one run, of real scenes instead of samples
    elif args.guidance == "default":
        weights = [defaults.get("guidance", 0.0)]
        args.temperature = defaults.get("temperature", args.temperature)
    else:
        weights = [float(v) for v in args.guidance.split(",")]
    out["temperature"] = args.temperature  # the one the runs use (the model's stored one under 'default')
    for w in weights:
        t0 = time.time()
        if w is None:
            images = to_uint8(round_trip(pipe, test, args.round_trip, args.batch_size))
            what = f"real scenes through the latent space at sigma {args.round_trip:g} (decoder ceiling)"
        else:
            chunks = []
            for i in range(0, args.num_prompts, args.batch_size):
                prompts = test.captions[i:i + args.batch_size]
                chunks.append(pipe.sample(len(prompts), prompt=prompts, guidance=w, guidance_rule=args.guidance_rule,
                                          temperature=args.temperature, device=args.device,
                                          generator=torch.Generator(args.device).manual_seed(i)).cpu())
            images = to_uint8(torch.cat(chunks))
            what = f"guidance w={w:g} ({args.guidance_rule}), T={args.temperature}"
        seconds = time.time() - t0
        table = shapes_eval.evaluate([im.permute(1, 2, 0).numpy() for im in images], test.specs)
        fd = compare_stats(FeatureStats.from_features(extractor.extract(images).numpy()), ref)["value"]
        print(f"\n{what}, {args.num_prompts} {split} prompts, "
              f"{seconds:.0f}s on {args.device}; FD-EffNetLite0 vs the {split} scenes {fd:.1f}")
        print(shapes_eval.format_table(table))
        reasons = shapes_eval.failure_reasons(table)
        print("failures by first reason (" + ", ".join(shapes_eval.REASONS) + "): " + "; ".join(
            f"{c} " + "/".join(str(v[k]) for k in shapes_eval.REASONS) for c, v in reasons.items()))
        out["runs"].append({"guidance": w, "fd": fd, "overall": table["overall"], "failures": reasons,
                            "categories": {c: v["accuracy"] for c, v in table["categories"].items()}})
        if args.grid and len(out["runs"]) == 1:
            save_images(images[:16], args.grid, nrow=4)
    if args.prompt:
        w = defaults.get("guidance", 0.0)
        chosen = {k: defaults[k] for k in ("guidance", "temperature", "guidance_rule") if k in defaults}
        imgs = to_uint8(pipe.sample(args.prompt_images, prompt=[args.prompt] * args.prompt_images, device=args.device,
                                    generator=torch.Generator(args.device).manual_seed(0), **chosen).cpu())
        passed = [shapes_eval.score(im.permute(1, 2, 0).numpy(), args.prompt)["passed"] for im in imgs]
        print(f"\nprompt {args.prompt!r} at the model's defaults ({defaults}): {sum(passed)}/{len(passed)} correct")
        out["prompt"] = {"prompt": args.prompt, "defaults": defaults, "guidance": w, "passed": passed}
        if args.grid:
            save_images(imgs, os.path.splitext(args.grid)[0] + "_prompt.png", nrow=4)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
