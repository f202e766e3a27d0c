"""Peak memory of ``starflow sample`` against the number of images: sampling and saving go in chunks, so
the peak resident set size (RSS) should not grow with ``-n``.

    python benchmarks/sample_memory.py                      # -n 100 and -n 3000, the shipped digits model
    python benchmarks/sample_memory.py --counts 100 1000 --no-grid

Each count runs the real CLI in its own subprocess (one CPU thread) and reads that process's peak RSS
from ``wait4``; the ratio largest/smallest is printed and the exit status is 1 when it exceeds
``--max-ratio`` (1.5).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def peak_rss_mb(argv: list[str]) -> tuple[float, float, int]:
    """(peak RSS in MB, wall seconds, exit status) of ``starflow ARGV`` in a fresh process."""
    code = "import sys; from starflow.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, time.time() - t0, proc.returncode  # Linux reports KiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[100, 3000])
    ap.add_argument("--model", help="model directory (default: the shipped digits model)")
    ap.add_argument("--no-grid", action="store_true", help="one PNG per image instead of one grid")
    ap.add_argument("--max-ratio", type=float, default=1.5)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.counts:
            out = os.path.join(tmp, f"n{n}" if args.no_grid else f"n{n}.png")
            argv = ["sample", "-n", str(n), "--threads", "1", "--device", "cpu", "--out", out]
            argv += [args.model] if args.model else []
            argv += ["--no-grid"] if args.no_grid else []
            rss, secs, rc = peak_rss_mb(argv)
            if rc:
                print(f"-n {n}: starflow sample exited {rc}", file=sys.stderr)
                return 2
            rows.append((n, rss, secs))
            print(f"-n {n:>6}: peak RSS {rss:8.1f} MB, {secs:6.1f} s", flush=True)
    ratio = max(r[1] for r in rows) / min(r[1] for r in rows)
    print(f"peak RSS ratio largest/smallest: {ratio:.3f} (limit {args.max_ratio})")
    return 0 if ratio <= args.max_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
