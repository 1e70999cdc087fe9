"""Every shell command in README.md is checked: parsed by the real argument parser, or run; its Python examples run.

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
    if words[0] == "time":  # the shell's timing of the command that follows
        words = words[1:]
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


def _python_example(containing: str) -> str:
    """The README's one ```python block that contains ``containing``."""
    (example,) = [block for block in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
                  if containing in block]
    return example


PORT = _python_example("ap.GradientAccumulator(")  # "Porting an existing script": the full port
EVALUATION = _python_example("train=False")  # "Evaluation and gathering"


@pytest.fixture
def one_cpu_process(monkeypatch):
    """The examples run here as one CPU process on any machine: ap.launch() must not re-run pytest on a GPU box."""
    import autoparallel as ap

    monkeypatch.setenv("AUTOPARALLEL_STRATEGY", "cpu")
    ap.runtime(strategy="cpu")  # replaces a runtime cached by an earlier test
    yield
    sys.modules["autoparallel.runtime"].reset_runtime()  # the next test detects its own


def _data(samples: int = 128):
    import torch

    inputs = torch.randn(samples, 4, generator=torch.Generator().manual_seed(1))
    return inputs, inputs.sum(dim=1, keepdim=True)


def _run_port(folder: Path, monkeypatch, loss_fn=None) -> dict:
    """The full port as written, given a model, a data set and a loss, in ``folder`` (where last.pt goes)."""
    import torch
    from torch import nn

    monkeypatch.chdir(folder)
    inputs, targets = _data()
    torch.manual_seed(0)  # MyModel() starts from the same weights, the loader shuffles alike
    namespace = {"MyModel": lambda: nn.Linear(4, 1), "train_set": torch.utils.data.TensorDataset(inputs, targets),
                 "loss_fn": loss_fn or nn.functional.mse_loss}
    exec(compile(PORT, "README.md", "exec"), namespace)
    return namespace


@pytest.mark.usefixtures("one_cpu_process")
def test_readme_port_trains_and_its_evaluation_gathers_every_sample(tmp_path, monkeypatch):
    import torch
    from torch import nn

    inputs, targets = _data()
    torch.manual_seed(0)
    initial = nn.functional.mse_loss(nn.Linear(4, 1)(inputs), targets)
    namespace = _run_port(tmp_path, monkeypatch)
    assert namespace["ema"].num_updates == 20  # 128 samples / 32 per micro-step / 2 accumulation x 10 epochs
    assert nn.functional.mse_loss(namespace["model"](inputs), targets) < initial
    assert (tmp_path / "last.pt").is_file()
    namespace["val_set"] = torch.utils.data.TensorDataset(inputs[:10], targets[:10])
    exec(compile(EVALUATION, "README.md", "exec"), namespace)
    assert torch.equal(namespace["labels"], targets[:10])  # every sample once, in dataset order
    assert namespace["outputs"].shape == (10, 1)


@pytest.mark.usefixtures("one_cpu_process")
def test_readme_port_stopped_by_sigterm_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    import os
    import signal

    import torch
    from torch import nn

    import autoparallel as ap

    (tmp_path / "straight").mkdir()
    (tmp_path / "stopped").mkdir()
    straight = _run_port(tmp_path / "straight", monkeypatch)
    calls = []

    def loss_then_sigterm(output, target):  # the scheduler's SIGTERM arrives during micro-step 5 (epoch 1)
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return nn.functional.mse_loss(output, target)

    with pytest.raises(SystemExit) as stopped:
        _run_port(tmp_path / "stopped", monkeypatch, loss_then_sigterm)
    assert stopped.value.code == ap.EXIT_RESUMABLE == 75
    assert len(calls) == 6  # it stopped at the next optimizer step, in the middle of epoch 1
    assert ap.load_checkpoint(tmp_path / "stopped" / "last.pt")["loader"] == {"epoch": 1, "batch": 2}
    resumed = _run_port(tmp_path / "stopped", monkeypatch)  # the same command again
    for name in ("model", "ema"):
        mine = ap.unwrap(resumed[name].module if name == "ema" else resumed[name]).state_dict()
        reference = ap.unwrap(straight[name].module if name == "ema" else straight[name]).state_dict()
        for key, value in reference.items():
            assert torch.equal(mine[key], value), f"{name}.{key}"  # one process: bitwise
    assert resumed["ema"].num_updates == straight["ema"].num_updates == 20
