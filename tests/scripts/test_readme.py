"""Every shell command in README.md is checked: parsed by the real argument parser, or run.

A command this file does not know how to check fails the test, so a new command in the README needs a
check here before it can land.
"""
from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from autoparallel.check import build_parser
from camoxpert import doctor, synthetic
from camoxpert.cli import get_args_parser
from camoxpert.kaggle import build_parser as kaggle_parser

ROOT = Path(__file__).resolve().parents[2]


def readme_commands(text: str) -> list[list[str]]:
    """Shell commands of the code blocks (```bash or plain ```), continuation lines joined and comments
    dropped, and of inline code that starts a command (`python ...`, `VAR=1 python ...`)."""
    commands, prose, block, language = [], [], None, ""
    for line in text.splitlines():
        fence = re.match(r"```(\w*)", line)
        if fence and block is None:
            block, language = [], fence.group(1)
        elif fence:
            if language in ("", "bash"):
                for command in "\n".join(block).replace("\\\n", " ").splitlines():
                    words = shlex.split(command, comments=True)
                    if words:
                        commands.append(words)
            block = None
        elif block is not None:
            block.append(line)
        else:
            prose.append(line)
    for inline in re.findall(r"`((?:[A-Z_]+=\S+ )*(?:python|torchrun) [^`]+)`", "\n".join(prose)):
        commands.append(shlex.split(inline))
    return commands


DOCS = ("README.md", "docs/benchmarks.md")
COMMANDS = [words for doc in DOCS for words in readme_commands((ROOT / doc).read_text())
            if words[0] != "Distributed"]  # the README's banner sample is output, not a command


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))


@functools.cache
def bench_help(script: str) -> str:
    path = ROOT / script
    assert path.is_file(), f"{script} does not exist"
    result = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def check_bench_command(script: str, args: list[str]) -> None:
    """The benchmark exists, and every flag the docs give it is one its --help lists (running it is a
    benchmark's job, not a test's)."""
    usage = bench_help(script)
    for flag in (arg.split("=")[0] for arg in args if arg.startswith("--")):
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", usage), f"{script} --help has no {flag}"


def check_command(words: list[str], tmp_path: Path) -> None:
    while re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # environment assignments before the command
        words = words[1:]
    if words[0] == "make":
        assert words[1] in _make_targets(), f"make target {words[1]!r} is not in the Makefile"
        return
    if words[0] == "torchrun":
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        assert words[script] == "train_ultimate.py"
        get_args_parser().parse_args(words[script + 1:])
        return
    assert words[0] == "python", f"README command not checked by this test: {' '.join(words)}"
    if words[1:3] == ["-m", "camoxpert.synthetic"]:
        # Run it for real, into a temporary folder, at a small size.
        args = words[3:]
        args[0] = str(tmp_path / "synthetic")
        for flag, small in (("--num-train", "4"), ("--num-test", "2"), ("--size", "32")):
            if flag in args:
                args[args.index(flag) + 1] = small
        assert synthetic.main(args) == 0
        assert len(list((tmp_path / "synthetic" / "Train" / "Image").iterdir())) == 4
        return
    script, args = words[1], words[2:]
    if script.startswith("bench/"):
        check_bench_command(script, args)
    elif script == "train_ultimate.py":
        get_args_parser().parse_args(args)
    elif script == "kaggle_2gpu_train.py":
        kaggle_parser().parse_args(args)
    elif script == "test_multi_gpu.py":
        parser = build_parser()
        doctor.add_arguments(parser)
        parser.parse_args(args)
    else:
        raise AssertionError(f"README command not checked by this test: {' '.join(words)}")


def test_readme_has_the_two_quick_start_commands():
    assert ["make", "demo"] in COMMANDS
    assert ["make", "test"] in COMMANDS


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w)[:60] for w in COMMANDS])
def test_readme_command_is_valid(words, tmp_path):
    check_command(words, tmp_path)


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_unknown_commands_are_rejected(tmp_path):
    with pytest.raises(AssertionError, match="not checked"):
        check_command(["python", "somewhere_else.py"], tmp_path)
    with pytest.raises(SystemExit):
        check_command(["python", "train_ultimate.py", "train", "--no-such-flag"], tmp_path)


def test_dry_run_prints_the_command_the_readme_promises(tmp_path):
    out = subprocess.run([sys.executable, "kaggle_2gpu_train.py", "--dry-run", "--simulate", "2xT4",
                          "--dataset-path", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "train_ultimate.py train" in out.stdout


def test_readme_python_example_trains(tmp_path, monkeypatch):
    """The 'In an existing script' example runs as written, given a model, a data set and a loss."""
    import torch
    from torch import nn

    (example,) = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
                  if "ap.wrap" in b]
    monkeypatch.chdir(tmp_path)
    inputs = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    targets = inputs.sum(dim=1, keepdim=True)
    torch.manual_seed(0)
    initial = nn.functional.mse_loss(nn.Linear(4, 1)(inputs), targets)
    torch.manual_seed(0)  # MyModel() below starts from the same weights
    namespace = {
        "MyModel": lambda: nn.Linear(4, 1),
        "train_set": torch.utils.data.TensorDataset(inputs, targets),
        "loss_fn": nn.functional.mse_loss,
    }
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["ema"].num_updates == 10  # 64 samples / 32 per step / 2 accumulation x 10 epochs
    final = nn.functional.mse_loss(namespace["model"](inputs), targets)
    assert final < initial
    assert (tmp_path / "last.pt").is_file()
