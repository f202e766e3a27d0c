"""Fault drill: SIGKILL a training run at random points, resume it with ``--resume auto`` each time, and
check that no more than one checkpoint interval is lost per kill and that the final weights are
bit-identical to an uninterrupted run's.

    python benchmarks/fault_drill.py                  # 12 kills, 300 steps, checkpoint every 25
    python benchmarks/fault_drill.py --kills 10 --steps 200 --ckpt-every 20 --seed 1

Training is the real CLI (``starflow train``) in a subprocess: a tiny class-conditional STARFlow on
scikit-learn's 8x8 digits, one CPU thread. Each kill lands either at a random step (a random delay
after that step is logged) or while a checkpoint is being written (the drill watches for that
checkpoint's ``.tmp-step_*`` folder and kills as soon as it appears; the "temp left" column says
whether the kill caught the write half-done). The loop is bounded (``--kills`` kills, each attempt
capped by ``--timeout``), then one last resume runs to the end.

Steps lost per kill = last step the killed run logged - step of the checkpoint the next run resumed
from. A kill during a save loses that save, so the target is <= the checkpoint interval.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from starflow.train import checkpoint as ckpt  # noqa: E402

RECIPE = """model:
  image_size: 8
  patch_size: 2
  width: 32
  head_dim: 16
  num_blocks: 3
  layers_per_block: 1
  deep_layers: 2
  num_classes: 10
  cond_drop_prob: 0.1
train:
  dataset: digits
  batch_size: 32
  warmup_steps: 20
  lr: 0.002
  ema_decay: 0.99
  noise_std: 0.05
  log_every: 1
  sample_every: 100000
  keep_last: 2
  ckpt_every: {ckpt_every}
  steps: {steps}
"""

# Same seed before the model is built in every launch, so the uninterrupted run starts from the same
# weights (a resumed run loads them from the checkpoint anyway).
LAUNCH = "import sys, torch; torch.set_num_threads(1); torch.manual_seed(0); from starflow.cli import main; sys.exit(main(sys.argv[1:]))"


def launch(recipe: str, out: str, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-c", LAUNCH, "train", "--config", recipe, "--out-dir", out, "--device", "cpu", "--threads", "1"]
    if resume:
        cmd += ["--resume", "auto"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def read_log(out: str) -> list[dict]:
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by the kill (the trainer closes it before appending)
                pass
    return records


def last_logged_step(out: str) -> int:
    return max((r["step"] for r in read_log(out) if "loss" in r), default=0)


class LogTail:
    """Follows log.jsonl cheaply (reads only what was appended) and tracks the last step logged."""

    def __init__(self, out: str):
        self.path, self.offset, self.step, self.partial = os.path.join(out, "log.jsonl"), 0, 0, b""
        if os.path.exists(self.path):
            self.offset = os.path.getsize(self.path)

    def poll(self) -> int:
        try:
            size = os.path.getsize(self.path)
        except OSError:
            return self.step
        if size > self.offset:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = self.partial + f.read(size - self.offset)
            self.offset = size
            *lines, self.partial = data.split(b"\n")
            for line in lines:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "loss" in r:
                    self.step = r["step"]
        return self.step


def wait_for_step(proc, tail: LogTail, target: int, timeout: float, poll: float) -> int:
    """Poll the log until it shows step >= ``target`` (or the run ends / times out); return the step seen."""
    deadline = time.time() + timeout
    step = tail.poll()
    while step < target and proc.poll() is None and time.time() < deadline:
        time.sleep(poll)
        step = tail.poll()
    return step


def wait_for_temp_folder(proc, tail: LogTail, root: str, step: int, timeout: float) -> bool:
    """Spin until ``root/.tmp-step_<step>-*`` exists (the save of ``step`` has begun), the run moves past
    ``step``, or it ends. True when the folder was seen."""
    prefix = f"{ckpt.TMP_PREFIX}{step:07d}-"
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            if any(e.name.startswith(prefix) for e in os.scandir(root)):
                return True
        except FileNotFoundError:
            pass
        if tail.poll() > step:
            return False
        time.sleep(0.0002)
    return False


def final_tensors(out: str, steps: int) -> dict:
    _, tensors = ckpt.load_checkpoint(os.path.join(out, "checkpoints", f"step_{steps:07d}"))
    return tensors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ckpt-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill plan")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds one attempt may run before it is killed anyway")
    ap.add_argument("--work-dir", help="keep the runs here (default: a temp folder, removed)")
    args = ap.parse_args()
    if args.kills < 1 or args.steps < 2 or args.ckpt_every < 1:
        ap.error("--kills >= 1, --steps >= 2 and --ckpt-every >= 1")
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    work = args.work_dir or tempfile.mkdtemp(prefix="fault_drill_")
    os.makedirs(work, exist_ok=True)
    recipe = os.path.join(work, "recipe.yaml")
    with open(recipe, "w") as f:
        f.write(RECIPE.format(steps=args.steps, ckpt_every=args.ckpt_every))
    ref_dir, run_dir = os.path.join(work, "uninterrupted"), os.path.join(work, "killed")
    for d in (ref_dir, run_dir):
        shutil.rmtree(d, ignore_errors=True)
    t_start = time.time()

    print(f"fault drill: {args.kills} SIGKILLs, {args.steps} steps, checkpoint every {args.ckpt_every} "
          f"(keep_last 2), kill-plan seed {args.seed}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread per run")
    print(f"command: python benchmarks/fault_drill.py --kills {args.kills} --steps {args.steps} "
          f"--ckpt-every {args.ckpt_every} --seed {args.seed}\n")

    t = time.time()
    ref = launch(recipe, ref_dir, resume=False)
    _, err = ref.communicate(timeout=max(600.0, args.timeout * 5))
    if ref.returncode != 0:
        print(err[-3000:])
        raise SystemExit("the uninterrupted run failed")
    print(f"uninterrupted run: {time.time() - t:.1f} s\n")

    rows = []
    for k in range(1, args.kills + 1):
        done = last_logged_step(run_dir)
        if done >= args.steps - 1:
            print(f"the run is nearly finished after {k - 1} kills; stopping the drill")
            break
        tail = LogTail(run_dir)
        proc = launch(recipe, run_dir, resume=k > 1)
        # kill after a step the run has not logged yet (its resume point is at most `done`)
        next_ckpt = (done // args.ckpt_every + 1) * args.ckpt_every
        if rng.random() < 0.4 and next_ckpt < args.steps:
            # while a checkpoint is being written: from the step before it, watch for its temp folder
            mode, target = "checkpoint", next_ckpt
            wait_for_step(proc, tail, target - 1, args.timeout, poll=0.002)
            wait_for_temp_folder(proc, tail, os.path.join(run_dir, "checkpoints"), target, args.timeout)
        else:  # a random step, then a random fraction of a step
            mode, target = "random", min(done + rng.randint(1, 2 * args.ckpt_every), args.steps - 1)
            wait_for_step(proc, tail, target, args.timeout, poll=0.002)
            time.sleep(rng.uniform(0, 0.03))
        if proc.poll() is not None:
            print(f"run {k} ended by itself (rc {proc.returncode}) before the kill; stopping the drill")
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        root = os.path.join(run_dir, "checkpoints")
        tmp_left = [n for n in os.listdir(root) if n.startswith(ckpt.TMP_PREFIX)] if os.path.isdir(root) else []
        rows.append({"kill": k, "mode": mode, "target": target, "reached": last_logged_step(run_dir),
                     "tmp_left": len(tmp_left)})
    # the last run: resume and finish
    t = time.time()
    proc = launch(recipe, run_dir, resume=True)
    _, err = proc.communicate(timeout=max(600.0, args.timeout * 5))
    if proc.returncode != 0:
        print(err[-3000:])
        raise SystemExit("the final resumed run failed")
    final_run_s = time.time() - t

    # Every launch after the first logs one resume event (step 0 when it found no checkpoint), so the
    # i-th event belongs to the run after the i-th kill.
    events = [r for r in read_log(run_dir) if r.get("event") == "resume"]
    assert len(events) == len(rows), f"{len(events)} resume events for {len(rows)} kills"
    header = (f"{'kill':>4} {'aimed at':>10} {'run began at':>12} {'killed after':>12} {'temp left':>9} "
              f"{'resumed from':>12} {'lost':>5}")
    print(header)
    print("-" * len(header))
    lost, began = [], 0
    for row, ev in zip(rows, events):
        row["began"], row["resumed_from"] = began, ev["step"]
        row["lost"] = row["reached"] - ev["step"]
        lost.append(row["lost"])
        aimed = f"ckpt {row['target']}" if row["mode"] == "checkpoint" else f"step {row['target']}+"
        print(f"{row['kill']:>4} {aimed:>10} {began:>12} {row['reached']:>12} {row['tmp_left']:>9} "
              f"{ev['step']:>12} {row['lost']:>5}")
        began = ev["step"]
    print("-" * len(header))
    print(f"final resumed run (from step {began}): {final_run_s:.1f} s\n")

    ok_lost = all(x <= args.ckpt_every for x in lost)
    mid_ckpt = sum(r["tmp_left"] > 0 for r in rows)
    a, b = final_tensors(ref_dir, args.steps), final_tensors(run_dir, args.steps)
    exact = {part: a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
             for part in ("model", "ema", "optimizer")}
    ref_loss = {r["step"]: r["loss"] for r in read_log(ref_dir) if "loss" in r}
    run_loss = {}
    for r in read_log(run_dir):  # the last record of each step (steps redone after a resume overwrite)
        if "loss" in r:
            run_loss[r["step"]] = r["loss"]
    same_losses = ref_loss == run_loss
    leftovers = [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith(ckpt.TMP_PREFIX)]

    print(f"kills: {len(rows)} ({sum(r['mode'] == 'checkpoint' for r in rows)} aimed at a checkpoint write, "
          f"{mid_ckpt} left a half-written temp folder behind)")
    print(f"steps lost per kill: min {min(lost)}, mean {sum(lost) / len(lost):.1f}, max {max(lost)} "
          f"(target <= {args.ckpt_every}: {'met' if ok_lost else 'NOT met'})")
    print(f"temp folders left after the final resume: {len(leftovers)}")
    print(f"per-step losses equal the uninterrupted run's (all {len(ref_loss)} steps): {'yes' if same_losses else 'NO'}")
    for part, same in exact.items():
        print(f"final {part} tensors bit-identical to the uninterrupted run's: {'yes' if same else 'NO'}")
    print(f"total drill time: {time.time() - t_start:.0f} s")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok_lost and all(exact.values()) and same_losses and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
