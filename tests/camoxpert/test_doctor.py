"""CamoXpert's additions to test_multi_gpu.py: the real model's training step and Kaggle's advice."""
from __future__ import annotations

import pytest
import torch

from autoparallel import check
from camoxpert import doctor


def _args(*argv: str):
    parser = check.build_parser()
    doctor.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.slow
def test_model_step_trains_camoxpert(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, reason = doctor.check_model(_args("--allow-cpu", "--model", "camoxpert", "--model-backbone", "resnet18"))
    assert status == "PASS", reason
    assert reason.startswith("backbone resnet18, batch 2 at 64 px, cpu, fp32: loss ")
    assert doctor.check_model(_args())[0] == "SKIP"


def test_kaggle_with_fewer_than_two_gpus_gets_the_accelerator_advice(monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert doctor.advice({"gpus": [{"name": "Tesla T4"}]}, []) == [doctor.KAGGLE_ADVICE]
    assert doctor.advice({"gpus": [{"name": "Tesla T4"}] * 2}, []) == []
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE")
    if not __import__("pathlib").Path("/kaggle/working").is_dir():
        assert doctor.advice({"gpus": []}, []) == []
