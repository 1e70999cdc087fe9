"""Worker for test_stop_ddp.py (torchrun, 2 processes): only rank 1 receives SIGUSR1, in its step 3."""
from __future__ import annotations

import json
import os
import signal

import torch
from _emit import emit  # this folder is sys.path[0] for a script

import autoparallel as ap


def main() -> None:
    rt = ap.runtime()
    steps = 0
    with ap.StopRequest() as stop:
        while True:
            steps += 1
            if rt.rank == 1 and steps == 3:
                os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM's --signal does, to one task
            if stop.should_stop():
                break
    result = {"steps": ap.all_gather(torch.tensor([steps])).tolist(), "reason": stop.agreed}
    if rt.is_main:
        emit("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
