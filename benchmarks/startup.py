"""Start-up cost of the ``starflow`` command, as ratios to ``python -c "import torch"`` in the same run.

    python benchmarks/startup.py --repeats 5

Times, interleaved round by round so that machine load hits every command alike (wall clock, and the
child's CPU time, which load disturbs less):
  * ``import torch``                       the reference
  * ``starflow --help``                    target <= 0.3x the reference
  * ``starflow generate --prompt ...``     the shipped shapes model end to end, target <= 1.5x
  * ``starflow generate --class 3``        the shipped MNIST model (pixel space: no autoencoder, no text
                                           encoder), for comparison
Each command runs as a fresh process with one thread, from a temporary folder. Prints the medians, the
ratios and whether each target is met.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TARGETS = {"help": 0.3, "generate_prompt": 1.5}


def commands(starflow: list[str]) -> dict[str, list[str]]:
    return {
        "import_torch": [sys.executable, "-c", "import torch"],
        "help": [*starflow, "--help"],
        "generate_prompt": [*starflow, "generate", "--prompt", "two red circles above a blue square", "-n", "4",
                            "--threads", "1", "--out", "prompt.png"],
        "generate_class": [*starflow, "generate", "--class", "3", "-n", "4", "--threads", "1", "--out", "class.png"],
    }


def timed(cmd: list[str], cwd: str, env: dict) -> tuple[float, float]:
    """(wall seconds, child CPU seconds) of one run; raises if the command fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-1000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="rounds (each runs every command once)")
    p.add_argument("--out", help="also write the medians and ratios here (JSON)")
    args = p.parse_args()
    exe = shutil.which("starflow")
    starflow = [exe] if exe else [sys.executable, "-c", "import sys; from starflow.cli import main; sys.exit(main())"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmds = commands(starflow)
    walls = {k: [] for k in cmds}
    cpus = {k: [] for k in cmds}
    with tempfile.TemporaryDirectory() as cwd:
        for name, cmd in cmds.items():  # warm the OS file cache once; not timed
            timed(cmd, cwd, env)
        for _ in range(args.repeats):
            for name, cmd in cmds.items():
                wall, cpu = timed(cmd, cwd, env)
                walls[name].append(wall)
                cpus[name].append(cpu)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.repeats} interleaved rounds, 1 thread, {os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"{'command':<18}{'wall median s':>14}{'x torch':>9}{'CPU median s':>14}{'x torch':>9}  target")
    ref_w, ref_c = statistics.median(walls["import_torch"]), statistics.median(cpus["import_torch"])
    result = {}
    for name in cmds:
        w, c = statistics.median(walls[name]), statistics.median(cpus[name])
        target = TARGETS.get(name)
        verdict = ""
        if target is not None:
            met_w, met_c = w / ref_w <= target, c / ref_c <= target
            verdict = f"<= {target}x: wall {'met' if met_w else 'NOT met'}, CPU {'met' if met_c else 'NOT met'}"
        print(f"{name:<18}{w:>14.2f}{w / ref_w:>9.2f}{c:>14.2f}{c / ref_c:>9.2f}  {verdict}")
        result[name] = {"wall_s": w, "cpu_s": c, "wall_ratio": w / ref_w, "cpu_ratio": c / ref_c, "target": target}
    if args.out:
        import json

        with open(args.out, "w") as f:
            json.dump({"schema": "starflow.startup/1", "repeats": args.repeats, "load_average": load,
                       "commands": {k: " ".join(v) for k, v in cmds.items()}, "results": result}, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
