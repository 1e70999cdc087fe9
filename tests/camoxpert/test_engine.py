"""End to end on a tiny synthetic data set: train, resume exactly, evaluate, predict (CPU, one process)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import autoparallel as ap
from camoxpert import console, run_dir
from camoxpert.cli import get_args_parser, main
from camoxpert.console import describe_batch, epoch_line
from camoxpert.metrics import METRIC_NAMES
from camoxpert.synthetic import generate_dataset
from camoxpert.train import Trainer

# Two test images get non-square original sizes, so predictions must be resized back to them.
RESIZED = {0: (80, 56), 1: (48, 72)}  # test image number -> (width, height)


@pytest.fixture(scope="module")
def one_thread():
    # On a shared 2-core machine two intra-op threads mostly spin against each other; one is faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = generate_dataset(tmp_path_factory.mktemp("cod") / "data", num_train=24, num_test=8, size=64, seed=0)
    images = sorted((root / "Test" / "Image").iterdir())
    for number, size in RESIZED.items():
        image_path = images[number]
        mask_path = root / "Test" / "GT_Object" / f"{image_path.stem}.png"
        Image.open(image_path).resize(size, Image.BILINEAR).save(image_path)
        Image.open(mask_path).resize(size, Image.NEAREST).save(mask_path)
    return root


def _train_args(dataset: Path, checkpoint_dir: Path, *extra: str):
    argv = ["train", "--dataset-path", str(dataset), "--checkpoint-dir", str(checkpoint_dir),
            "--backbone", "edgenext_xx_small", "--no-pretrained", "--num-experts", "3", "--img-size", "32",
            "--batch-size", "4", "--epochs", "2", "--stage1-epochs", "1", "--lr", "2e-3", "--stage2-lr", "1e-3",
            "--warmup-epochs", "1", "--freeze-backbone", "always", "--progressive-unfreeze", "--use-ema",
            "--ema-decay", "0.9", "--val-fraction", "0.2", "--num-workers", "0", "--device", "cpu", "--seed", "3",
            *extra]
    return get_args_parser().parse_args(argv)


@pytest.fixture(scope="module")
def straight_run(dataset, tmp_path_factory, one_thread):
    directory = tmp_path_factory.mktemp("run")
    trainer = Trainer(_train_args(dataset, directory))
    result = trainer.fit()
    return trainer, result, directory


def test_training_writes_checkpoints_history_and_config(straight_run):
    trainer, result, directory = straight_run
    assert {path.name for path in directory.iterdir()} >= {"last.pt", "best.pt", "history.jsonl", "args.json"}
    history = [json.loads(line) for line in (directory / "history.jsonl").read_text().splitlines()]
    assert [(h["epoch"], h["stage"], h["unfreeze"]) for h in history] == [
        (1, "stage1", "backbone frozen"), (2, "stage2", "backbone: deepest 1/4 stages trainable")]
    assert all(set(h["val"]) == set(METRIC_NAMES) for h in history)
    # 19 training images (5 held out for validation) in batches of 4: 4 optimizer steps per epoch.
    assert [h["step"] for h in history] == [4, 8]
    best = max(history, key=lambda h: h["val"]["IoU"])
    assert result["best_metric"] == best["val"]["IoU"]
    assert result["best_epoch"] == best["epoch"]
    config = json.loads((directory / "args.json").read_text())
    assert (config["top_k"], config["stage2_batch_size"], config["pretrained_loaded"]) == (2, 4, False)
    info = ap.load_checkpoint(directory / "last.pt", map_location="cpu")
    assert (info["epoch"], info["step"], info["extra"]["best_metric"]) == (1, 8, result["best_metric"])


def test_stage1_froze_the_backbone_and_stage2_unfroze_the_deepest_stage(straight_run):
    trainer, _, _ = straight_run
    stages = ap.unwrap(trainer.model).backbone_stages()
    assert all(p.requires_grad for p in stages[0].parameters())
    assert not any(p.requires_grad for stage in stages[1:] for p in stage.parameters())
    # One optimizer for the whole run, the backbone at its own LR scale (1.0: random initialisation).
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["backbone", "backbone_no_decay", "head",
                                                                   "head_no_decay"]


def _tensors(state):
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in _tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in _tensors(item)]
    return []


def test_resume_from_last_continues_exactly(straight_run, dataset, tmp_path, one_thread):
    straight, _, _ = straight_run
    first = Trainer(_train_args(dataset, tmp_path))
    first.fit(num_epochs=1)  # a session that stops after epoch 1
    resumed = Trainer(_train_args(dataset, tmp_path, "--resume-from", str(tmp_path / "last.pt")))
    assert (resumed.start_epoch, resumed.step) == (1, 4)
    saved, loaded = first.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert [g["lr"] for g in loaded["param_groups"]] == [g["lr"] for g in saved["param_groups"]]
    assert all(torch.equal(a, b) for a, b in zip(_tensors(saved["state"]), _tensors(loaded["state"])))
    assert resumed.scheduler.last_epoch == 4
    resumed.fit()
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    for mine, reference in ((resumed.model, straight.model), (resumed.ema.module, straight.ema.module)):
        for (name, a), (_, b) in zip(ap.unwrap(mine).state_dict().items(), ap.unwrap(reference).state_dict().items()):
            assert torch.equal(a, b), name


def test_evaluate_scores_the_saved_ema_weights(straight_run, dataset, tmp_path, one_thread):
    _, result, directory = straight_run
    output = tmp_path / "val.json"
    # --batch-size 4 as in training, so validation and evaluate run the same batch shapes (4 + 1) in one
    # process with one thread: then the kernels, and so the metrics, are bitwise the same.
    assert main(["evaluate", "--checkpoint", str(directory / "best.pt"), "--split", "val", "--output", str(output),
                 "--batch-size", "4", "--num-workers", "0", "--device", "cpu"]) == 0
    metrics = json.loads(output.read_text())
    assert (metrics["weights"], metrics["num_images"], metrics["split"]) == ("ema", 5, "val")
    # The very weights validation scored when it chose best.pt.
    assert metrics["metrics"]["IoU"] == result["best_metric"]

    assert main(["evaluate", "--checkpoint", str(directory / "last.pt"), "--dataset-path", str(dataset),
                 "--num-workers", "0", "--device", "cpu"]) == 0
    test_metrics = json.loads((directory / "metrics_test.json").read_text())
    assert set(test_metrics) >= {"checkpoint", "dataset_path", "split", "num_images", "weights", "metrics",
                                 "per_image"}
    assert set(test_metrics["metrics"]) == set(METRIC_NAMES)
    assert test_metrics["num_images"] == len(test_metrics["per_image"]) == 8


def test_predict_writes_masks_at_the_original_sizes(straight_run, dataset, tmp_path, one_thread):
    _, _, directory = straight_run
    out = tmp_path / "masks"
    assert main(["predict", "--checkpoint", str(directory / "best.pt"), "--output-dir", str(out),
                 "--num-workers", "0", "--device", "cpu", "--threshold", "0.5"]) == 0
    images = sorted((dataset / "Test" / "Image").iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.png" for p in images)
    for image_path in images:
        with Image.open(image_path) as image, Image.open(out / f"{image_path.stem}.png") as mask:
            assert (mask.size, mask.mode) == (image.size, "L")
            assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    assert {Image.open(out / f"{images[n].stem}.png").size for n in RESIZED} == set(RESIZED.values())


def test_batch_description_states_the_per_process_share_and_effective_batch():
    ddp = ap.Runtime(mode="ddp", device=torch.device("cpu"), device_ids=(), world_size=2, backend="gloo")
    assert describe_batch(16, 2, ddp) == ("global batch 16 per micro-step (8 per process x 2 processes) x 2 "
                                          "accumulation step(s) = effective batch 32 per optimizer step")
    dp = ap.Runtime(mode="dp", device=torch.device("cuda", 0), device_ids=(0, 1), precision="fp16")
    assert "split by DataParallel over 2 GPUs, 6 on the first" in describe_batch(12, 1, dp)


def test_upstream_best_model_resumes_weights_and_epoch_only(straight_run, dataset, tmp_path, one_thread):
    straight, _, _ = straight_run
    upstream = {"epoch": 0, "model_state_dict": {f"module.{k}": v for k, v in
                                                 ap.unwrap(straight.model).state_dict().items()},
                "ema_state_dict": None, "best_iou": 0.5, "args": {"backbone": "edgenext_xx_small"}}
    torch.save(upstream, tmp_path / "best_model.pth")
    trainer = Trainer(_train_args(dataset, tmp_path / "run", "--resume-from", str(tmp_path / "best_model.pth")))
    assert (trainer.start_epoch, trainer.step, trainer.best) == (1, 4, None)
    assert trainer.optimizer.state_dict()["state"] == {}  # moments start fresh
    head_lr = trainer.plan.lr_at(4)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([head_lr] * 4, rel=1e-12)
    assert head_lr == pytest.approx(1e-3 / 4)  # stage 2, first warm-up step
    for a, b in zip(ap.unwrap(trainer.model).state_dict().values(), ap.unwrap(straight.model).state_dict().values()):
        assert torch.equal(a, b)


def test_epoch_length_is_whole_accumulation_windows_capped_by_max_steps(dataset, tmp_path, one_thread):
    # 19 images: 4 batches of 4 (stage 1) and 2 batches of 8 (stage 2); at most 3 per epoch, in windows of 2.
    trainer = Trainer(_train_args(dataset, tmp_path, "--max-steps-per-epoch", "3", "--accumulation-steps", "2",
                                  "--stage2-batch-size", "8"))
    assert trainer.micro_batches == {"stage1": 2, "stage2": 2}
    assert [(p.name, p.num_steps) for p in trainer.plan.phases] == [("stage1", 1), ("stage2", 1)]
    assert trainer.loaders["stage2"].global_batch_size == 8


def _history(directory: Path) -> list[dict]:
    """history.jsonl without the timings, which differ from run to run."""
    records = [json.loads(line) for line in (directory / "history.jsonl").read_text().splitlines()]
    return [{key: value for key, value in r.items() if key not in ("time_s", "images_per_s")} for r in records]


def test_masks_in_0_1_and_in_0_255_train_and_score_identically(dataset, tmp_path, one_thread):
    zero_one = tmp_path / "zero-one"
    shutil.copytree(dataset, zero_one, ignore=shutil.ignore_patterns(".camoxpert-cache"))
    for mask_path in zero_one.glob("*/GT_Object/*.png"):
        pixels = np.asarray(Image.open(mask_path))
        assert set(np.unique(pixels).tolist()) <= {0, 255}
        Image.fromarray((pixels > 0).astype(np.uint8)).save(mask_path)  # the same masks as 0/1
    runs = {}
    for name, root in (("0-255", dataset), ("0-1", zero_one)):
        argv = ["train", "--dataset-path", str(root), "--checkpoint-dir", str(tmp_path / name), "--backbone",
                "edgenext_xx_small", "--no-pretrained", "--num-experts", "2", "--img-size", "32", "--batch-size", "4",
                "--epochs", "2", "--stage1-epochs", "0", "--val-fraction", "0.2", "--max-steps-per-epoch", "2",
                "--num-workers", "0", "--device", "cpu", "--seed", "1"]
        assert main(argv) == 0
        assert main(["evaluate", "--checkpoint", str(tmp_path / name / "last.pt"), "--num-workers", "0",
                     "--device", "cpu"]) == 0
        runs[name] = (_history(tmp_path / name), json.loads((tmp_path / name / "metrics_test.json").read_text()))
    # Same process, same thread count, same batch shapes: the runs are the same computation, bit for bit.
    assert runs["0-1"][0] == runs["0-255"][0]
    assert runs["0-1"][1]["metrics"] == runs["0-255"][1]["metrics"]
    # All 8 test images scored: none of the 0/1 masks was taken for an empty (NonCAM) one.
    assert runs["0-1"][1]["num_images"] == runs["0-255"][1]["num_images"] == 8


def test_curves_are_written_after_every_epoch(straight_run, dataset, tmp_path, one_thread):
    _, _, directory = straight_run
    with Image.open(directory / "curves.png") as curves:
        assert (curves.format, curves.size) == ("PNG", (1100, 400))
    session = Trainer(_train_args(dataset, tmp_path))
    session.fit(num_epochs=1)  # a run stopped (or killed) after epoch 1 has its curves so far
    with Image.open(tmp_path / "curves.png") as curves:
        assert curves.format == "PNG"
    assert not list(tmp_path.glob(".*.tmp"))
    assert not (tmp_path / "tensorboard").exists()


def test_stage_labels_name_the_stages_a_run_has(straight_run):
    trainer, _, _ = straight_run
    assert [trainer.stage_label(epoch) for epoch in (0, 1)] == ["stage 1/2", "stage 2/2"]
    record = {"epoch": 1, "train_loss": 0.5, "val": None, "time_s": 2.0, "images_per_s": 8.0, "best": False}
    assert epoch_line(record, epochs=2, label="stage 1/2", lr=1e-3, eta="3 s") == (
        "epoch 1/2 [stage 1/2] loss 0.5000 | lr 0.001 | 2.0 s, 8.0 img/s | run ETA 3 s")
    assert epoch_line(dict(record, epoch=2), epochs=2, label="", lr=1e-3, eta="0 s") == (
        "epoch 2/2 loss 0.5000 | lr 0.001 | 2.0 s, 8.0 img/s")


def test_a_nan_loss_skips_its_step_and_the_epoch_line_counts_it(dataset, tmp_path, one_thread, monkeypatch, capsys):
    from camoxpert.losses import CODLoss

    calls, original = [], CODLoss.__call__

    def nan_once(self, output, masks):
        loss, parts = original(self, output, masks)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), parts

    monkeypatch.setattr(CODLoss, "__call__", nan_once)
    trainer = Trainer(_train_args(dataset, tmp_path, "--epochs", "1", "--stage1-epochs", "1", "--max-grad-norm", "0"))
    trainer.fit()
    record = json.loads((tmp_path / "history.jsonl").read_text().splitlines()[0])
    assert (record["nonfinite_losses"], record["skipped_steps"]) == (1, 1)
    assert all(torch.isfinite(p).all() for p in ap.unwrap(trainer.model).parameters())
    assert "1 step(s) skipped (non-finite)" in capsys.readouterr().out


class _Bar:
    def __init__(self) -> None:
        self.postfixes: list[dict] = []

    def set_postfix(self, postfix: dict) -> None:
        self.postfixes.append(postfix)


def test_bar_loss_reads_the_device_after_the_first_step_then_every_few_seconds(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(console.time, "perf_counter", lambda: now[0])
    bar = _Bar()
    shown = console.BarLoss(bar, torch.device("cpu"), every_steps=1000, every_s=2.0, show=True)
    for step, (loss, seconds) in enumerate([(1.0, 0.5), (3.0, 0.5), (5.0, 0.5), (7.0, 0.5), (9.0, 0.5)], start=1):
        shown.add(torch.tensor(loss))
        shown.after_step(step, lr=0.01, eta=None)
        now[0] += seconds
    # Step 1 at once, then nothing until 2 s have passed (step 5): two host syncs for five steps.
    assert bar.postfixes == [{"loss": "1.0000", "lr": "1.00e-02"}, {"loss": "6.0000", "lr": "1.00e-02"}]
    hidden = console.BarLoss(_Bar(), torch.device("cpu"), every_steps=1, every_s=0.0, show=False)
    hidden.add(torch.tensor(1.0))
    hidden.after_step(1, lr=0.01, eta=None)
    assert hidden.bar.postfixes == []  # other ranks never sync for a bar they do not show


class HourClock:
    """time.monotonic for the stop request: every reading is one hour after the previous one."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 3600.0
        return self.now


def test_a_time_budget_stops_mid_epoch_and_the_resume_equals_the_uninterrupted_run(
        straight_run, dataset, tmp_path, one_thread, monkeypatch):
    straight, _, straight_dir = straight_run
    monkeypatch.setattr(sys.modules["autoparallel.stop"].time, "monotonic", HourClock())
    first = Trainer(_train_args(dataset, tmp_path, "--time-budget", "150m"))
    result = first.fit()  # 2 h at the first step's check, 3 h at the second's: stops after step 2 of 4
    assert result["stopped"] == "time budget of 9000 s reached"
    assert first.step == 2
    info = ap.load_checkpoint(tmp_path / "last.pt")
    assert (info["epoch"], info["step"], info["loader"]) == (0, 2, {"epoch": 0, "batch": 2})
    assert info["extra"]["partial_epoch"]["micro_done"] == 2
    monkeypatch.undo()

    resumed = Trainer(_train_args(dataset, tmp_path, "--resume-from", str(tmp_path / "last.pt")))
    assert (resumed.start_epoch, resumed.step) == (0, 2)
    resumed.fit()
    for mine, reference in ((resumed.model, straight.model), (resumed.ema.module, straight.ema.module)):
        for (name, a), (_, b) in zip(ap.unwrap(mine).state_dict().items(), ap.unwrap(reference).state_dict().items()):
            assert torch.equal(a, b), name  # one process, same shapes and order: bitwise
    assert _history(tmp_path) == _history(straight_dir)  # the resumed epoch's loss too


def test_a_run_killed_after_a_periodic_save_resumes_from_it_exactly(straight_run, dataset, tmp_path, one_thread,
                                                                     monkeypatch):
    straight, _, straight_dir = straight_run
    first = Trainer(_train_args(dataset, tmp_path, "--save-every", "3"))
    real_save = Trainer._save

    def save_then_die(self, epoch, **kwargs):  # the process is killed right after the mid-epoch save at step 3
        real_save(self, epoch, **kwargs)
        if "partial_epoch" in kwargs:
            raise SystemExit("killed")

    monkeypatch.setattr(Trainer, "_save", save_then_die)
    with pytest.raises(SystemExit):
        first.fit()
    monkeypatch.undo()
    assert ap.load_checkpoint(tmp_path / "last.pt")["loader"] == {"epoch": 0, "batch": 3}
    resumed = Trainer(_train_args(dataset, tmp_path, "--resume-from", str(tmp_path / "last.pt"), "--save-every", "3"))
    resumed.fit()
    for (name, a), (_, b) in zip(ap.unwrap(resumed.model).state_dict().items(),
                                 ap.unwrap(straight.model).state_dict().items()):
        assert torch.equal(a, b), name
    assert _history(tmp_path) == _history(straight_dir)


def test_a_run_resumed_from_an_earlier_epoch_writes_the_epochs_after_it_once(tmp_path):
    # Resuming from best.pt of epoch 1 in a folder whose history already reached epoch 3: epochs 2 and 3 are
    # trained again, and history.jsonl must hold each epoch once, as curves.png does.
    history = tmp_path / "history.jsonl"
    history.write_text("".join(json.dumps({"epoch": e, "train_loss": 1.0 / e, "val": None}) + "\n" for e in (1, 2, 3)))
    log = run_dir.RunLog(tmp_path, enabled=True)
    log.start({"epochs": 3}, start_epoch=1)
    for epoch in (2, 3):
        log.add({"epoch": epoch, "train_loss": 0.1, "val": None})
    lines = [json.loads(line) for line in history.read_text().splitlines()]
    assert [(r["epoch"], r["train_loss"]) for r in lines] == [(1, 1.0), (2, 0.1), (3, 0.1)]
    assert [r["epoch"] for r in log.records] == [1, 2, 3]
    assert not list(tmp_path.glob(".*.tmp"))
