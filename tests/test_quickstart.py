"""The README's Set-up and Quick start commands, run as written from an empty folder outside the clone.

The commands are read from README.md itself, so the README cannot drift from what works. To keep the
suite fast, a few numbers are made smaller (image and sample counts, training steps), every computing
command gets ``--threads 1``, evaluation skips the feature-network metrics (FD, precision/recall: their
reference statistics take minutes to build) and ``starflow serve`` (a server that does not return) is
left out. Everything else runs exactly as printed: the first command through the installed ``starflow``
console script, the rest through the same ``main`` in the test's process.
"""
import os
import re
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
# options whose value is made smaller here, and to what
SMALLER = {"--num-images": "2", "-n": "2", "--num-samples": "20", "--metrics": "acc,nll"}
COMPUTING = {"generate", "sample", "nll", "encode", "decode", "inpaint", "edit", "train", "eval"}
NOT_RUN = {"serve"}


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    nxt = text.find("\n## ", start + 1)
    return text[start:nxt if nxt >= 0 else None]


def readme_commands() -> list[list[str]]:
    """Every ``starflow ...`` command in the bash blocks of Set-up and Quick start, in order."""
    with open(README) as f:
        text = f.read()
    body = section(text, "Set-up") + section(text, "Quick start")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                if part.strip().startswith("starflow "):
                    commands.append(shlex.split(part, comments=True))
    return commands


def adapt(argv: list[str], clone: str) -> list[str]:
    out = []
    for i, a in enumerate(argv):
        prev = argv[i - 1] if i else ""
        if prev in SMALLER:
            a = SMALLER[prev]
        out.append(a.replace("../starflow/", clone + "/"))
    if argv[1] in COMPUTING:
        out += ["--threads", "1"]
    if argv[1] == "train":
        out += ["--steps", "4"]
    if argv[1] == "eval":
        out += ["--nll-max", "20"]
    return out


def test_readme_names_the_commands():
    cmds = readme_commands()
    names = {c[1] for c in cmds}
    assert {"generate", "sample", "nll", "example", "encode", "decode", "inpaint", "edit", "train", "eval",
            "plot", "serve"} <= names
    assert not any("starflow/assets" in " ".join(c) for c in cmds), "quick start must use shipped names"


@pytest.mark.slow
def test_quickstart_from_an_empty_folder(tmp_path, monkeypatch, capsys):
    """The first command through the installed console script in a fresh process (what a user types);
    the rest in this process, which saves each one's start-up (imports) but runs the same code."""
    from starflow.cli import main

    work = tmp_path / "try"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("STARFLOW_CACHE_DIR", str(tmp_path / "cache"))
    commands = [adapt(argv, REPO) for argv in readme_commands() if argv[1] not in NOT_RUN]
    exe = shutil.which("starflow")
    for i, cmd in enumerate(commands):
        if i == 0 and exe is not None:
            env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
            proc = subprocess.run([exe, *cmd[1:]], cwd=work, env=env, capture_output=True, text=True, timeout=600)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        else:
            rc = main(cmd[1:])
            out, err = capsys.readouterr()
        assert rc == 0, f"{' '.join(cmd)}\n{out[-1500:]}\n{err[-3000:]}"
        if "--out" in cmd:  # every output the command names exists, and the command said where it wrote
            target = cmd[cmd.index("--out") + 1]
            assert (work / target).exists(), f"{' '.join(cmd)} did not write {target}"
            assert target in out, f"{' '.join(cmd)} did not print {target}"
    for name in ("out.png", "circles.png", "digit.png", "mask.png", "back.png", "filled.png", "edited.png",
                 "fives.png", "runs/digits_tiny/plots/training_curves.png"):
        assert (work / name).exists(), name
