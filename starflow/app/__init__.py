"""The browser demo: a Gradio Blocks app over one or two saved pipelines.

    starflow serve                                  # shipped models, http://127.0.0.1:7860
    starflow serve --checkpoint runs/x/model --text-checkpoint runs/y/model --port 8000

From Python (tests, notebooks)::

    from starflow.app import Demo, build_app, launch
    demo = Demo(text=pipe_or_dir, digits=pipe_or_dir)     # either may be None
    blocks = build_app(demo)                              # a gr.Blocks, queue configured
    launch(blocks, host="127.0.0.1", port=7860)

Tabs
----
* **Text to image** (text-conditional model): prompt, number of images (<= ``MAX_IMAGES``), guidance
  weight and rule, temperature, seed, sampler (sequential | jacobi) -> gallery.
* **Digits** (class-conditional model): class 0-9 -> one grid.
* **Inpainting**: upload an image or pick an example, paint the region to regenerate (or pick a preset
  mask) -> completions, through ``starflow.tasks.inpaint.inpaint`` when that module exists; otherwise the tab
  says it is not available.
* **Encode -> decode** (flows): an image -> its exact noise z = f(x), the round trip f^-1(f(x)), the
  largest round-trip error and the image's bits/dim (pixel models; latent models report nats/dim of the
  latent, and the autoencoder's own, lossy, reconstruction error separately).

Limits (module constants): ``MAX_IMAGES`` per request, ``MAX_PROMPT_CHARS``, ``MAX_UPLOAD_BYTES`` (also
passed to Gradio as ``max_file_size``, so larger uploads are refused before they reach a handler),
``MAX_UPLOAD_PIXELS``. Uploads that are not images are refused with a message (``gr.Error``). Images are
converted to the model's mode and size (centre crop to a square, then a box-filter resize) and the tab
says so. All model work shares one queue slot group (``concurrency_id="model"``) with a bounded
concurrency and a bounded queue: concurrent requests wait their turn rather than run the model at once;
a request beyond ``queue_size`` waiting ones is refused with Gradio's "queue full" message.

Offline: :func:`offline_env` sets ``GRADIO_ANALYTICS_ENABLED=False`` and ``HF_HUB_OFFLINE=1`` (unless
already set) before Gradio is imported; the theme uses system fonts only (no font download) and
``share`` is always False.
"""
from starflow.app.inputs import (  # noqa: F401
    MAX_TEMPERATURE, MIN_TEMPERATURE, CHUNK, DEFAULT_CONCURRENCY, DEFAULT_QUEUE_SIZE, DISPLAY_SIDE, EDITOR_SIDE, MASK_PRESETS,
    MAX_GUIDANCE, MAX_IMAGES, MAX_INPAINT_STEPS, MAX_PROMPT_CHARS, MAX_SEED, MAX_UPLOAD_BYTES,
    MAX_UPLOAD_PIXELS, NOT_AVAILABLE_INPAINT, SAMPLERS, check_choice, check_float, check_int,
    check_prompt, load_upload, noise_to_image, offline_env, to_model_image, upscale,
)
from starflow.app.demo import (  # noqa: F401
    Demo, Slot,
)
from starflow.app.ui import (  # noqa: F401
    build_app, launch,
)
