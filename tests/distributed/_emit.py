"""One output line from a worker, written so that another rank's output cannot land inside it."""
from __future__ import annotations

import os
import sys


def emit(line: str) -> None:
    # print() may issue the text and the newline as separate writes, and the ranks share one pipe; a
    # single write(2) of a line shorter than PIPE_BUF (4 KiB) is atomic
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line.rstrip("\n") + "\n").encode())
