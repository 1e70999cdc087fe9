"""``train_ultimate.py``: the seed's command parses unchanged; help and argument errors behave."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from camoxpert.cli import METRIC_CHOICES, get_args_parser, main
from camoxpert.metrics import METRIC_NAMES

REPO = Path(__file__).resolve().parents[2]

# README_MULTI_GPU.md of the seed (upstream CamoXpert, branch with kaggle_2gpu_train.py), verbatim.
SEED_COMMAND = """
python train_ultimate.py train \
    --dataset-path /kaggle/input/cod10k-dataset/COD10K-v3 \
    --checkpoint-dir /kaggle/working/checkpoints_2gpu \
    --backbone edgenext_base \
    --num-experts 7 \
    --batch-size 16 \
    --stage2-batch-size 12 \
    --img-size 320 \
    --epochs 140 \
    --stage1-epochs 30 \
    --lr 0.00065 \
    --stage2-lr 0.00015 \
    --scheduler cosine \
    --min-lr 0.00001 \
    --warmup-epochs 10 \
    --progressive-unfreeze \
    --deep-supervision \
    --num-workers 16
"""


def test_seed_command_parses_unchanged():
    argv = SEED_COMMAND.replace("\\\n", " ").split()[2:]
    args = get_args_parser().parse_args(argv)
    assert (args.command, args.dataset_path, args.checkpoint_dir) == (
        "train", "/kaggle/input/cod10k-dataset/COD10K-v3", "/kaggle/working/checkpoints_2gpu")
    assert (args.backbone, args.num_experts, args.top_k) == ("edgenext_base", 7, None)
    assert (args.batch_size, args.stage2_batch_size, args.accumulation_steps) == (16, 12, 1)
    assert (args.img_size, args.epochs, args.stage1_epochs) == (320, 140, 30)
    assert (args.lr, args.stage2_lr, args.min_lr, args.warmup_epochs) == (0.00065, 0.00015, 0.00001, 10)
    assert (args.scheduler, args.progressive_unfreeze, args.deep_supervision, args.num_workers) == (
        "cosine", True, True, 16)
    # What the library adds, at its defaults.
    assert (args.device, args.strategy, args.precision, args.pretrained) == ("auto", "auto", "auto", True)
    assert (args.use_ema, args.resume_from, args.metric, args.val_fraction) == (False, None, "IoU", 0.1)


def test_metric_choices_are_the_metrics_module_names():
    assert METRIC_CHOICES == METRIC_NAMES


def test_defaults_of_a_minimal_train_command():
    args = get_args_parser().parse_args(["train", "--dataset-path", "data"])
    assert (args.checkpoint_dir, args.backbone, args.num_experts, args.img_size) == ("./checkpoints",
                                                                                      "edgenext_base", 7, 320)
    assert (args.stage2_batch_size, args.accumulation_steps, args.scheduler, args.freeze_backbone) == (
        None, 1, "cosine", "auto")


def test_evaluate_and_predict_parse():
    parser = get_args_parser()
    evaluate = parser.parse_args(["evaluate", "--checkpoint", "best.pt", "--split", "CAMO"])
    assert (evaluate.handler, evaluate.split, evaluate.weights, evaluate.backbone) == ("evaluate", "CAMO", "auto",
                                                                                      None)
    predict = parser.parse_args(["predict", "--checkpoint", "best.pt", "--output-dir", "masks"])
    assert (predict.handler, predict.output_dir, predict.threshold, predict.split) == ("predict", "masks", None,
                                                                                      "test")


@pytest.mark.parametrize(("extra", "message"), [
    (["--stage1-epochs", "50", "--epochs", "40"], "--stage1-epochs 50 must be between 0 and --epochs 40"),
    (["--top-k", "8"], "--top-k 8 must be between 1 and --num-experts 7"),
    (["--min-lr", "0.1"], "--min-lr 0.1 must be between 0 and the peak LRs"),
    (["--scheduler", "cosine_restart"], "invalid choice: 'cosine_restart'"),
])
def test_inconsistent_flags_exit_2_with_the_fix(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dataset-path", "data", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_script_help_runs_as_a_script():
    result = subprocess.run([sys.executable, "train_ultimate.py", "train", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for expected in ("--dataset-path", "GLOBAL batch of one micro-step", "(default: 320)", "--strategy {auto,dp,ddp}",
                     "Model exponential moving average"):
        assert expected in text


def test_missing_dataset_path_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --dataset-path" in capsys.readouterr().err
