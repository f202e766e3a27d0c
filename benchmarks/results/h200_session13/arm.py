"""One training arm on the lent GPU: `starflow train ...` whose loop waits for the driver's GO (so the
benchmarks run alone on the GPU), times 40 real steps beside the other arms, and sets train.steps so every
arm ends by TRAIN_DEADLINE with the same step count (cosine schedule completes)."""
import os
import sys
import time

import torch
import starflow.data.latents as latents
from starflow.train import trainer as T

_encode = latents.encode_images


DEV = os.environ.get("DEV", "cuda")


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def encode_on_gpu(autoencoder, images, batch_size=250, flip=False):
    autoencoder.to(DEV)
    try:
        return _encode(autoencoder, images, batch_size=4000, flip=flip)
    finally:
        autoencoder.to("cpu")


latents.encode_images = encode_on_gpu
_train = T.Trainer.train


def train(self, resume=None):
    arm, d, arms = os.environ["ARM"], os.environ["SYNC_DIR"], os.environ["ARMS"].split(",")
    deadline = float(os.environ["TRAIN_DEADLINE"])
    print(f"[{arm}] ready at {time.time():.0f}; waiting for go", flush=True)
    open(f"{d}/ready_{arm}", "w").close()
    while not os.path.exists(f"{d}/go"):
        time.sleep(0.2)
    for i in range(40):
        if i == 10:
            sync()
            t0 = time.time()
        self.train_step(self.step)
        self.step += 1
    sync()
    with open(f"{d}/rate_{arm}", "w") as f:
        f.write(str(30 / (time.time() - t0)))
    while not all(os.path.exists(f"{d}/rate_{a}") for a in arms):
        time.sleep(0.05)
    time.sleep(0.3)
    rate = min(float(open(f"{d}/rate_{a}").read()) for a in arms)
    n = int(rate * max(deadline - time.time(), 10) * 0.93)
    steps = self.step + max(n - n % 100, 100)
    self.cfg.steps, self.cfg.ckpt_every, self.cfg.sample_every = steps, max(steps // 5, 100), steps
    self.log({"event": "gpu_plan", "rate_steps_per_s": rate, "steps": steps, "time": time.time()})
    print(f"[{arm}] {rate:.1f} steps/s (slowest arm); training to step {steps}", flush=True)
    return _train(self, resume)


T.Trainer.train = train
from starflow.cli import main  # noqa: E402

sys.argv[0] = "starflow"
sys.exit(main())
