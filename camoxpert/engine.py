"""The training engine's entry points, one per ``train_ultimate.py`` subcommand.

The work lives in :mod:`camoxpert.train` (two-stage training, :class:`~camoxpert.train.Trainer`) and
:mod:`camoxpert.evaluate` (scoring at the original resolution, ``evaluate`` and ``predict``); this module
only names them, so the command line and other callers have one place to import from.
"""
from __future__ import annotations

from .evaluate import evaluate, predict, score
from .train import Trainer, train

__all__ = ["Trainer", "evaluate", "predict", "score", "train"]
