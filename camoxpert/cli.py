"""Command line of ``train_ultimate.py``: ``train``, ``evaluate`` and ``predict`` subcommands.

The ``train`` flags keep CamoXpert's documented names, so its published command runs unchanged; the help
says where a meaning differs (``--batch-size`` is the global batch of one micro-step whatever the number
of GPUs). A user error ends the command with ``error: <message>`` and exit status 2 (:mod:`camoxpert.errors`).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import autoparallel as ap

from . import placement
from .errors import report, user_message
from .layout import detect_layout
from .run_dir import claim
from .schedule import SCHEDULERS

METRIC_CHOICES = ("IoU", "S-measure", "E-measure", "weighted-F", "MAE")


def _add_runtime_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Where to run (autoparallel)")
    group.add_argument("--device", default="auto", help=placement.DEVICE_HELP)
    group.add_argument("--strategy", default="auto", choices=("auto", "dp", "ddp"),
                       help="auto and ddp: one DDP process per GPU on 2+ GPUs (a plain 'python' run re-launches "
                            "itself through torch.distributed.run; under torchrun/accelerate/SLURM it joins the job); "
                            "dp: one process driving every GPU with DataParallel; AUTOPARALLEL_NPROC=N runs N "
                            "processes, also on the CPU (default: auto)")
    group.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                       help="auto: bf16 where the GPU supports it, fp16 with a grad scaler on older GPUs, "
                            "fp32 on CPU (default: auto)")
    group.add_argument("--num-workers", type=int, default=None,
                       help="data loader worker processes per process (default: chosen from the CPU count)")


def _add_model_args(parser: argparse.ArgumentParser, *, from_checkpoint: bool) -> None:
    group = parser.add_argument_group("Model" + (" (default: as recorded in the checkpoint)" if from_checkpoint
                                                 else ""))
    default = None if from_checkpoint else "edgenext_base"
    group.add_argument("--backbone", default=default,
                       help=f"any timm model that supports features_only (default: {default or 'from checkpoint'})")
    group.add_argument("--num-experts", type=int, default=None if from_checkpoint else 7,
                       help="experts per MoE layer (default: " + ("from checkpoint)" if from_checkpoint else "7)"))
    group.add_argument("--top-k", type=int, default=None,
                       help="experts routed per image (default: " + ("from checkpoint)" if from_checkpoint
                                                                    else "max(2, num_experts // 2), 3 for 7)"))
    if from_checkpoint:
        group.add_argument("--img-size", type=int, default=None,
                           help="square input side in pixels (default: from checkpoint)")
        return
    group.add_argument("--deep-supervision", action="store_true",
                       help="add side outputs at every decoder scale and their loss (default: off)")
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in backward to save memory (default: off)")
    group.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                       help="load timm's pretrained backbone weights when available (cache or --pretrained-path); "
                            "falls back to random initialisation and says so (default: on)")
    group.add_argument("--pretrained-path", default=None,
                       help="local file with the backbone's pretrained weights (default: timm's cache)")


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="two-stage training with validation and checkpoints",
        description="Train CamoXpert: stage 1 (backbone frozen when pretrained) then stage 2 (unfrozen).")

    data = parser.add_argument_group("Data")
    data.add_argument("--dataset-path", required=True,
                      help="data set root: COD10K-v3 (Train/Image, Train/GT_Object, ...), Imgs+GT layouts (required)")
    data.add_argument("--img-size", type=int, default=320, help="square training side in pixels (default: 320)")
    data.add_argument("--val-fraction", type=float, default=0.1,
                      help="share of Train held out for validation, seeded by --seed (default: 0.1)")
    data.add_argument("--augment", default="standard", choices=("standard", "light", "none"),
                      help="training augmentation: standard (crops to half the area, rotation, colour jitter), "
                           "light (crops to 80%%, flip, colour jitter: for short runs such as the demo) or none "
                           "(default: standard)")
    data.add_argument("--keep-noncam", action="store_true",
                      help="train on COD10K's NonCAM images (empty masks) too, as the original script did; the "
                           "literature's training set is CAM-only, and NonCAM never go to validation "
                           "(default: excluded)")

    _add_model_args(parser, from_checkpoint=False)

    batch = parser.add_argument_group("Batch")
    batch.add_argument("--batch-size", type=int, default=8,
                       help="GLOBAL batch of one micro-step, split over all GPUs/processes (default: 8)")
    batch.add_argument("--stage2-batch-size", type=int, default=None,
                       help="global micro-step batch in stage 2, e.g. smaller once the backbone trains "
                            "(default: same as --batch-size)")
    batch.add_argument("--accumulation-steps", type=int, default=1,
                       help="micro-steps per optimizer step; effective batch = batch x accumulation (default: 1)")

    optim = parser.add_argument_group("Optimisation and schedule")
    optim.add_argument("--epochs", type=int, default=120, help="total epochs, stage 1 + stage 2 (default: 120)")
    optim.add_argument("--stage1-epochs", type=int, default=30, help="epochs of stage 1 (default: 30)")
    optim.add_argument("--lr", type=float, default=2.5e-4, help="stage-1 peak LR of the decoder (default: 2.5e-4)")
    optim.add_argument("--stage2-lr", type=float, default=None, help="stage-2 peak LR (default: --lr)")
    optim.add_argument("--backbone-lr-scale", type=float, default=None,
                       help="backbone LR as a fraction of the decoder's (default: 0.1 with pretrained weights, "
                            "1.0 from random initialisation)")
    optim.add_argument("--weight-decay", type=float, default=1e-4,
                       help="AdamW weight decay, not applied to norms and biases (default: 1e-4)")
    optim.add_argument("--scheduler", default="cosine", choices=SCHEDULERS,
                       help="per-step LR shape inside each stage (default: cosine)")
    optim.add_argument("--min-lr", type=float, default=1e-6,
                       help="LR the cosine ends at, for the decoder (the backbone ends at its scale of it) "
                            "(default: 1e-6)")
    optim.add_argument("--warmup-epochs", type=int, default=0,
                       help="linear warm-up at the start of each stage, every group keeping its LR ratio (default: 0)")
    optim.add_argument("--max-grad-norm", type=float, default=1.0,
                       help="gradient clipping norm, 0 to disable (default: 1.0)")

    freeze = parser.add_argument_group("Backbone freezing")
    freeze.add_argument("--freeze-backbone", default="auto", choices=("auto", "always", "never"),
                        help="freeze the backbone in stage 1; auto: only when pretrained weights were loaded "
                             "(default: auto)")
    freeze.add_argument("--progressive-unfreeze", action="store_true",
                        help="in stage 2 unfreeze the backbone a stage at a time, deepest first (default: off)")

    ema = parser.add_argument_group("Model exponential moving average")
    ema.add_argument("--use-ema", action="store_true",
                     help="keep an EMA of the weights and validate and select checkpoints with it (default: off)")
    ema.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay per optimizer step (default: 0.999)")

    run = parser.add_argument_group("Run, validation and checkpoints")
    run.add_argument("--checkpoint-dir", default="./checkpoints",
                     help="where last.pt, best.pt, history.jsonl and args.json go (default: ./checkpoints)")
    run.add_argument("--resume-from", default=None,
                     help="checkpoint to resume from: last.pt or best.pt restores everything; a weights-only file (the "
                          "tutorial layout's best_model.pth) restores weights and epoch (default: none)")
    run.add_argument("--overwrite", action="store_true",
                     help="start over in a --checkpoint-dir that holds an earlier run, removing its files first; "
                          "without it such a folder is only used to continue that run (--resume-from) (default: off)")
    _add_trust_arg(run)
    run.add_argument("--val-every", type=int, default=1, help="validate every N epochs and at the end (default: 1)")
    run.add_argument("--metric", default="IoU", choices=METRIC_CHOICES,
                     help="validation metric that selects best.pt (lower is better for MAE) (default: IoU)")
    run.add_argument("--seed", type=int, default=42, help="seed of initialisation, split and shuffling (default: 42)")
    run.add_argument("--log-every", type=int, default=20, help="optimizer steps between loss logs (default: 20)")
    run.add_argument("--max-steps-per-epoch", type=int, default=None,
                     help="stop each epoch after N micro-batches, for quick runs (default: whole epoch)")
    run.add_argument("--time-budget", default=None, metavar="DURATION",
                     help="stop cleanly after this long (11h30m, 90m, 45s or seconds), saving last.pt at the step "
                          "it reached; SIGTERM, SIGINT and SIGUSR1 stop the same way. Exit status 75 means "
                          "'stopped early: resume with --resume-from last.pt' (default: no budget)")
    run.add_argument("--save-every", default=None, metavar="STEPS|DURATION",
                     help="also save last.pt every N optimizer steps (500) or every DURATION (10m) within an epoch, "
                          "bounding what a kill can lose (default: at the end of each epoch only)")
    _add_runtime_args(parser)
    parser.set_defaults(handler="train")


def _add_trust_arg(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--trust-checkpoint", action="store_true",
                       help="allow a checkpoint that needs pickled Python objects (older formats); unpickling can "
                            "run arbitrary code, so only for files you made or trust (default: off)")


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Checkpoint and data")
    group.add_argument("--checkpoint", required=True, help="checkpoint file (best.pt, last.pt, or a weights-only .pth)")
    _add_trust_arg(group)
    group.add_argument("--dataset-path", default=None,
                       help="data set root (default: the one the checkpoint was trained on)")
    group.add_argument("--split", default="test",
                       help="test: the data set's test images (COD10K: the 2026 CAM images); val: the share held "
                            "out from Train with the checkpoint's seed and fraction; train; or a test set name of "
                            "a SINet-V2 layout such as CAMO, CHAMELEON, NC4K (default: test)")
    group.add_argument("--keep-noncam", action="store_true",
                       help="keep COD10K's NonCAM test images (empty masks) (default: excluded)")
    group.add_argument("--batch-size", type=int, default=8, help="global inference batch (default: 8)")
    group.add_argument("--weights", default="auto", choices=("auto", "ema", "model"),
                       help="which saved weights to use; auto: the EMA when the checkpoint has one (default: auto)")


def _add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="metrics of a checkpoint on a split or another data set, written as JSON",
        description="Per-image IoU, S-measure, E-measure, weighted F and MAE at each mask's original size.")
    _add_checkpoint_args(parser)
    parser.add_argument("--output", default=None,
                        help="metrics JSON path (default: metrics_<split>.json next to the checkpoint)")
    _add_model_args(parser, from_checkpoint=True)
    _add_runtime_args(parser)
    parser.set_defaults(handler="evaluate")


def _add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="write predicted masks as PNG files at each image's original size",
        description="Predict masks for a data set split; one grayscale PNG (0-255) per image, named by its stem.")
    _add_checkpoint_args(parser)
    parser.add_argument("--output-dir", required=True, help="folder for the PNG masks (created if missing)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="write binary masks (0/255) at this probability, between 0 and 1, instead of "
                             "probability maps (default: probability maps)")
    _add_model_args(parser, from_checkpoint=True)
    _add_runtime_args(parser)
    parser.set_defaults(handler="predict")


def get_args_parser() -> argparse.ArgumentParser:
    """The full parser, reusable by wrappers (e.g. a cluster submitter) without copying it."""
    parser = argparse.ArgumentParser(
        prog="train_ultimate.py",
        description="CamoXpert camouflaged object detection on CPU, one GPU, DataParallel or DDP.")
    subparsers = parser.add_subparsers(dest="command", metavar="{train,evaluate,predict}", required=True)
    _add_train_parser(subparsers)
    _add_evaluate_parser(subparsers)
    _add_predict_parser(subparsers)
    return parser


def _check_img_size(parser: argparse.ArgumentParser, img_size: int, backbone: str) -> None:
    from .backbone import min_input_size  # imports timm: only once the flags parsed
    from .errors import UserError

    try:
        smallest = min_input_size(backbone)
    except UserError as error:
        parser.error(str(error))
    if img_size < smallest:
        parser.error(f"--img-size {img_size} is below what backbone {backbone} accepts: its deepest features are "
                     f"{smallest} times smaller than the input, so pass --img-size {smallest} or more")


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject values any subcommand cannot use, through ``parser.error`` (exit status 2, with the fix)."""
    if args.num_workers is not None and args.num_workers < 0:
        parser.error(f"--num-workers must be 0 (load in the main process) or more, got {args.num_workers}")
    if args.command == "train":
        validate_train_args(parser, args)
        return
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if getattr(args, "threshold", None) is not None and not 0.0 < args.threshold < 1.0:
        parser.error(f"--threshold must be a probability between 0 and 1 (exclusive), got {args.threshold}: "
                     "e.g. --threshold 0.5")
    if args.img_size is not None:
        if args.img_size < 1:
            parser.error(f"--img-size must be at least 1, got {args.img_size}")
        if args.backbone is not None:
            _check_img_size(parser, args.img_size, args.backbone)


def validate_train_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject inconsistent ``train`` flags through ``parser.error`` (exit code 2, with the fix)."""
    positive = ("batch_size", "accumulation_steps", "img_size", "epochs", "num_experts", "val_every", "log_every")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.stage2_batch_size is not None and args.stage2_batch_size < 1:
        parser.error(f"--stage2-batch-size must be at least 1, got {args.stage2_batch_size}")
    if args.top_k is not None and not 1 <= args.top_k <= args.num_experts:
        parser.error(f"--top-k {args.top_k} must be between 1 and --num-experts {args.num_experts}")
    if not 0 <= args.stage1_epochs <= args.epochs:
        parser.error(f"--stage1-epochs {args.stage1_epochs} must be between 0 and --epochs {args.epochs}")
    for name in ("lr", "stage2_lr"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.min_lr < 0 or args.min_lr > min(args.lr, args.stage2_lr or args.lr):
        parser.error(f"--min-lr {args.min_lr} must be between 0 and the peak LRs (--lr {args.lr}, "
                     f"--stage2-lr {args.stage2_lr or args.lr})")
    if not 0.0 < args.val_fraction < 1.0:
        parser.error(f"--val-fraction must be between 0 and 1 (exclusive), got {args.val_fraction}")
    try:
        if args.time_budget is not None:
            ap.parse_duration(args.time_budget, "--time-budget")
        if args.save_every is not None and not args.save_every.strip().isdigit() or args.save_every == "0":
            ap.parse_duration(args.save_every, "--save-every (steps or a duration)")
    except ap.UsageError as error:
        parser.error(str(error))
    if not 0.0 < args.ema_decay < 1.0:
        parser.error(f"--ema-decay must be between 0 and 1 (exclusive), got {args.ema_decay}")
    if args.max_steps_per_epoch is not None and args.max_steps_per_epoch < args.accumulation_steps:
        parser.error(f"--max-steps-per-epoch {args.max_steps_per_epoch} is fewer micro-batches than one optimizer "
                     f"step needs (--accumulation-steps {args.accumulation_steps})")
    _check_img_size(parser, args.img_size, args.backbone)


def _run(args: argparse.Namespace, processes: int | None) -> int:
    if args.command == "train":  # the cheap checks, before any process is started
        detect_layout(args.dataset_path)
        claim(args.checkpoint_dir, resume_from=args.resume_from, overwrite=args.overwrite)
    if processes is None:
        processes = placement.process_count(args.strategy, args.device, os.environ, placement.visible_gpus())
    # With DDP requested from a plain `python train_ultimate.py ...`, this re-runs the script as one process
    # per device through torch.distributed.run and returns the job's status.
    status = placement.launch(processes)
    if status is not None:
        return status
    # Imported here so that `--help` and argument errors do not pay for importing the training code.
    from .evaluate import evaluate, predict
    from .train import train

    result = {"train": train, "evaluate": evaluate, "predict": predict}[args.handler](args)
    # A stop every rank agreed on: resumable. Under ap.launch() the parent turns the job's 0 into that status.
    stopped = isinstance(result, dict) and result.get("stopped") and not ap.runtime().is_distributed
    return ap.EXIT_RESUMABLE if stopped else 0


def main(argv: Sequence[str] | None = None, *, processes: int | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand and return the exit status.

    Args:
        argv: the command line after the script name.
        processes: how many processes the run uses, when the caller has decided (``kaggle_2gpu_train.py``);
            by default :func:`camoxpert.placement.process_count` decides from the flags and the machine.

    Returns:
        0 on success, 2 for a user error (printed as ``error: <message>``, no traceback), 130 when interrupted.
    """
    parser = get_args_parser()
    args = parser.parse_args(argv)
    validate_args(parser, args)
    try:
        return _run(args, processes)
    except KeyboardInterrupt:
        ap.print("interrupted")
        return 130
    except Exception as error:
        message = user_message(error)
        if message is None:  # a bug: keep the traceback
            raise
        return report(message)
