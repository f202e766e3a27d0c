"""``starflow serve``: the browser demo (starflow/app.py) on http://127.0.0.1:7860 by default.

Needs the ``app`` extra (``pip install -e ".[app]"``: gradio). Binds to 127.0.0.1 unless ``--host``
says otherwise; never creates a public share link."""
from __future__ import annotations

import os

from starflow.cli.common import add_command, add_device_arg, add_threads_arg, apply_threads, resolve_device


def add_parser(sub, name):
    p = add_command(sub, name, "start the web demo (Gradio) on localhost", description=__doc__)
    p.add_argument("--model", "--checkpoint", dest="checkpoint", metavar="NAME|DIR",
                   help="class-conditional (or unconditional) model for the Digits tab, a shipped name or a "
                        "directory (default: mnist); a text-conditional model here is used for the text tab")
    p.add_argument("--text-model", "--text-checkpoint", dest="text_checkpoint", metavar="NAME|DIR",
                   help="text-to-image model (default: shapes)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--concurrency", type=int, default=1, help="model requests run at once; the rest queue")
    p.add_argument("--queue-size", type=int, default=32, help="requests that may wait; more are refused")
    add_device_arg(p)
    add_threads_arg(p)
    return p


def resolve_checkpoints(checkpoint: str | None, text_checkpoint: str | None) -> tuple[str | None, str | None]:
    """The given directories, or the shipped models that exist. Raises when there is nothing to serve."""
    # lazy: sub-command help must not import torch
    from starflow.io.shipped import DEFAULT_DIGITS_MODEL, DEFAULT_TEXT_MODEL, is_shipped_name, resolve_model

    for path in (checkpoint, text_checkpoint):
        if path is not None and not os.path.isdir(path) and not is_shipped_name(path):
            raise FileNotFoundError(f"model directory {path!r} does not exist")
    checkpoint = resolve_model(checkpoint) if checkpoint is not None else None
    text_checkpoint = resolve_model(text_checkpoint) if text_checkpoint is not None else None
    if checkpoint is None and text_checkpoint is None:
        checkpoint = DEFAULT_DIGITS_MODEL if os.path.isdir(DEFAULT_DIGITS_MODEL) else None
        text_checkpoint = DEFAULT_TEXT_MODEL if os.path.isdir(DEFAULT_TEXT_MODEL) else None
        if checkpoint is None and text_checkpoint is None:
            raise FileNotFoundError(f"no shipped model found ({DEFAULT_DIGITS_MODEL}, {DEFAULT_TEXT_MODEL}); "
                                    "pass --checkpoint and/or --text-checkpoint")
    return checkpoint, text_checkpoint


def check_port_free(host: str, port: int) -> None:
    """Fail before loading any model when ``host:port`` cannot be bound (in use, or not allowed)."""
    import socket

    from starflow.errors import BadInputError  # lazy: sub-command help must not import torch

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, port))
    except OSError as e:
        raise BadInputError(f"cannot serve on {host}:{port}: {e.strerror or e} (is another server using "
                            "the port? pick another --port)") from None


def run(args) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.concurrency < 1 or args.queue_size < 1:
        raise ValueError("--concurrency and --queue-size must be >= 1")
    apply_threads(args.threads)
    check_port_free(args.host, args.port)
    checkpoint, text_checkpoint = resolve_checkpoints(args.checkpoint, args.text_checkpoint)
    try:
        from starflow import app  # lazy: sub-command help must not import torch
    except ImportError as e:
        raise FileNotFoundError(f"the web demo needs gradio: pip install -e '.[app]' ({e})") from None
    device = resolve_device(args.device)
    demo = app.Demo.from_dirs(checkpoint, text_checkpoint, device=device)
    if args.checkpoint is None and args.text_checkpoint is None:  # say which shipped model is missing
        # lazy: sub-command help must not import torch
        from starflow.io.shipped import DEFAULT_DIGITS_MODEL, DEFAULT_TEXT_MODEL

        if not demo.text.available:
            demo.text = app.Slot(DEFAULT_TEXT_MODEL, "shipped text-to-image", device)
        if not demo.digits.available:
            demo.digits = app.Slot(DEFAULT_DIGITS_MODEL, "shipped digits", device)
    blocks = app.build_app(demo, concurrency=args.concurrency, queue_size=args.queue_size)
    print(f"starflow demo on http://{args.host}:{args.port} (text model: {text_checkpoint or '-'}, "
          f"class model: {checkpoint or '-'}); Ctrl+C stops it", flush=True)
    app.launch(blocks, host=args.host, port=args.port, block=True)
    return 0
