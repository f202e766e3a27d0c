"""A run's flow as float16: its export if the run finished, else its latest checkpoint's EMA."""
import dataclasses
import os
import sys

import torch
from starflow import STARFlow
from starflow.pipeline import StarflowPipeline
from starflow.train.checkpoint import latest_valid, load_checkpoint

run, out, positions = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if os.path.isdir(os.path.join(run, "model")):
    model, src = StarflowPipeline.from_pretrained(os.path.join(run, "model")).model, "export"
else:
    path = latest_valid(os.path.join(run, "checkpoints"))
    info, t = load_checkpoint(path)
    cfg = StarflowPipeline.from_pretrained("starflow/assets/starflow_shapes/model").model.config
    model = STARFlow(dataclasses.replace(cfg, text_positions=positions))
    model.load_state_dict({k[len("module."):]: v for k, v in t["ema"].items() if k.startswith("module.")})
    src = path
model.save_pretrained(out, dtype=torch.float16)
print("exported", run, "from", src, "->", out, sorted(os.listdir(out)))
