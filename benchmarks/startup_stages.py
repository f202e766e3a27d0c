"""Where ``starflow generate --prompt`` (the shipped shapes model) spends its start-up.

    python benchmarks/startup_stages.py --repeats 5

Two views, each from fresh processes with one thread:
  * stages: the command's steps timed inside one process (CPU and wall seconds, medians over the rounds),
    in the order the command meets them: import torch, import starflow, load the shapes pipeline (flow,
    autoencoder and MiniLM through starflow's own modules: no diffusers or transformers since session 10),
    sample 4 images, write the PNG. A module shared by two stages is paid by the first.
  * libraries: one run of the real command under ``python -X importtime``, its import self-times summed
    per library (torch split by sub-package). importtime inflates every import a little; read the shares.
Complements ``benchmarks/startup.py`` (the end-to-end ratios to ``import torch``).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile

PROMPT = "two red circles above a blue square"

# Runs in the child; prints one JSON line {stage: [wall, cpu]} and the heavy modules present at the end.
STAGES = f"""
import json, sys, time
marks = [(time.perf_counter(), time.process_time())]
out = {{}}
def mark(name):
    marks.append((time.perf_counter(), time.process_time()))
    out[name] = [marks[-1][0] - marks[-2][0], marks[-1][1] - marks[-2][1]]
import torch
mark("import torch")
torch.set_num_threads(1)
import starflow.cli.generate, starflow.pipeline, starflow.io.images, starflow.components.autoencoder
mark("import starflow")
from starflow.pipeline import StarflowPipeline
pipe = StarflowPipeline.from_pretrained("shapes")
mark("load shapes pipeline")
images = pipe.sample(4, prompt={PROMPT!r}, generator=torch.Generator().manual_seed(0))
mark("sample 4 images")
from starflow.io.images import save_images
save_images(images, "stages.png")
mark("write PNG")
heavy = ["torch._dynamo", "sympy", "scipy", "scipy.stats", "torch.distributed.tensor", "diffusers", "transformers"]
print(json.dumps({{"stages": out, "loaded": [m for m in heavy if m in sys.modules]}}))
"""


def library(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] in ("torch", "transformers", "diffusers") and len(parts) > 1 else parts[0]


def import_shares(cwd: str, env: dict) -> list[tuple[str, float]]:
    cmd = [sys.executable, "-X", "importtime", "-c", "import sys; from starflow.cli import main; sys.exit(main())",
           "generate", "--prompt", PROMPT, "-n", "4", "--threads", "1", "--out", "importtime.png"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=True)
    totals = collections.Counter()
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = line[len("import time:"):].split("|")
        totals[library(name.strip())] += int(self_us) / 1e6
    return totals.most_common()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=16, help="libraries listed")
    args = p.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    load_before = os.getloadavg()[0]
    runs, loaded = [], []
    with tempfile.TemporaryDirectory() as cwd:
        subprocess.run([sys.executable, "-c", STAGES], cwd=cwd, env=env, capture_output=True, check=True)  # warm
        for _ in range(args.repeats):
            proc = subprocess.run([sys.executable, "-c", STAGES], cwd=cwd, env=env, capture_output=True, text=True,
                                  check=True)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            runs.append(result["stages"])
            loaded = result["loaded"]
        shares = import_shares(cwd, env)
    print(f"{args.repeats} rounds, 1 thread, {os.cpu_count()} CPUs, load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print(f"{'stage':<34}{'wall median s':>14}{'CPU median s':>14}")
    wall_total = cpu_total = 0.0
    for stage in runs[0]:
        w = statistics.median(r[stage][0] for r in runs)
        c = statistics.median(r[stage][1] for r in runs)
        wall_total, cpu_total = wall_total + w, cpu_total + c
        print(f"{stage:<34}{w:>14.2f}{c:>14.2f}")
    print(f"{'sum of medians':<34}{wall_total:>14.2f}{cpu_total:>14.2f}")
    print(f"heavy modules loaded by the end: {', '.join(loaded) or 'none'}")
    total = sum(s for _, s in shares)
    print(f"\nimport self-time by library, one `python -X importtime` run of the command ({total:.2f} s in all):")
    for name, s in shares[:args.top]:
        print(f"  {name:<32}{s:>7.2f} s {100 * s / total:>5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
