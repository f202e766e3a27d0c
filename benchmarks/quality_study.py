"""Quality study: short training runs of one recipe with one choice changed, scored the same way.

For every arm of a study: train `--steps` steps from the study's base recipe with the arm's overrides
(`starflow train --set ...`, one thread), then score the exported model with `starflow eval` at a fixed
number of samples: test NLL (nats/dim in the model's space, bits/dim for pixel models), classifier
accuracy of unguided samples at temperature 1 and of guided ones, FD-EffNetLite0 and precision/recall
against the held-out split (with the real-vs-real baseline at the same n). Each arm records its wall
time (CPU minutes on this machine, one thread) and the fraction of the measured fp32 matmul peak its
training achieved. Results: benchmarks/results/quality_study_<study>.json (one record per arm,
rewritten after every arm so a stopped study keeps what it finished) and a figure of the training
loss against CPU minutes, docs/images/quality_study_<study>.png.

    python benchmarks/quality_study.py --study mnist --steps 300 --num-samples 300
    python benchmarks/quality_study.py --study mnist --arms base,width256 --steps 300   # a subset
    python benchmarks/quality_study.py --steps 1000 --num-samples 500 --device cuda      # every arm, on a GPU

Runs train in `--runs-dir` (default runs/quality_<study>); an arm whose exported model exists is only
re-scored, so an interrupted study continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

@dataclass
class Study:
    """One recipe (`base` + `common` overrides) and its arms, each changing one thing against it.

    `metrics` are what `starflow eval` scores (an unconditional pixel study has no classes to check);
    an arm may set its own `train.steps` so that arms of different cost get the same CPU minutes.
    """
    base: str
    arms: dict
    common: dict = field(default_factory=dict)
    metrics: str = "fd,pr,acc,nll"


STUDIES = {
    # The latent recipe of configs/mnist_latent.yaml: 4x7x7 latents, sigma 0.3, width 192, deep 6 + 3 shallow.
    "mnist": Study("configs/mnist_latent.yaml", {
        "base": {},
        "width128": {"model.width": 128},
        "width256": {"model.width": 256},
        "deep3_shallow6": {"model.deep_layers": 3, "model.num_blocks": 7},       # same layer count as base
        "deep8_shallow1": {"model.deep_layers": 8, "model.num_blocks": 2},       # Prop. 1: T >= 2 suffices
        "lr3e-4": {"train.lr": 3e-4},
        "lr2e-3": {"train.lr": 2e-3},
        "sigma0.1": {"train.noise_std": 0.1, "train.decoder": "mnist"},        # ft decoder is tuned for 0.3
        "sigma0.5": {"train.noise_std": 0.5, "train.decoder": "mnist"},
        "batch128": {"train.batch_size": 128},
        "ema0.99": {"train.ema_decay": 0.99},
        "pixel": {"model.in_channels": 1, "model.image_size": 28, "model.patch_size": 4,
                  "train.autoencoder": None, "train.decoder": None, "train.noise_std": 0.1},
    }),
    # Pixel-space likelihood (uniform dequantisation only) on one-pixel shifts of the 4,500 digits; each
    # arm's steps give it about 10 CPU minutes at its measured one-thread speed (base 126 images/s,
    # width256 34, patch2 24, blocks8 77), so the arms compare at equal compute, not equal steps. The recipe
    # file has carried the winning input spline since session 15; the study's base is the recipe without it.
    "pixel": Study("configs/mnist_pixel_likelihood.yaml", {
        "base": {"train.steps": 1150},
        "width256": {"model.width": 256, "model.head_dim": 64, "train.steps": 320},    # 6.4 M parameters
        "patch2": {"model.patch_size": 2, "train.steps": 230},                          # 196 tokens of 4 dims
        "blocks8": {"model.num_blocks": 8, "train.steps": 720},                          # 7 shallow blocks
        "spline": {"model.input_spline_bins": 32, "train.steps": 1150},                   # + input spline (same speed)
    }, common={"train.shift_augment": 1, "train.ema_decay": 0.995, "model.input_spline_bins": 0}, metrics="nll"),
}


def _cli(args: list[str], log_path: str) -> float:
    """Run a starflow command from this tree in a fresh process; returns its wall time in seconds."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    with open(log_path, "a") as log:
        code = subprocess.call([sys.executable, "-c", "import sys; from starflow.cli import main; sys.exit(main())",
                                *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"starflow {args[0]} failed with exit code {code}; see {log_path}")
    return time.perf_counter() - start


def _last_line(path: str) -> str:
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else ""


def _yaml_value(v) -> str:
    return "null" if v is None else json.dumps(v)


def _eval(model_dir: str, out: str, n: int, log: str, extra: list[str]) -> dict:
    _cli(["eval", model_dir, "--num-samples", str(n), "--out", out, "--quiet", *extra], log)
    with open(out) as f:
        return json.load(f)["metrics"]


def _flop_fraction(run_dir: str, steps: int, batch: int, seconds: float, peak: float) -> float | None:
    from flops import forward_flops

    from starflow.flow.config import FlowConfig

    model_dir = os.path.join(run_dir, "model")
    nested = os.path.join(model_dir, "model", "config.json")  # a pipeline folder keeps the flow in model/
    with open(nested if os.path.exists(nested) else os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    names = set(FlowConfig.__dataclass_fields__)
    fwd = forward_flops(FlowConfig(**{k: v for k, v in cfg.items() if k in names}))
    return 3 * fwd * batch * steps / seconds / peak  # forward + backward ~ 3x forward


def run_arm(name: str, arm: str, study: Study, a) -> dict:
    run_dir = os.path.join(a.runs_dir, arm)
    log = os.path.join(run_dir + ".log")
    os.makedirs(a.runs_dir, exist_ok=True)
    overrides = {"train.steps": a.steps, **study.common, **study.arms[arm]}
    steps = overrides["train.steps"]
    sets = [f"{k}={_yaml_value(v)}" for k, v in {**overrides, "train.warmup_steps": min(100, steps // 6),
                                                 "train.out_dir": run_dir}.items()]
    rec = {"study": name, "arm": arm, "overrides": overrides, "steps": steps, "device": a.device}
    if not os.path.isdir(os.path.join(run_dir, "model")):
        args = ["train", "--config", study.base, "--threads", "1", "--resume", "auto", "--device", a.device]
        for s in sets:
            args += ["--set", s]
        seconds = _cli(args, log)
        with open(os.path.join(run_dir, "train_seconds.json"), "w") as f:
            json.dump({"train_seconds": seconds}, f)
    with open(os.path.join(run_dir, "train_seconds.json")) as f:
        rec["train_seconds"] = json.load(f)["train_seconds"]  # wall time of the train command, load included
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    losses = [r for r in rows if "loss" in r]
    rec["final_train_loss"] = sum(r["loss"] for r in losses[-4:]) / max(1, len(losses[-4:]))
    rec["cpu_minutes" if a.device == "cpu" else "device_minutes"] = rec["train_seconds"] / 60
    if a.peak and a.device == "cpu":
        rec["flop_fraction_of_fp32_peak"] = _flop_fraction(run_dir, steps, _batch(study.base, overrides),
                                                           rec["train_seconds"], a.peak)
    model_dir = os.path.join(run_dir, "model")
    dev = ["--device", a.device]
    try:
        full = _eval(model_dir, os.path.join(run_dir, "eval.json"), a.num_samples, log, ["--metrics", study.metrics, *dev])
    except RuntimeError as e:  # e.g. a non-finite test NLL: the arm's result, not a reason to stop the study
        rec["eval_error"] = f"{e}: " + _last_line(log)
        return rec
    guided = {"acc": {}}
    if "acc" in study.metrics.split(","):
        guided = _eval(model_dir, os.path.join(run_dir, "eval_guided.json"), a.num_samples, log,
                       ["--metrics", "acc", "--sample-arg", f"guidance={a.guidance}", *dev])
    nll = full["nll"]
    rec.update({
        "nats_per_dim": (nll.get("nats_per_dim") or {}).get("mean"),
        "bits_per_dim": (nll.get("bits_per_dim") or {}).get("mean"),
        "space": nll.get("space"),
        "acc_unguided": full.get("acc", {}).get("accuracy"),
        f"acc_w{a.guidance:g}": guided["acc"].get("accuracy"),
        "fd": full.get("fd", {}).get("value"), "fd_real": (full.get("fd", {}).get("real_baseline") or {}).get("value"),
        "precision": full.get("pr", {}).get("precision"), "recall": full.get("pr", {}).get("recall"),
    })
    return rec


def _batch(base: str, overrides: dict) -> int:
    import yaml

    with open(os.path.join(ROOT, base)) as f:
        return int(overrides.get("train.batch_size", yaml.safe_load(f)["train"]["batch_size"]))


def plot(study: str, runs_dir: str, arms: list[str], path: str, device: str = "cpu") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in arms:
        log = os.path.join(runs_dir, arm, "log.jsonl")
        if not os.path.exists(log):
            continue
        with open(log) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        rows = [r for r in rows if "loss" in r]
        if rows:
            t0 = rows[0]["time"]
            ax.plot([(r["time"] - t0) / 60 for r in rows], [r["loss"] for r in rows], label=arm)
    ax.set_xlabel("CPU minutes (one thread, shared 2-core machine)" if device == "cpu" else f"{device} minutes")
    ax.set_ylabel("training loss (nats/dim)")
    ax.set_title(f"quality study: {study}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="mnist", choices=sorted(STUDIES))
    p.add_argument("--arms", default=None, help="comma-separated subset of the study's arms (default: all)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--num-samples", type=int, default=300, help="samples per FD / accuracy score")
    p.add_argument("--guidance", type=float, default=2.0, help="weight of the guided accuracy column")
    p.add_argument("--runs-dir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--no-peak", dest="peak", action="store_false", help="skip the matmul-peak measurement")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where arms train and are scored")
    a = p.parse_args()
    study = STUDIES[a.study]
    names = a.arms.split(",") if a.arms else list(study.arms)
    unknown = set(names) - set(study.arms)
    if unknown:
        p.error(f"unknown arm(s) {sorted(unknown)}; known: {sorted(study.arms)}")
    a.runs_dir = a.runs_dir or os.path.join(ROOT, "runs", f"quality_{a.study}")
    out = a.out or os.path.join(ROOT, "benchmarks", "results", f"quality_study_{a.study}.json")
    if a.peak and a.device == "cpu":
        import torch
        from flops import measure_matmul_peak

        torch.set_num_threads(1)
        a.peak = measure_matmul_peak()
        print(f"measured fp32 matmul peak, one thread: {a.peak / 1e9:.1f} GFLOP/s")
    records = []
    if os.path.exists(out):
        with open(out) as f:
            records = [r for r in json.load(f)["arms"] if r["arm"] not in names]
    for arm in names:
        print(f"[{time.strftime('%H:%M:%S')}] arm {arm}: {study.arms[arm]}", flush=True)
        rec = run_arm(a.study, arm, study, a)
        records.append(rec)
        print(json.dumps(rec), flush=True)
        with open(out, "w") as f:
            json.dump({"study": a.study, "base": study.base, "common": study.common, "steps": a.steps, "num_samples": a.num_samples,
                       "fp32_matmul_peak_flops": a.peak or None, "arms": records}, f, indent=1)
    # every arm of the study trained in runs_dir so far, not only this invocation's
    plot(a.study, a.runs_dir, list(study.arms), os.path.join(ROOT, "docs", "images", f"quality_study_{a.study}.png"), a.device)
    cols = ["arm", "steps", "cpu_minutes" if a.device == "cpu" else "device_minutes", "nats_per_dim", "bits_per_dim",
            "acc_unguided", f"acc_w{a.guidance:g}", "fd", "fd_real", "precision", "recall"]
    print(" | ".join(cols))
    for r in records:
        print(" | ".join(f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
