"""Is this machine ready for multi-GPU training? Run before training: ``python test_multi_gpu.py``.

autoparallel's checks (versions, GPUs, peer access, a DataParallel forward and backward compared with one
device, a DDP all-reduce through torch's launcher, the debugging settings) plus CamoXpert's: ``--model
camoxpert`` runs one real training step, and on Kaggle the accelerator advice. Exit code 0: all passed,
1: a check failed, 2: no GPU found. ``--allow-cpu``, ``--bandwidth``, ``--json``: see ``--help``.
"""
import sys

from autoparallel.check import main
from camoxpert import doctor

if __name__ == "__main__":
    sys.exit(main(checks=doctor.CHECKS, add_arguments=doctor.add_arguments, advice=doctor.advice))
