"""Start-up cost of the ``starflow`` command, as ratios to ``python -c "import torch"`` in the same run.

    python benchmarks/startup.py --repeats 5
    python benchmarks/startup.py --repeats 5 --tree /path/to/old/checkout --tree .   # before/after, one run

Times, interleaved round by round so that machine load hits every command alike (wall clock, and the
child's CPU time, which load disturbs less):
  * ``import torch``                       the reference
  * ``starflow --help``                    target <= 0.3x the reference
  * ``starflow generate --prompt ...``     the shipped shapes model end to end (latent: autoencoder and MiniLM
                                           text encoder, both through starflow's own modules since session 10,
                                           diffusers and transformers before), target <= 1.5x
  * ``starflow generate --class 3``        the shipped latent MNIST model (autoencoder, no text encoder)
  * ``starflow generate --model mnist-pixel --class 3``  pixel space: torch and starflow only
Each command runs as a fresh process with one thread, from a temporary folder. ``starflow`` is the console
script installed next to this Python (what a venv runs), not a version manager's shim in front of it,
which would add its own start-up to every command but not to the reference. ``--tree`` puts a checkout
first on PYTHONPATH for the starflow commands (repeat it to compare checkouts within one run). Prints the
medians, the ratios, whether each target is met, and the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TARGETS = {"help": 0.3, "generate_prompt": 1.5}


def starflow_command() -> list[str]:
    beside = os.path.join(os.path.dirname(sys.executable), "starflow")
    if os.path.exists(beside):
        return [beside]
    exe = shutil.which("starflow")
    return [exe] if exe else [sys.executable, "-c", "import sys; from starflow.cli import main; sys.exit(main())"]


def commands(starflow: list[str]) -> dict[str, list[str]]:
    return {
        "help": [*starflow, "--help"],
        "generate_prompt": [*starflow, "generate", "--prompt", "two red circles above a blue square", "-n", "4",
                            "--threads", "1", "--out", "prompt.png"],
        "generate_class": [*starflow, "generate", "--class", "3", "-n", "4", "--threads", "1", "--out", "class.png"],
        "generate_pixel": [*starflow, "generate", "--model", "mnist-pixel", "--class", "3", "-n", "4", "--threads", "1",
                           "--out", "pixel.png"],
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


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="rounds (each runs every command once)")
    p.add_argument("--tree", action="append", default=[],
                   help="a checkout to put first on PYTHONPATH for the starflow commands (repeatable; default: "
                        "the environment as it is)")
    p.add_argument("--out", help="also write the medians and ratios here (JSON)")
    args = p.parse_args()
    starflow = starflow_command()
    base = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if base.pop("PYTHONDONTWRITEBYTECODE", None):
        # as in a default Python: the untimed first round writes the .pyc files (without them every command
        # recompiles starflow's ~70 modules from source, ~0.2 s of CPU that no installed copy pays)
        print("PYTHONDONTWRITEBYTECODE unset for the commands: bytecode cached as in a default environment")
    trees = [os.path.abspath(t) for t in args.tree] or [None]
    envs = {}
    for tree in trees:
        env = dict(base)
        if tree is not None:
            env["PYTHONPATH"] = os.pathsep.join([tree, *filter(None, [base.get("PYTHONPATH")])])
        envs[tree] = env
    jobs = {("", "import_torch"): ([sys.executable, "-c", "import torch"], base)}
    for tree in trees:
        for name, cmd in commands(starflow).items():
            jobs[(tree or "", name)] = (cmd, envs[tree])
    walls = {k: [] for k in jobs}
    cpus = {k: [] for k in jobs}
    load_before = load_average()
    with tempfile.TemporaryDirectory() as cwd:
        for cmd, env in jobs.values():  # warm the OS file cache once; not timed
            timed(cmd, cwd, env)
        for _ in range(args.repeats):
            for key, (cmd, env) in jobs.items():
                wall, cpu = timed(cmd, cwd, env)
                walls[key].append(wall)
                cpus[key].append(cpu)
    load_after = load_average()
    print(f"{args.repeats} interleaved rounds, 1 thread, {os.cpu_count()} CPUs, "
          f"load average {load_before:.1f} before, {load_after:.1f} after; starflow = {' '.join(starflow)}")
    ref = ("", "import_torch")
    ref_w, ref_c = statistics.median(walls[ref]), statistics.median(cpus[ref])
    result = {}
    for tree in trees:
        if tree is not None:
            print(f"-- PYTHONPATH={tree}")
        print(f"{'command':<18}{'wall median s':>14}{'x torch':>9}{'CPU median s':>14}{'x torch':>9}  target")
        for key in [ref] + [k for k in jobs if k[0] == (tree or "") and k != ref]:
            name = key[1]
            w, c = statistics.median(walls[key]), statistics.median(cpus[key])
            target = TARGETS.get(name)
            verdict = ""
            if target is not None:
                met_w, met_c = w / ref_w <= target, c / ref_c <= target
                verdict = f"<= {target}x: wall {'met' if met_w else 'NOT met'}, CPU {'met' if met_c else 'NOT met'}"
            print(f"{name:<18}{w:>14.2f}{w / ref_w:>9.2f}{c:>14.2f}{c / ref_c:>9.2f}  {verdict}")
            result.setdefault(tree or "", {})[name] = {"wall_s": w, "cpu_s": c, "wall_ratio": w / ref_w,
                                                       "cpu_ratio": c / ref_c, "target": target}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"schema": "starflow.startup/2", "repeats": args.repeats,
                       "load_average": [load_before, load_after],
                       "commands": {k: " ".join(v) for k, v in commands(starflow).items()}, "results": result},
                      f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
