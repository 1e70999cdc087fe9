"""``train_ultimate.py``: the seed's command parses unchanged; argument, data and checkpoint errors are one line and
exit status 2; a run folder's earlier run is never replaced; what a run prints and writes."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import autoparallel as ap
from camoxpert.cli import METRIC_CHOICES, get_args_parser, main
from camoxpert.metrics import METRIC_NAMES
from camoxpert.model import build_model
from camoxpert.run_dir import checkpoint_bytes
from camoxpert.synthetic import generate_dataset

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


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--dataset-path", "d", "--backbone", "edgenext_xx_small", "--img-size", "16"],
     "--img-size 16 is below what backbone edgenext_xx_small accepts: its deepest features are 32 times smaller than "
     "the input, so pass --img-size 32 or more"),
    (["train", "--dataset-path", "d", "--backbone", "not_a_model"], "backbone 'not_a_model' is not a timm model"),
    (["train", "--dataset-path", "d", "--num-workers", "-1"], "--num-workers must be 0 (load in the main process) or "
                                                              "more, got -1"),
    (["evaluate", "--checkpoint", "best.pt", "--num-workers", "-1"], "--num-workers must be 0"),
    (["predict", "--checkpoint", "best.pt", "--output-dir", "masks", "--threshold", "2"],
     "--threshold must be a probability between 0 and 1 (exclusive), got 2.0: e.g. --threshold 0.5"),
    (["predict", "--checkpoint", "best.pt", "--output-dir", "masks", "--threshold", "0"], "--threshold must be"),
])
def test_values_the_model_or_the_loader_cannot_use_are_parser_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())


# --- runs, as a user runs them ----------------------------------------------------------------------------------

TINY = ["--backbone", "edgenext_xx_small", "--no-pretrained", "--num-experts", "2", "--img-size", "32",
        "--batch-size", "4", "--epochs", "2", "--stage1-epochs", "0", "--val-fraction", "0.25",
        "--max-steps-per-epoch", "2", "--num-workers", "0", "--device", "cpu", "--log-every", "1000"]


def _script(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **(env or {}))
    return subprocess.run([sys.executable, str(REPO / "train_ultimate.py"), *argv], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("cod") / "data", num_train=12, num_test=2, size=48, seed=0)


@pytest.fixture(scope="module")
def first_run(data, tmp_path_factory):
    """A finished 2-epoch run, trained as a user starts one: python train_ultimate.py train ..."""
    folder = tmp_path_factory.mktemp("run") / "checkpoints"
    result = _script("train", "--dataset-path", str(data), "--checkpoint-dir", str(folder), *TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder, result


def _used_copy(first_run, tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoints"
    shutil.copytree(first_run[0], folder)
    return folder


def test_a_run_prints_one_eta_for_the_run_and_the_loss_within_short_epochs(first_run):
    folder, result = first_run
    epochs = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(" loss ")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]  # one stage: no stage label
    assert "| run ETA " in epochs[0]
    assert "ETA" not in epochs[1]  # the run is over
    # Two optimizer steps per epoch, --log-every 1000: the bar still shows the loss, and the run's ETA.
    assert "loss=" in result.stderr
    assert "run ETA=" in result.stderr
    assert f"curves: {folder / 'curves.png'}" in result.stdout
    with Image.open(folder / "curves.png") as curves:
        assert curves.format == "PNG"


def test_a_second_run_into_the_same_folder_replaces_nothing(first_run, data, tmp_path, capsys):
    folder = _used_copy(first_run, tmp_path)
    before = {name: (folder / name).read_bytes() for name in ("best.pt", "last.pt", "history.jsonl", "args.json")}
    assert main(["train", "--dataset-path", str(data), "--checkpoint-dir", str(folder), *TINY]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {folder} already holds a run (args.json, best.pt, history.jsonl, last.pt); nothing was "
                   f"replaced: pass --resume-from {folder / 'last.pt'} to continue it, --overwrite to start over "
                   "there (its files are removed) or another --checkpoint-dir for a new run\n")
    assert {name: (folder / name).read_bytes() for name in before} == before  # best.pt byte for byte


def test_resume_from_the_folders_last_pt_continues_its_run(first_run, data, tmp_path):
    folder = _used_copy(first_run, tmp_path)
    best = (folder / "best.pt").read_bytes()
    assert main(["train", "--dataset-path", str(data), "--checkpoint-dir", str(folder), *TINY,
                 "--resume-from", str(folder / "last.pt")]) == 0
    assert (folder / "best.pt").read_bytes() == best  # finished already: nothing left to train
    assert len((folder / "history.jsonl").read_text().splitlines()) == 2


def test_overwrite_starts_over_and_leaves_nothing_of_the_earlier_run(first_run, data, tmp_path, capsys):
    folder = _used_copy(first_run, tmp_path)
    (folder / "predictions").mkdir()
    for name in ("epoch_0007.pt", "metrics_test.json", "predictions/old-image.png", "notes.txt"):
        (folder / name).write_text("from before")
    assert main(["train", "--dataset-path", str(data), "--checkpoint-dir", str(folder), *TINY,
                 "--resume-from", str(folder / "last.pt"), "--overwrite"]) == 2
    assert "--overwrite would remove" in capsys.readouterr().err
    assert main(["train", "--dataset-path", str(data), "--checkpoint-dir", str(folder), *TINY, "--overwrite"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["args.json", "best.pt", "curves.png", "history.jsonl",
                                                        "last.pt", "notes.txt"]  # the user's own file stays
    assert [json.loads(line)["epoch"] for line in (folder / "history.jsonl").read_text().splitlines()] == [1, 2]


def test_a_full_disk_is_refused_before_the_first_epoch(data, tmp_path, capsys, monkeypatch):
    nearly_full = SimpleNamespace(total=10**9, used=10**9 - 3 * 10**6, free=3 * 10**6)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: nearly_full)
    folder = tmp_path / "checkpoints"
    assert main(["train", "--dataset-path", str(data), "--checkpoint-dir", str(folder), *TINY, "--use-ema"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: no space left on {re.escape(str(folder))}: (\d+) MB needed for a checkpoint, 3 MB "
                        r"free: free some space or pass --checkpoint-dir on another disk\n", err)
    assert not folder.exists() or not list(folder.iterdir())


def test_the_space_asked_for_holds_a_real_checkpoint(first_run):
    folder, _ = first_run
    model = build_model({"backbone": "edgenext_xx_small", "num_experts": 2})
    estimate = checkpoint_bytes(model, ema=False)
    size = (folder / "last.pt").stat().st_size
    # Weights and two AdamW moments are the bulk; the margin covers the rest (RNG states, arguments, file layout).
    assert estimate < size < estimate * 1.1 + 16 * 2**20


def test_a_data_error_prints_one_line_and_exits_2(data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data, root, ignore=shutil.ignore_patterns(".camoxpert-cache"))
    victim = sorted((root / "Train" / "GT_Object").iterdir())[2]
    Image.fromarray(np.tile(np.linspace(0, 255, 48).astype(np.uint8), (48, 1))).save(victim)  # a grey ramp
    result = _script("train", "--dataset-path", str(root), "--checkpoint-dir", str(tmp_path / "c"), *TINY)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: 1 of 12 masks under {root / 'Train'} are not binary masks:\n  "
                                    f"{victim.name} (")
    assert result.stderr.endswith("Fix: save masks with 0 for the background and one value (255, or 1) for the "
                                  "object.\n")


def test_a_checkpoint_error_prints_one_line_and_exits_2(tmp_path):
    result = _script("evaluate", "--checkpoint", str(tmp_path / "best.pt"), "--device", "cpu")
    assert (result.returncode, result.stderr) == (2, f"error: checkpoint {tmp_path / 'best.pt'} does not exist; "
                                                     f"{tmp_path} has none\n")


def test_a_wrong_dataset_path_is_reported_before_any_process_starts(tmp_path):
    result = _script("train", "--dataset-path", str(tmp_path / "nope"), "--checkpoint-dir", str(tmp_path / "c"),
                     *TINY, env={"AUTOPARALLEL_NPROC": "2"})
    assert (result.returncode, result.stderr) == (2, f"error: data set path {tmp_path / 'nope'} does not exist or is "
                                                     "not a folder: pass --dataset-path DIR\n")
    assert result.stdout == ""  # no DDP job was started for it


@pytest.mark.distributed
def test_under_ddp_a_user_error_is_printed_once_and_exits_2(data, tmp_path):
    (tmp_path / "best.pt").write_bytes(b"not a checkpoint")
    result = _script("evaluate", "--checkpoint", str(tmp_path / "best.pt"), "--dataset-path", str(data),
                     "--num-workers", "0", env={"AUTOPARALLEL_NPROC": "2"})
    assert result.returncode == 2
    # Both ranks fail; the message comes once, from the process the user started, after torchrun's summary.
    assert (result.stdout + result.stderr).count(f"checkpoint {tmp_path / 'best.pt'}") == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"error: checkpoint {tmp_path / 'best.pt'} is damaged or not a PyTorch checkpoint")
    assert "trust" not in last  # garbage is not a legacy file worth trusting


def test_evaluate_reads_the_checkpoint_once(first_run, tmp_path, monkeypatch):
    folder, _ = first_run
    reads, load = [], torch.load

    def counted_load(file, *args, **kwargs):
        reads.append(str(file))
        return load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted_load)
    assert main(["evaluate", "--checkpoint", str(folder / "best.pt"), "--num-workers", "0", "--device", "cpu",
                 "--output", str(tmp_path / "m.json")]) == 0
    assert reads.count(str(folder / "best.pt")) == 1  # the model is built from the same read as its weights


def test_library_fixes_are_named_as_flags(first_run, data, tmp_path, capsys):
    folder, _ = first_run
    legacy = tmp_path / "best_model.pth"
    state = ap.load_checkpoint(folder / "last.pt")  # the weights, in an upstream file with a pickled Namespace
    model = build_model({"backbone": "edgenext_xx_small", "num_experts": 2})
    ap.load_checkpoint(folder / "last.pt", model=model)
    torch.save({"model_state_dict": model.state_dict(), "epoch": state["epoch"],
                "args": argparse.Namespace(backbone="edgenext_xx_small", num_experts=2, img_size=32)}, legacy)
    evaluate = ["evaluate", "--checkpoint", str(legacy), "--dataset-path", str(data), "--num-workers", "0",
                "--device", "cpu", "--output", str(tmp_path / "m.json")]
    assert main(evaluate) == 2
    err = capsys.readouterr().err
    assert "pass --trust-checkpoint" in err
    assert "trusted=True" not in err
    assert main([*evaluate, "--trust-checkpoint"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["num_images"] == 2
    capsys.readouterr()

    assert main(["evaluate", "--checkpoint", str(folder / "best.pt"), "--num-experts", "3", "--num-workers", "0",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {folder / 'best.pt'} does not match the model")
    assert "(--backbone, --num-experts, --top-k, --deep-supervision)" in err
    assert "strict=False" not in err


def test_an_empty_test_split_names_the_keep_noncam_flag(data, tmp_path, capsys, first_run):
    folder, _ = first_run
    root = tmp_path / "data"
    shutil.copytree(data, root, ignore=shutil.ignore_patterns(".camoxpert-cache"))
    for mask in (root / "Test" / "GT_Object").iterdir():
        Image.fromarray(np.zeros((48, 48), np.uint8)).save(mask)
    assert main(["evaluate", "--checkpoint", str(folder / "best.pt"), "--dataset-path", str(root), "--num-workers",
                 "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "has no image with a non-empty mask: pass --keep-noncam to evaluate on those images" in err


def test_our_own_bugs_keep_their_traceback(monkeypatch, tmp_path):
    import camoxpert.evaluate

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(camoxpert.evaluate, "evaluate", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(["evaluate", "--checkpoint", str(tmp_path / "best.pt"), "--device", "cpu"])


def test_a_gpu_out_of_memory_names_the_flags_that_fix_it(data, monkeypatch, tmp_path, capsys):
    import camoxpert.train

    def out_of_memory(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 14.74 GiB total)\n"
                                          "more detail")

    monkeypatch.setattr(camoxpert.train, "train", out_of_memory)
    assert main(["train", "--dataset-path", str(data), "--checkpoint-dir", str(tmp_path / "c"), *TINY]) == 2
    assert capsys.readouterr().err == (
        "error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 14.74 GiB total)): "
        "lower --batch-size (raise --accumulation-steps to keep the effective batch), pass --img-size 288 or "
        "--gradient-checkpointing\n")


def test_a_batch_larger_than_the_training_set_names_the_flag(data, tmp_path, capsys):
    argv = ["train", "--dataset-path", str(data), "--checkpoint-dir", str(tmp_path / "c"), *TINY, "--batch-size", "16"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the dataset has 9 samples, fewer than one global batch (--batch-size 16), so an "
                          "epoch has no batch: lower --batch-size")
    assert "drop_last" not in err


def test_a_checkpoint_dir_that_cannot_be_made_is_one_line(data, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    folder = tmp_path / "a-file" / "checkpoints"
    assert main(["train", "--dataset-path", str(data), "--checkpoint-dir", str(folder), *TINY]) == 2
    assert capsys.readouterr().err == f"error: {folder}: Not a directory\n"
