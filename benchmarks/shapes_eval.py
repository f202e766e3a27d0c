"""ShapesEval of a text-to-image model (default: the shipped shapes model), GenEval-style table.

    python benchmarks/shapes_eval.py                         # 300 test prompts (50 per category), w = 2
    python benchmarks/shapes_eval.py --guidance 0,1,2,3 --num-prompts 240

Prompts are the captions of the first N scenes of the shapes *test* split (categories cycle, so every
category gets N/6); each prompt is scored against its own structured spec, from the generated image
alone. Also prints FD-EffNetLite0 against the real test scenes (same n).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main(argv=None):
    from starflow.io.shipped import DEFAULT_TEXT_MODEL

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_TEXT_MODEL)
    p.add_argument("--num-prompts", type=int, default=300)
    p.add_argument("--guidance", default="2", help="one weight or a comma-separated list")
    p.add_argument("--guidance-rule", default="starflow")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=50)
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

    pipe = StarflowPipeline.from_pretrained(args.checkpoint, device=args.device)
    test = ShapesDataset("test", size=args.num_prompts)
    extractor = get_extractor("effnetlite0", device=args.device)
    ref, _ = reference_stats("shapes", "test", extractor, images=test.images(), n=args.num_prompts)
    out = {"checkpoint": args.checkpoint, "n": args.num_prompts, "rule": args.guidance_rule,
           "temperature": args.temperature, "runs": []}
    for w in [float(v) for v in args.guidance.split(",")]:
        t0 = time.time()
        chunks = []
        for i in range(0, args.num_prompts, args.batch_size):
            prompts = test.captions[i:i + args.batch_size]
            chunks.append(pipe.sample(len(prompts), prompt=prompts, guidance=w, guidance_rule=args.guidance_rule,
                                      temperature=args.temperature, device=args.device,
                                      generator=torch.Generator(args.device).manual_seed(i)).cpu())
        images = to_uint8(torch.cat(chunks))
        seconds = time.time() - t0
        table = shapes_eval.evaluate([im.permute(1, 2, 0).numpy() for im in images], test.specs)
        fd = compare_stats(FeatureStats.from_features(extractor.extract(images).numpy()), ref)["value"]
        print(f"\nguidance w={w:g} ({args.guidance_rule}), T={args.temperature}, {args.num_prompts} prompts, "
              f"{seconds:.0f}s sampling on {args.device}; FD-EffNetLite0 vs test scenes {fd:.1f}")
        print(shapes_eval.format_table(table))
        out["runs"].append({"guidance": w, "fd": fd, "overall": table["overall"],
                            "categories": {c: v["accuracy"] for c, v in table["categories"].items()}})
        if args.grid and len(out["runs"]) == 1:
            save_images(images[:16], args.grid, nrow=4)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
