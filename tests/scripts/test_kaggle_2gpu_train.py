"""kaggle_2gpu_train.py: data set discovery, the printed preset and command, and the exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoparallel import Hardware
from camoxpert import kaggle, presets
from camoxpert.synthetic import MARKER_FILE

REPO = Path(__file__).resolve().parents[2]
T4X2 = Hardware.uniform(2, "Tesla T4", 14.74, (7, 5))


def make_cod10k(root: Path) -> Path:
    for sub in ("Image", "GT_Object"):
        (root / "Train" / sub).mkdir(parents=True)
    return root


def run_dry(tmp_path: Path, *argv: str, environ: dict | None = None, hardware: Hardware = T4X2) -> int:
    return kaggle.main(["--dry-run", *argv], environ=environ or {}, hardware=hardware,
                       kaggle_input=tmp_path / "kaggle_input", kaggle_working=tmp_path / "kaggle_working",
                       cwd=tmp_path / "work")


def command_of(out: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith("Command: "))
    return line.split()[1:]


def flags_of(out: str) -> dict[str, str]:
    """Each --flag of the printed command with the token after it."""
    command = command_of(out)
    return {token: command[i + 1] for i, token in enumerate(command[:-1]) if token.startswith("--")}


def test_discovery_order(tmp_path):
    kaggle_input, work = tmp_path / "input", tmp_path / "work"
    local = make_cod10k(work / "data" / "COD10K-v3")
    assert kaggle.find_dataset(None, kaggle_input=kaggle_input, cwd=work) == kaggle.DatasetChoice(
        local, "working folder", (f"{kaggle_input} (4 levels)", f"{work} (2 levels)"))
    found = make_cod10k(kaggle_input / "cod10k-dataset" / "COD10K-v3")
    assert kaggle.find_dataset(None, kaggle_input=kaggle_input, cwd=work).path == found
    explicit = make_cod10k(tmp_path / "mine")
    assert kaggle.find_dataset(str(explicit), kaggle_input=kaggle_input, cwd=work).source == "--dataset-path"


def test_discovery_prefers_cod10k_and_skips_synthetic_sets(tmp_path):
    make_cod10k(tmp_path / "a-camo-copy")
    make_cod10k(tmp_path / "b" / "COD10K-v3")
    found = kaggle.find_dataset(None, kaggle_input=tmp_path, cwd=tmp_path / "nowhere")
    assert found.path == tmp_path / "b" / "COD10K-v3"
    (make_cod10k(tmp_path / "work" / "data" / "synthetic-cod") / MARKER_FILE).write_text("{}")
    assert kaggle.find_dataset(None, kaggle_input=tmp_path / "none", cwd=tmp_path / "work").path is None


def test_discovery_depth_is_limited(tmp_path):
    make_cod10k(tmp_path / "1" / "2" / "3" / "4" / "5")
    assert kaggle.find_dataset(None, kaggle_input=tmp_path, cwd=tmp_path / "none").path is None


def test_missing_dataset_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--dataset-path .*nope does not exist"):
        kaggle.find_dataset(str(tmp_path / "nope"), kaggle_input=tmp_path, cwd=tmp_path)


def test_dry_run_on_two_t4_prints_the_preset_and_the_command(tmp_path, capsys):
    data = make_cod10k(tmp_path / "kaggle_input" / "cod10k-dataset" / "COD10K-v3")
    assert run_dry(tmp_path, "--strategy", "dp") == 0
    out = capsys.readouterr().out
    assert "Strategy: DataParallel over 2 GPUs in one process" in out
    assert "Preset 2xT4: 2 x Tesla T4 (14.7 GiB each), 1 process" in out
    assert f"Data set: {data} (from /kaggle/input)" in out
    assert command_of(out)[:4] == ["python", "train_ultimate.py", "train", "--dataset-path"]
    flags = flags_of(out)
    assert (flags["--dataset-path"], flags["--batch-size"], flags["--accumulation-steps"], flags["--precision"],
            flags["--strategy"]) == (str(data), "16", "1", "fp16", "dp")
    assert flags["--checkpoint-dir"] == str(tmp_path / "work" / "checkpoints")


def test_auto_strategy_on_two_gpus_is_ddp_like_train_ultimate(tmp_path, capsys):
    make_cod10k(tmp_path / "work" / "COD10K-v3")
    assert run_dry(tmp_path) == 0
    out = capsys.readouterr().out
    assert "Strategy: DDP, 2 processes, one per GPU" in out
    assert "--strategy ddp" in out


def test_no_dataset_runs_the_demo(tmp_path, capsys):
    assert run_dry(tmp_path, hardware=Hardware()) == 0
    out = capsys.readouterr().out
    assert "Preset CPU: CPU only" in out
    assert "DEMO: no data set found (looked in" in out
    flags = flags_of(out)
    assert flags["--dataset-path"] == str(tmp_path / "work" / "data" / "synthetic-cod")
    assert flags["--checkpoint-dir"] == str(tmp_path / "work" / "checkpoints" / "demo")
    assert flags["--backbone"] == presets.DEMO.backbone == "edgenext_xx_small"
    assert flags["--augment"] == "light"


def test_environment_and_flags_override(tmp_path, capsys):
    make_cod10k(tmp_path / "work" / "COD10K-v3")
    env = {"TRAIN_BATCH_SIZE": "4", "IMG_SIZE": "256", "CHECKPOINT_DIR": str(tmp_path / "ckpt")}
    assert run_dry(tmp_path, "--strategy", "dp", "--img-size", "288", "--", "--use-ema", environ=env) == 0
    out = capsys.readouterr().out
    flags = flags_of(out)
    assert (flags["--batch-size"], flags["--accumulation-steps"], flags["--img-size"]) == ("8", "2", "288")
    assert flags["--checkpoint-dir"] == str(tmp_path / "ckpt")
    assert command_of(out)[-1] == "--use-ema"
    assert "TRAIN_BATCH_SIZE=4 (environment)" in out


def test_kaggle_checkpoint_dir(tmp_path, capsys):
    make_cod10k(tmp_path / "kaggle_input" / "COD10K-v3")
    assert run_dry(tmp_path, environ={"KAGGLE_KERNEL_RUN_TYPE": "Batch"}) == 0
    assert flags_of(capsys.readouterr().out)["--checkpoint-dir"] == str(tmp_path / "kaggle_working" / "checkpoints")


@pytest.mark.parametrize(("environ", "argv", "budget"), [
    ({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, (), "11h30m"),  # a session ends at 12 h: stop and save before it
    ({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, ("--time-budget", "5h"), "5h"),
    ({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, ("--", "--time-budget", "2h"), "2h"),  # given to train itself
    ({}, (), None),  # not on Kaggle: no limit unless asked
])
def test_on_kaggle_the_run_stops_before_the_session_limit_unless_told_otherwise(tmp_path, capsys, environ, argv,
                                                                                budget):
    make_cod10k(tmp_path / ("kaggle_input" if environ else "work") / "COD10K-v3")
    assert run_dry(tmp_path, *argv, environ=environ) == 0
    command = command_of(capsys.readouterr().out)
    assert command.count("--time-budget") == (budget is not None)
    assert flags_of(" ".join(["Command:", *command])).get("--time-budget") == budget


def test_resume_finds_last_pt(tmp_path, capsys):
    make_cod10k(tmp_path / "work" / "COD10K-v3")
    checkpoints = tmp_path / "work" / "checkpoints"
    with pytest.raises(SystemExit) as exit_info:
        run_dry(tmp_path, "--resume")
    assert exit_info.value.code == 2
    assert f"--resume: no last.pt in {checkpoints}" in capsys.readouterr().err
    checkpoints.mkdir()
    (checkpoints / "last.pt").write_bytes(b"")
    assert run_dry(tmp_path, "--resume") == 0
    assert flags_of(capsys.readouterr().out)["--resume-from"] == str(checkpoints / "last.pt")


@pytest.mark.parametrize(("argv", "environ", "message"), [
    (["--simulate", "2xT4"], {}, "--simulate only describes another machine: add --dry-run"),
    (["--dry-run", "--batch-size", "8", "--per-gpu-batch-size", "4"], {}, "keep one"),
    (["--dry-run"], {"EPOCHS": "many"}, "EPOCHS='many' is not an integer"),
    (["--dry-run"], {"AUTOPARALLEL_STRATEGY": "fast"}, "AUTOPARALLEL_STRATEGY='fast' is not valid: choose one of"),
    (["--dry-run", "--num-workers", "-1"], {}, "--num-workers=-1 is too small: it must be at least 0"),
])
def test_usage_errors_exit_2(tmp_path, capsys, argv, environ, message):
    with pytest.raises(SystemExit) as exit_info:
        kaggle.main(argv, environ=environ, hardware=T4X2, kaggle_input=tmp_path, kaggle_working=tmp_path / "kw",
                    cwd=tmp_path)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_script_dry_run_simulating_two_t4(tmp_path):
    env = dict(os.environ, CAMOXPERT_KAGGLE_INPUT=str(tmp_path), PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, str(REPO / "kaggle_2gpu_train.py"), "--dry-run", "--simulate", "2xT4"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Preset 2xT4: 2 x Tesla T4 (14.7 GiB each), 2 processes" in result.stdout
    assert "  global batch          16      8 per GPU x 2 GPUs" in result.stdout
    assert "  precision             fp16" in result.stdout


@pytest.mark.slow
def test_small_demo_end_to_end_in_its_own_folders(tmp_path):
    # One thread: on a shared 2-core machine OpenMP's spinning threads make a step ten times slower.
    env = dict(os.environ, CAMOXPERT_KAGGLE_INPUT=str(tmp_path / "none"), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")

    def demo_small(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "kaggle_2gpu_train.py"), "--demo-small", *flags],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    result = demo_small()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    demo = tmp_path / "checkpoints" / "demo-small"
    assert "DEMO: asked for (--demo-small)" in result.stdout
    assert f"  checkpoints:       {demo} (best.pt, last.pt, history.jsonl)" in result.stdout
    assert f"  curves:            {demo / 'curves.png'}" in result.stdout
    assert "  test metrics:      IoU " in result.stdout
    assert (demo / "best.pt").is_file()
    assert (demo / "last.pt").is_file()
    assert (demo / "curves.png").is_file()
    assert json.loads((demo / "metrics_test.json").read_text())["num_images"] == 4
    assert len(list((demo / "predictions").glob("*.png"))) == 4
    # Its own folders: `make demo`'s checkpoints and data set are not touched.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["demo-small"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["synthetic-cod-small"]

    best = (demo / "best.pt").read_bytes()
    again = demo_small()
    assert again.returncode == 2
    assert f"{demo} already holds a run" in again.stderr
    assert "pass --resume to continue it, --overwrite to start over there" in again.stderr
    assert (demo / "best.pt").read_bytes() == best

    (demo / "predictions" / "from-another-data-set.png").write_bytes(b"")
    resumed = demo_small("--resume")  # nothing left to train: evaluation and predictions again
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert len(list((demo / "predictions").glob("*.png"))) == 4  # this run's masks only
    assert (demo / "best.pt").read_bytes() == best


def test_a_rerun_into_a_used_folder_is_refused_before_training(tmp_path, capsys):
    make_cod10k(tmp_path / "work" / "COD10K-v3")
    checkpoints = tmp_path / "work" / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "last.pt").write_bytes(b"an earlier run")
    with pytest.raises(SystemExit) as exit_info:
        kaggle.main([], environ={}, hardware=Hardware(), kaggle_input=tmp_path / "kaggle_input",
                    kaggle_working=tmp_path / "kaggle_working", cwd=tmp_path / "work")
    assert exit_info.value.code == 2
    assert (f"{checkpoints} already holds a run (last.pt); nothing was replaced: pass --resume to continue it, "
            "--overwrite to start over there (its files are removed) or another --checkpoint-dir for a new run"
            in " ".join(capsys.readouterr().err.split()))
    assert (checkpoints / "last.pt").read_bytes() == b"an earlier run"


def test_the_small_demo_has_its_own_folders(tmp_path, capsys):
    assert run_dry(tmp_path, "--demo-small", hardware=Hardware()) == 0
    flags = flags_of(capsys.readouterr().out)
    assert flags["--checkpoint-dir"] == str(tmp_path / "work" / "checkpoints" / "demo-small")
    assert flags["--dataset-path"] == str(tmp_path / "work" / "data" / "synthetic-cod-small")


def test_demo_data_is_generated_once_and_replaced_when_the_demo_changes(tmp_path):
    root = tmp_path / "data" / "synthetic-cod"
    tiny = presets.DemoConfig(num_train=2, num_test=1, source_size=32)
    (tmp_path / "data" / "synthetic-cod.partial" / "Train").mkdir(parents=True)  # left by an interrupted run
    kaggle._prepare_demo_data(tiny, root, {})
    images = sorted(p.name for p in (root / "Train" / "Image").iterdir())
    assert len(images) == 2
    assert not (tmp_path / "data" / "synthetic-cod.partial").exists()
    stamp = (root / MARKER_FILE).stat().st_mtime_ns
    kaggle._prepare_demo_data(tiny, root, {})
    assert (root / MARKER_FILE).stat().st_mtime_ns == stamp
    kaggle._prepare_demo_data(presets.DemoConfig(num_train=3, num_test=1, source_size=32), root, {})
    assert len(list((root / "Train" / "Image").iterdir())) == 3


def test_demo_data_never_replaces_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match="was not written by the demo"):
        kaggle._prepare_demo_data(presets.DEMO_SMALL, tmp_path / "mine", {})
