"""``ap.launch(fn)`` on a GPU machine, in fresh processes as a notebook kernel would be: forked ranks use
CUDA when the parent left it untouched, and the parent that initialised it is refused before forking."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu import REPO, subprocess_environment  # noqa: E402

pytestmark = pytest.mark.gpu

SCRIPT = textwrap.dedent("""
    import sys, torch
    import autoparallel as ap

    def train():
        rt = ap.runtime()
        device = torch.device("cuda", 0)  # two ranks on one GPU with gloo: NCCL refuses that
        total = ap.all_reduce(torch.ones(4, device=device) * (rt.rank + 1))
        return [rt.world_size, total.device.type, total.tolist()]

    if sys.argv[1] == "touched":
        torch.cuda.is_available()  # initialises the CUDA driver in this process
    try:
        print("RESULT", ap.launch(train, nproc=2))
    except ap.UsageError as error:
        print("REFUSED", error)
""")


def run(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env=subprocess_environment(AUTOPARALLEL_STRATEGY="ddp", OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_forked_ranks_use_cuda_when_the_parent_left_it_untouched():
    assert "RESULT [2, 'cuda', [3.0, 3.0, 3.0, 3.0]]" in run("untouched")


def test_a_parent_that_initialised_cuda_is_refused_before_forking():
    assert "REFUSED CUDA is already initialised" in run("touched")
