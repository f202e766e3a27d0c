"""How long the demo takes to answer its first text-to-image request (the model loads on first use).

    python benchmarks/demo_first_request.py                       # this checkout
    PYTHONPATH=/path/to/old/checkout python benchmarks/demo_first_request.py

One process, one thread: times building the demo (imports gradio and starflow's app) and then the first
``text_to_image`` call on the shipped shapes model (loading the flow, autoencoder and MiniLM, then
sampling 4 images), wall and CPU seconds. No server is started.
"""
from __future__ import annotations

import time


def main() -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    import torch

    torch.set_num_threads(1)
    from starflow.app.demo import Demo
    from starflow.io.shipped import DEFAULT_DIGITS_MODEL, DEFAULT_TEXT_MODEL

    demo = Demo(text=DEFAULT_TEXT_MODEL, digits=DEFAULT_DIGITS_MODEL)
    t1, c1 = time.perf_counter(), time.process_time()
    demo.text_to_image("two red circles above a blue square", num_images=4)
    t2, c2 = time.perf_counter(), time.process_time()
    print(f"build the demo (imports): {t1 - t0:.2f} s wall, {c1 - c0:.2f} s CPU; "
          f"first text request: {t2 - t1:.2f} s wall, {c2 - c1:.2f} s CPU")


if __name__ == "__main__":
    main()
