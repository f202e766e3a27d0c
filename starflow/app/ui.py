"""The Gradio Blocks layout, its bounded queue, and launching on 127.0.0.1."""
from __future__ import annotations



from starflow.app.inputs import (
    DEFAULT_CONCURRENCY, DEFAULT_QUEUE_SIZE, EDITOR_SIDE, MASK_PRESETS, MAX_GUIDANCE, MAX_IMAGES,
    MAX_INPAINT_STEPS, MAX_PROMPT_CHARS, MAX_SEED, MAX_TEMPERATURE, MAX_UPLOAD_BYTES,
    MIN_TEMPERATURE, NOT_AVAILABLE_INPAINT, SAMPLERS, _guidance_rules,
)
from starflow.app.demo import (
    Demo,
)
import gradio as gr  # noqa: E402  (imported after starflow.app.inputs set the offline environment)

# ---------------------------------------------------------------------------------------------------
# the Blocks
# ---------------------------------------------------------------------------------------------------
def _theme():
    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    mono = ["ui-monospace", "monospace"]
    return gr.themes.Default(font=system, font_mono=mono)  # plain strings: no web-font download


def build_app(demo: Demo, concurrency: int = DEFAULT_CONCURRENCY, queue_size: int = DEFAULT_QUEUE_SIZE) -> gr.Blocks:
    if concurrency < 1 or queue_size < 1:
        raise ValueError("concurrency and queue_size must be >= 1")
    rules = list(_guidance_rules())
    models = demo.model_choices()
    ev = dict(concurrency_id="model", concurrency_limit=concurrency)

    def sampling_controls(default_n: int, d: dict):
        """Controls that start at the model's own settings (its model_index.json), as the CLI does."""
        with gr.Row():
            n = gr.Slider(1, MAX_IMAGES, value=default_n, step=1, label=f"Number of images (max {MAX_IMAGES})")
            w = gr.Slider(0.0, MAX_GUIDANCE, value=d["guidance"], step=0.25, label="Guidance weight w (0 = unguided)")
            rule = gr.Dropdown(rules, value=d["guidance_rule"], label="Guidance rule")
        with gr.Row():
            t = gr.Slider(MIN_TEMPERATURE, MAX_TEMPERATURE, value=d["temperature"], step=0.05, label="Temperature")
            seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
            sampler = gr.Radio(list(SAMPLERS), value=d["sampler"], label="Sampler")
        return n, w, rule, t, seed, sampler

    with gr.Blocks(title="starflow demo", analytics_enabled=False) as blocks:
        gr.Markdown("# starflow\nNormalizing-flow image generation (STARFlow / TARFlow), running locally.")
        with gr.Tab("Text to image", id="text"):
            if not demo.text.available:
                gr.Markdown(f"**Not available:** {demo.text.missing}")
            prompt = gr.Textbox(label=f"Prompt (max {MAX_PROMPT_CHARS} characters)", max_length=MAX_PROMPT_CHARS,
                                value="two red circles above a blue square", elem_id="prompt")
            controls = sampling_controls(4, demo.text.sampling_defaults())
            go = gr.Button("Generate", variant="primary", elem_id="generate", interactive=demo.text.available)
            gallery = gr.Gallery(label="Images", columns=4, elem_id="gallery", format="png")
            info = gr.Markdown(elem_id="text-info")

            def run_text(p, n, w, rule, t, seed, sampler, progress=gr.Progress()):
                return demo.text_to_image(p, n, w, rule, t, seed, sampler, progress=progress)

            go.click(run_text, [prompt, *controls], [gallery, info], api_name="text_to_image", **ev)
            prompt.submit(run_text, [prompt, *controls], [gallery, info], api_name=False, **ev)

        with gr.Tab("Digits", id="digits"):
            if not demo.digits.available:
                gr.Markdown(f"**Not available:** {demo.digits.missing}")
            label = gr.Dropdown([str(i) for i in range(10)], value="3", label="Class (digit)")
            dcontrols = sampling_controls(16, demo.digits.sampling_defaults())
            dgo = gr.Button("Generate", variant="primary", elem_id="generate-digits", interactive=demo.digits.available)
            grid = gr.Image(label="Samples", type="pil", format="png", elem_id="digits-grid")
            dinfo = gr.Markdown()

            def run_digits(lab, n, w, rule, t, seed, sampler, progress=gr.Progress()):
                return demo.digits_grid(lab, n, w, rule, t, seed, sampler, progress=progress)

            dgo.click(run_digits, [label, *dcontrols], [grid, dinfo], api_name="digits", **ev)

        examples = list(demo.examples())
        max_mb = MAX_UPLOAD_BYTES // 2**20
        with gr.Tab("Inpainting", id="inpaint"):
            if not demo.inpaint_available():
                gr.Markdown(f"**Not available:** {NOT_AVAILABLE_INPAINT}", elem_id="inpaint-missing")
            with gr.Row():
                i_upload = gr.File(label=f"Upload an image (max {max_mb} MB)", file_types=["image"], type="filepath")
                i_example = gr.Dropdown(examples, value=None, label="... or pick an example")
                i_model = gr.Radio(models, value=models[0] if models else None, label="Model")
            editor = gr.ImageEditor(label="Paint the region to regenerate", elem_id="inpaint-editor", type="pil", sources=(),
                                    brush=gr.Brush(colors=["#ff00ff"], default_size=24), layers=False,
                                    transforms=(), canvas_size=(EDITOR_SIDE, EDITOR_SIDE))
            i_note = gr.Markdown()
            with gr.Row():
                preset = gr.Radio(list(MASK_PRESETS), value="painted", label="Mask")
                i_label = gr.Dropdown([str(i) for i in range(10)], value="3", label="Class (class models)")
                i_prompt = gr.Textbox(label="Prompt (text models)", max_length=MAX_PROMPT_CHARS)
            with gr.Row():
                i_n = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Completions")
                i_seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                i_steps = gr.Slider(1, MAX_INPAINT_STEPS, value=5, step=1, label="Resampling rounds")
                i_w = gr.Slider(0.0, MAX_GUIDANCE, value=0.0, step=0.25, label="Guidance weight w")
            igo = gr.Button("Inpaint", variant="primary", interactive=demo.inpaint_available())
            i_gallery = gr.Gallery(label="Completions", columns=5, format="png", elem_id="inpaint-gallery")
            i_info = gr.Markdown(elem_id="inpaint-info")

            i_upload.upload(demo.editor_value, [i_upload, i_model], [editor, i_note], api_name=False)
            i_example.change(lambda name, which: demo.editor_value(demo.example(name), which) if name else (gr.skip(), gr.skip()),
                             [i_example, i_model], [editor, i_note], api_name=False)

            def run_inpaint(ed, which, pre, lab, p, n, seed, steps, w, progress=gr.Progress()):
                return demo.inpaint(ed, which, pre, lab, p, n, seed, steps, w, progress=progress)

            igo.click(run_inpaint, [editor, i_model, preset, i_label, i_prompt, i_n, i_seed, i_steps, i_w],
                      [i_gallery, i_info],
                      api_name="inpaint", **ev)

        with gr.Tab("Encode → decode", id="encode"):
            gr.Markdown("A flow is invertible: an image maps to exactly one noise tensor z = f(x), and f⁻¹(z) "
                        "gives the image back. This tab shows z, the round trip and the image's bits/dim.")
            with gr.Row():
                e_upload = gr.File(label=f"Upload an image (max {max_mb} MB)", file_types=["image"], type="filepath")
                e_example = gr.Dropdown(examples, value=None, label="... or pick an example")
                e_model = gr.Radio(models, value=models[0] if models else None, label="Model")
            with gr.Row():
                e_label = gr.Dropdown([str(i) for i in range(10)], value="0", label="Class (class models)")
                e_prompt = gr.Textbox(label="Prompt (text models)", max_length=MAX_PROMPT_CHARS)
            ego = gr.Button("Encode and decode", variant="primary", elem_id="encode-go")
            with gr.Row():
                e_in = gr.Image(label="Input (model size)", type="pil", format="png", interactive=False)
                e_z = gr.Image(label="Noise z = f(x)", type="pil", format="png", interactive=False)
                e_out = gr.Image(label="Round trip f⁻¹(f(x))", type="pil", format="png", interactive=False)
            e_info = gr.Markdown(elem_id="encode-info")

            def run_encode(up, ex, which, lab, p, progress=gr.Progress()):
                src = up if up else demo.example(ex)
                return demo.encode_decode(src, which, lab, p, progress=progress)

            ego.click(run_encode, [e_upload, e_example, e_model, e_label, e_prompt], [e_in, e_z, e_out, e_info],
                      api_name="encode_decode", **ev)
        gr.Markdown(f"Limits: {MAX_IMAGES} images per request, {MAX_PROMPT_CHARS}-character prompts, "
                    f"{max_mb} MB uploads. Requests are queued and run {concurrency} at a time.")
    blocks.queue(max_size=queue_size, default_concurrency_limit=concurrency)
    return blocks


def launch(blocks: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True, quiet: bool = False):
    """Start the server (never shared publicly). ``block=False`` returns once it is up."""
    return blocks.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                         max_file_size=MAX_UPLOAD_BYTES, show_error=True, quiet=quiet, theme=_theme(),
                         ssr_mode=False, footer_links=["api"], inbrowser=False)
