"""Train CamoXpert with every GPU this machine has, no thinking needed: ``python kaggle_2gpu_train.py``.

Detects the hardware and picks a preset (batch, accumulation, image size, precision, workers), finds the
data set (``--dataset-path``, COD10K-v3 under /kaggle/input, or one in the working folder) and trains
in-process. With no data set it runs a short demo on a generated synthetic one. ``--dry-run`` prints the
preset and the equivalent ``train_ultimate.py`` command; ``--help`` lists the overrides.
"""
import sys

from camoxpert.kaggle import main

if __name__ == "__main__":
    sys.exit(main())
