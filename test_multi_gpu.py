"""Is this machine ready for multi-GPU training? Run before training: ``python test_multi_gpu.py``.

Versions, GPUs, peer access, a DataParallel forward and backward compared with one device, and a DDP
all-reduce through torch's launcher. Exit code 0: all passed, 1: a check failed, 2: no GPU found.
``--allow-cpu`` runs the CPU checks, ``--model camoxpert`` one step of the real model, ``--bandwidth``
GPU-to-GPU copies, ``--json`` a report for scripts. Same as ``python -m autoparallel.check``.
"""
import sys

from autoparallel.check import main

if __name__ == "__main__":
    sys.exit(main())
