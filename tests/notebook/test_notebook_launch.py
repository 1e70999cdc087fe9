"""DDP from a notebook cell: a real Jupyter kernel (ipykernel, driven by nbclient) runs ``ap.launch(train)``.

The notebook is what a Kaggle user writes: a first cell that already asked autoparallel where it runs,
a cell defining the training function, a cell launching it on 2 processes (gloo on the CPU), and a cell
that calls the script form by mistake.
"""
from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.distributed

CELLS = [
    """import os, torch
import autoparallel as ap
os.environ["AUTOPARALLEL_NPROC"] = "2"
print("kernel runtime:", ap.runtime().mode)""",
    """from torch import nn
from torch.utils.data import TensorDataset

def train(epochs, lr=0.1):
    torch.manual_seed(0)
    model = ap.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
    ema = ap.EMA(model, decay=0.5)
    data = TensorDataset(torch.randn(32, 4, generator=torch.Generator().manual_seed(1)), torch.arange(32))
    loader = ap.loader(data, batch_size=8, num_workers=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    seen = []
    for _ in range(epochs):
        for inputs, index in loader:
            optimizer.zero_grad()
            model(inputs).square().mean().backward()
            optimizer.step()
            ema.update()
            seen.append(index)
    rt = ap.runtime()
    weights = sum(p.detach().double().sum() for p in model.parameters()).reshape(1)
    return {"mode": rt.mode, "world_size": rt.world_size, "rank": rt.rank,
            "weights_per_rank": ap.all_gather(weights).tolist(),
            "samples": sorted(ap.all_gather(torch.cat(seen)).tolist())}""",
    """import json
result = ap.launch(train, 2, lr=0.05)
print("RESULT " + json.dumps(result))""",
    """try:
    ap.launch()
except ap.UsageError as error:
    print("REFUSED", error)""",
    """import time
os.environ["AUTOPARALLEL_TIMEOUT"] = "5"

def fails(stuck):
    if ap.runtime().rank == 1:
        if stuck:
            time.sleep(120)  # never reaches the barrier rank 0 waits in
        raise ValueError("rank 1 cannot go on")
    ap.barrier()

for stuck in (False, True):
    start = time.monotonic()
    try:
        ap.launch(fails, stuck)
        print("NOT RAISED")
    except Exception as error:
        print("RAISED " + json.dumps([stuck, type(error).__name__, time.monotonic() - start, str(error)]))""",
]


def _outputs(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))


def test_launch_of_a_cell_function_trains_two_ddp_ranks_and_returns_rank_0s_result(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in CELLS])
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                   ).execute()
    text = _outputs(notebook)
    assert "kernel runtime: cpu" in text  # the kernel's own cached runtime must not leak into the workers
    result = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert (result["mode"], result["world_size"], result["rank"]) == ("ddp", 2, 0)
    first, second = result["weights_per_rank"]
    assert first == second  # exact: DDP gives every rank the same weights
    assert result["samples"] == sorted(list(range(32)) * 2)  # sharded: every sample once in each of 2 epochs
    assert "REFUSED ap.launch() re-runs the script it is called from" in text
    assert "ap.launch(train)" in text
    raised = [json.loads(line[len("RAISED "):]) for line in text.splitlines() if line.startswith("RAISED ")]
    assert "NOT RAISED" not in text
    assert [stuck for stuck, *_ in raised] == [False, True]
    (_, _, _, failed), (_, _, waited, timed_out) = raised
    assert "Traceback" in failed
    assert "ValueError: rank 1 cannot go on" in failed
    assert "rank 0" in timed_out
    assert "barrier" in timed_out
    assert waited < 60  # AUTOPARALLEL_TIMEOUT=5, not the 120 s the stuck rank sleeps
