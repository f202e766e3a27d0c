"""Options and helpers shared by several sub-commands. Nothing here imports torch at module level: the
parser of every sub-command is built from these, and ``--help`` must stay fast."""
from __future__ import annotations

import argparse
import os

# Above this many threads the small models here gain nothing and contend for memory bandwidth.
MAX_AUTO_THREADS = 8
ENV_THREADS = "STARFLOW_THREADS"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (not the empty ones: None, off switches) and keeps descriptions'
    line breaks."""

    def _get_help_string(self, action):
        if action.default is None or action.nargs == 0 or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_command(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A sub-command parser with defaults shown in its help."""
    # module docstrings double as descriptions; their reST ``literal`` marks are noise in a terminal
    description = (description or help).replace("``", "")
    return sub.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)


def require_extra(module: str, extra: str, what: str) -> None:
    """A clear error naming the pip extra when an optional dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise FileNotFoundError(f"{what} needs the '{extra}' extra: pip install -e '.[{extra}]' "
                                f"(from the clone; module {module!r} is missing)")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to run (auto: cuda if available, else cpu)")


def resolve_device(name: str):
    from starflow.train.distributed import resolve_device as resolve  # lazy: torch stays out of --help

    return resolve(name)


def add_model_arg(p: argparse.ArgumentParser, default_help: str, positional: bool = False) -> None:
    """``--model NAME|DIR`` (a shipped name or a directory); ``positional`` also accepts it as the first
    argument (the older ``CHECKPOINT`` spelling of sample, nll and eval)."""
    from starflow.io.shipped import MODEL_HELP  # lazy: sub-command help must not import torch

    p.add_argument("--model", metavar="NAME|DIR", help=f"{MODEL_HELP} (default: {default_help})")
    if positional:
        p.add_argument("checkpoint", nargs="?", metavar="MODEL", help="same as --model")


def model_spec(args) -> str | None:
    """The model the user named with --model or the positional alias (None: the command's default)."""
    pos = getattr(args, "checkpoint", None)
    if pos is not None and args.model is not None and pos != args.model:
        raise ValueError(f"two models given: {pos!r} and --model {args.model!r}")
    return args.model if args.model is not None else pos


def threads_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads takes 'auto' or an integer >= 0, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"--threads must be >= 0, got {n}")
    return n


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=threads_arg, default=os.environ.get(ENV_THREADS, "auto"),
                   help="CPU threads for torch. auto: one per physical core (at most "
                        f"{MAX_AUTO_THREADS}), or 1 when the load average says the machine is already busy "
                        f"(OMP_NUM_THREADS, when set, wins); 0: torch's own default; env {ENV_THREADS} "
                        "overrides this default")


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads counted once; Linux /proc/cpuinfo, else cpu_count)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/cpuinfo") as f:
            cores, phys = set(), None
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    cores.add((phys, value.strip()))
        if cores:
            return max(1, min(usable, len(cores)))
    except OSError:
        pass
    return max(1, usable)


def auto_threads(load: float | None = None, cores: int | None = None, cpus: int | None = None) -> int:
    """Threads for ``--threads auto``: physical cores capped at MAX_AUTO_THREADS, limited to the CPUs the
    1-minute load average leaves idle; 1 when the machine is oversubscribed (then extra threads only
    wait on each other and sampling gets several times slower)."""
    if load is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():  # the user already chose
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cpus = cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    cores = cores or physical_cores()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):
            load = 0.0
    idle = int(cpus - load)
    return max(1, min(cores, MAX_AUTO_THREADS, idle))


def apply_threads(n: int | str) -> int:
    """Set torch's thread count; returns the count in effect."""
    import torch

    if n == "auto":
        n = auto_threads()
    n = threads_arg(str(n))
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
