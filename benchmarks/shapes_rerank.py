"""Does the flow know which of its samples follow the prompt? Best-of-K by its own exact likelihood.

For each of 300 validation prompts (scene seed 7, never the test prompts) draw K samples at the given
settings and keep the one with the highest pointwise mutual information log p(x|c) - log p(x|null) (the
"implicit classifier" that guidance amplifies) or the highest log p(x|c); ShapesEval scores the first
sample, both picks, and the oracle (any of the K correct), so the picks are read against their ceiling.

    python benchmarks/shapes_rerank.py --k 4 --guidance 0.5 --temperature 0.3
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="shapes")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--guidance", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--num-prompts", type=int, default=300)
    p.add_argument("--scene-seed", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from starflow.data.shapes import ShapesDataset
    from starflow.evaluation import shapes_eval
    from starflow.io.images import to_uint8
    from starflow.pipeline import StarflowPipeline

    pipe = StarflowPipeline.from_pretrained(a.checkpoint)
    scenes = ShapesDataset("test", size=a.num_prompts, image_size=pipe.image_shape[-1], seed=a.scene_seed)
    model, picks, t0 = pipe.model, {"first": [], "pmi": [], "log_p": [], "oracle": []}, time.time()
    for i in range(0, a.num_prompts, a.batch_size):
        prompts = scenes.captions[i:i + a.batch_size]
        cond = pipe.prompt_condition(prompts)
        passed, pmi, log_p = [], [], []
        for k in range(a.k):
            x = model.sample(len(prompts), cond=cond, guidance=a.guidance, temperature=a.temperature,
                             generator=torch.Generator().manual_seed(i + 1000 * k))
            with torch.no_grad():
                lp, lp_null = model.log_prob(x, cond=cond), model.log_prob(x, cond=cond.null())
            images = to_uint8(pipe.finish(x, cond=cond))
            passed.append([shapes_eval.score(im.permute(1, 2, 0).numpy(), scenes.specs[i + j])["passed"]
                           for j, im in enumerate(images)])
            pmi.append(lp - lp_null)
            log_p.append(lp)
        passed, pmi, log_p = np.array(passed), torch.stack(pmi), torch.stack(log_p)
        cols = np.arange(len(prompts))
        picks["first"] += list(passed[0])
        picks["oracle"] += list(passed.max(0))
        picks["pmi"] += list(passed[pmi.argmax(0).numpy(), cols])
        picks["log_p"] += list(passed[log_p.argmax(0).numpy(), cols])
    print(f"{a.checkpoint}: K {a.k}, w {a.guidance:g}, T {a.temperature:g}, {a.num_prompts} prompts of scene seed "
          f"{a.scene_seed}, {time.time() - t0:.0f}s; share of prompts whose kept image passes ShapesEval:")
    for name, v in picks.items():
        print(f"  {name:7s} {np.mean(v):.3f}")


if __name__ == "__main__":
    main()
