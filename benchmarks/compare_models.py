"""STARFlow vs SD3 rectified flow (MM-DiT) vs FlowAR on one harness, all in one run.

    python benchmarks/compare_models.py                       # shapes, text-conditional, latent space
    python benchmarks/compare_models.py --dataset mnist       # digits, class-conditional, latent space
    python benchmarks/compare_models.py --steps 600 --num-eval 300
    python benchmarks/compare_models.py --speed-only --widths 128,384,768 --batches 32,64,128 --device cuda

Same data, same autoencoder (latent space), same text encoder (MiniLM) or class labels, same trainer,
same number of training images (steps x batch) and parameter counts matched within 10%. STARFlow
trains on latents with sigma=0.3 noise and decodes with the decoder fine-tuned for it (its method);
the peers train on clean latents and decode with the original decoder (theirs).

Prints, per model: parameters, training images/s, FD-EffNetLite0 of samples vs the test split,
ShapesEval overall and per category (shapes) or classifier accuracy (digits), and sampling images/s
at batch 1, 8, 32, 64 (rectified flow at 10, 25 and 50 Euler steps, on SD3's grid unless
--rf-schedule uniform). Small-scale version of the STARFlow paper's Table 1 and Fig. 10a.

``--speed-only`` skips training and evaluation: each family is built at every ``--widths`` entry with
its initial weights (sampling cost does not depend on the weights' values) and only sampling images/s
is timed, so Fig. 10a's speed claim can be checked at sizes too large to train here.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from starflow.flow.config import FlowConfig
from starflow.train.config import TrainConfig
from starflow.train.recipe import RunConfig
from starflow.peers.flowar import FlowARConfig
from starflow.peers.rectified_flow import RectifiedFlowConfig

TEXT_DIM = 384  # MiniLM


def model_configs(dataset: str, width: int, rf_schedule: str = "sd3") -> dict[str, tuple[str, object]]:
    cond = dict(cond_dim=TEXT_DIM) if dataset == "shapes" else dict(num_classes=10)
    side = 8 if dataset == "shapes" else 7
    scales = (1, 2, 4, 8) if side == 8 else (1, 7)
    return {
        "starflow": ("starflow", FlowConfig(in_channels=4, image_size=side, patch_size=1, width=width, head_dim=32,
                                            num_blocks=3, layers_per_block=1, deep_layers=6, **cond)),
        "rectified-flow": ("rectified-flow", RectifiedFlowConfig(in_channels=4, image_size=side, patch_size=1 if side == 7 else 2,
                                                                 width=width, depth=3, heads=width // 32,
                                                                 sample_schedule=rf_schedule, **cond)),
        "flowar": ("flowar", FlowARConfig(in_channels=4, image_size=side, scales=scales, width=width, depth=5,
                                          heads=width // 32, head_width=width, head_depth=2, head_heads=width // 32, **cond)),
    }


def train_one(name, model_type, mcfg, args, out_root):
    from starflow.train.build import build_trainer

    sf = model_type == "starflow"
    tcfg = TrainConfig(dataset=args.dataset, image_size=32 if args.dataset == "shapes" else None,
                       dataset_size=args.dataset_size, autoencoder=args.dataset,
                       decoder=f"{args.dataset}_ft" if sf else None,
                       text_encoder=args.text_encoder if args.dataset == "shapes" else None, device=args.device,
                       noise_std=0.3 if sf else 0.0, out_dir=os.path.join(out_root, name), steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr, warmup_steps=min(100, args.steps // 10),
                       ema_decay=0.995, log_every=max(1, args.steps // 10), ckpt_every=args.steps,
                       sample_every=args.steps)
    trainer = build_trainer(RunConfig(model_type, mcfg, tcfg))
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    return trainer, seconds


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sampling_speed(pipe, kwargs_fn, batches, device, repeats=2):
    out = {}
    for B in batches:
        kw = kwargs_fn(B)
        pipe.sample(B, device=device, **kw)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            _sync()
            t = time.perf_counter()
            pipe.sample(B, generator=torch.Generator(device).manual_seed(0), device=device, **kw)
            _sync()
            best = min(best, time.perf_counter() - t)
        out[B] = B / best
    return out


def speed_only(args, configs_at) -> dict:
    """Sampling images/s of every family at several widths, untrained weights (see the module docstring)."""
    from starflow.components.autoencoder import resolve_autoencoder
    from starflow.components.text_encoder import TextEncoder
    from starflow.models import model_class
    from starflow.pipeline import StarflowPipeline

    batches = [int(b) for b in args.batches.split(",")]
    shapes = args.dataset == "shapes"
    text_encoder = TextEncoder.from_pretrained(args.text_encoder) if shapes else None
    decoder = resolve_autoencoder(args.dataset, device=args.device)
    prompt = args.speed_prompt
    results = {}
    for width in [int(w) for w in args.widths.split(",")]:
        for name, (model_type, mcfg) in configs_at(width).items():
            torch.manual_seed(0)
            model = model_class(model_type)(mcfg).to(args.device).eval()
            pipe = StarflowPipeline(model, decoder, text_encoder, 0.3 if model_type == "starflow" else 0.0)

            def cond(B, steps=None):
                kw = {"prompt": [prompt] * B} if shapes else {"y": (torch.arange(B) % 10).to(args.device)}
                return {**kw, "guidance": args.guidance, **({"steps": steps} if steps else {})}

            if model_type == "rectified-flow":
                speed = {f"{s} steps": sampling_speed(pipe, lambda B, s=s: cond(B, s), batches, args.device)
                         for s in (25, 50)}
            else:
                speed = {"": sampling_speed(pipe, cond, batches, args.device)}
            results.setdefault(width, {})[name] = {"params": model.num_params(), "images_per_s": speed}
            for k, d in speed.items():
                print(f"width {width:>4} {name + (' ' + k if k else ''):<25}{model.num_params() / 1e6:>8.2f}M  "
                      + "  ".join(f"b{B} {v:8.1f}" for B, v in d.items()), flush=True)
            del model, pipe
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="shapes", choices=["shapes", "mnist"])
    p.add_argument("--dataset-size", type=int, default=10000)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--num-eval", type=int, default=300)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--text-encoder", default="minilm", help="minilm, a transformers folder, or table:PATH")
    p.add_argument("--models", default="starflow,rectified-flow,flowar")
    p.add_argument("--rf-schedule", default="sd3", choices=["sd3", "uniform"],
                   help="rectified flow's Euler grid: SD3's reference grid, or the uniform grid of earlier runs")
    p.add_argument("--speed-only", action="store_true", help="time sampling only, untrained weights, at --widths")
    p.add_argument("--widths", default="128,384,768", help="--speed-only: model widths to time")
    p.add_argument("--speed-prompt", default="a red circle", help="--speed-only: the prompt every image gets")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--json", default="benchmarks/results/compare_models.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from starflow.evaluation.features import get_extractor
    from starflow.evaluation.frechet import FeatureStats, compare_stats, reference_stats
    from starflow.io.images import to_uint8
    from starflow.models import model_class

    def configs_at(width):
        return {k: v for k, v in model_configs(args.dataset, width, args.rf_schedule).items() if k in args.models.split(",")}

    if args.speed_only:
        print(f"speed only: dataset {args.dataset}, device {args.device}, guidance w={args.guidance}, untrained weights")
        results = speed_only(args, configs_at)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "speed_only": results}, f, indent=1)
        return
    configs = configs_at(args.width)
    params = {k: model_class(t)(c).num_params() for k, (t, c) in configs.items()}
    ref_params = params.get("starflow", next(iter(params.values())))
    print(f"dataset {args.dataset}, {args.steps} steps x batch {args.batch_size}, threads {args.threads}")
    for k, n in params.items():
        print(f"  {k:<15} {n / 1e6:6.2f}M parameters ({100 * (n / ref_params - 1):+.1f}% vs starflow)")
    if max(params.values()) > 1.1 * min(params.values()):
        print("  WARNING: parameter counts differ by more than 10%")

    # evaluation prompts / labels and the real reference
    extractor = get_extractor("effnetlite0", device=args.device)
    if args.dataset == "shapes":
        from starflow.data.shapes import ShapesDataset
        from starflow.evaluation import shapes_eval

        test = ShapesDataset("test", size=args.num_eval)
        cond_kw = lambda i, j: {"prompt": test.captions[i:j]}  # noqa: E731
        ref, _ = reference_stats("shapes", "test", extractor, images=test.images(), n=args.num_eval)
    else:
        from starflow.data import DigitsDataset
        from starflow.evaluation.classifier import conditional_accuracy

        test = DigitsDataset("mnist", "test")
        labels = torch.arange(args.num_eval) % 10
        cond_kw = lambda i, j: {"y": labels[i:j].to(args.device)}  # noqa: E731
        ref, _ = reference_stats("mnist", "test", extractor, images=test.images)

    results = {}
    for name, (model_type, mcfg) in configs.items():
        print(f"\n== {name}: training", flush=True)
        trainer, seconds = train_one(name, model_type, mcfg, args, args.out)
        pipe = trainer.pipeline(trainer.ema.module)
        guide = {"guidance": args.guidance}
        chunks = []
        t0 = time.time()
        for i in range(0, args.num_eval, 50):
            j = min(i + 50, args.num_eval)
            chunks.append(pipe.sample(j - i, generator=torch.Generator(args.device).manual_seed(i), device=args.device,
                                      **cond_kw(i, j), **guide).cpu())
        images = to_uint8(torch.cat(chunks))
        sample_seconds = time.time() - t0
        fd = compare_stats(FeatureStats.from_features(extractor.extract(images).numpy()), ref)["value"]
        row = dict(params=params[name], train_seconds=seconds,
                   train_images_per_s=args.steps * args.batch_size / seconds, fd=fd, eval_n=args.num_eval,
                   eval_sample_seconds=sample_seconds)
        if args.dataset == "shapes":
            table = shapes_eval.evaluate([im.permute(1, 2, 0).numpy() for im in images], test.specs[:args.num_eval])
            row["shapes_eval"] = {c: v["accuracy"] for c, v in table["categories"].items()}
            row["shapes_eval_overall"] = table["overall"]
        else:
            row["accuracy"] = conditional_accuracy(images, labels)["accuracy"]
        batches = [int(b) for b in args.batches.split(",")]
        def speed_cond(B):
            cond = {"y": (torch.arange(B) % 10).to(args.device)} if args.dataset == "mnist" else {"prompt": [test.captions[0]] * B}
            return {**cond, **guide}

        if model_type == "rectified-flow":
            row["sampling_images_per_s"] = {f"{s} steps": sampling_speed(pipe, lambda B, s=s: {**speed_cond(B), "steps": s},
                                                                         batches, args.device) for s in (10, 25, 50)}
        else:
            row["sampling_images_per_s"] = sampling_speed(pipe, speed_cond, batches, args.device)
        results[name] = row
        print(json.dumps(row, indent=1), flush=True)

    print(f"\n{'model':<15}{'params':>8}{'train img/s':>12}{'FD':>8}{'quality':>9}  sampling img/s at batch {args.batches}")
    for name, r in results.items():
        q = r.get("shapes_eval_overall", r.get("accuracy"))
        sp = r["sampling_images_per_s"]
        speeds = "; ".join(f"{k}: " + ", ".join(f"{v:.1f}" for v in d.values()) for k, d in sp.items()) \
            if isinstance(next(iter(sp.values())), dict) else ", ".join(f"{v:.1f}" for v in sp.values())
        print(f"{name:<15}{r['params'] / 1e6:>7.2f}M{r['train_images_per_s']:>12.1f}{r['fd']:>8.2f}{q:>9.3f}  {speeds}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
