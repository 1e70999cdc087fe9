"""MoE block alone: vectorised dispatch (dense, gather) against upstream's per-image loop, in images/s.

    python bench/moe_dispatch.py                          # CPU, 64 channels, 32x32 maps (stride 4 of 128 px), batch 16
    python bench/moe_dispatch.py --device cuda --batch-size 32 --size 80    # stride 4 of 320 px
    python bench/moe_dispatch.py --mode inference

Variants, all on the same weights and inputs:
- ``loop``: upstream's execution, image by image and pick by pick, each selected expert on a batch of one, the
  expert index read on the host (``MoEBlock.forward_per_sample``);
- ``dense``: every expert on the whole batch, mixed with the ``B x E`` top-k weight matrix (no host sync, the
  default on GPUs);
- ``gather``: each expert only on the images that chose it (``index_select`` / ``index_add``; one host sync per
  expert on a GPU, the default on CPUs).
One step is a forward (and, in ``--mode train``, a backward of the mean output plus the balancing loss). Steps
are timed interleaved (see ``_common.time_interleaved``) and each ratio is taken per round before the median.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    add_common_args,
    describe_machine,
    loadavg,
    machine_info,
    markdown_table,
    paired_ratios,
    quantiles,
    resolve_device,
    time_interleaved,
    wait_for_quiet,
    write_json,
)

from camoxpert.moe import MoEBlock  # noqa: E402

VARIANTS = ("loop", "dense", "gather")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--mode", choices=["train", "inference"], default="train",
                        help="train: forward + backward; inference: forward under no_grad (default: train)")
    parser.add_argument("--channels", type=int, default=64, help="feature channels (default: 64, the decoder width)")
    parser.add_argument("--size", type=int, default=32, help="feature map side (default: 32)")
    parser.add_argument("--batch-size", type=int, default=16, help="default: 16")
    parser.add_argument("--num-experts", type=int, default=7, help="default: 7")
    parser.add_argument("--top-k", type=int, default=None, help="default: 3 for 7 experts")
    parser.add_argument("--steps-per-block", type=int, default=None, help="default: 2 on CPU, 20 on CUDA")
    parser.add_argument("--rounds", type=int, default=None, help="default: 5")
    parser.add_argument("--warmup", type=int, default=None, help="default: 1 on CPU, 5 on CUDA")
    add_common_args(parser)
    return parser


def make_step(block: MoEBlock, variant: str, images: torch.Tensor, train: bool):
    """One timed step of a variant: forward (and backward) of the block on the fixed batch."""

    def step(_: int) -> None:
        if variant == "loop":
            out = block.forward_per_sample(images)
            aux = out.new_zeros(())
        else:
            out, aux = block(images)
        if train:
            (out.mean() + 0.01 * aux).backward()

    if train:
        return step

    def inference_step(index: int) -> None:
        with torch.no_grad():
            step(index)

    return inference_step


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    on_cpu = device.type == "cpu"
    steps_per_block = args.steps_per_block or (2 if on_cpu else 20)
    rounds = args.rounds or 5
    warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 5)
    train = args.mode == "train"

    info = machine_info()
    print(describe_machine(info), flush=True)
    load_start = wait_for_quiet(args.wait_load)

    torch.manual_seed(0)
    base = MoEBlock(args.channels, num_experts=args.num_experts, top_k=args.top_k, dispatch="dense").to(device)
    # A router with real preferences (the default init routes almost uniformly), so the batch splits unevenly.
    torch.nn.init.normal_(base.router.weight, std=0.5)
    images = torch.randn(args.batch_size, args.channels, args.size, args.size,
                         generator=torch.Generator().manual_seed(1)).to(device)
    images.requires_grad_(train)
    blocks = {}
    for variant in VARIANTS:
        block = MoEBlock(args.channels, num_experts=args.num_experts, top_k=args.top_k,
                         dispatch="dense" if variant == "loop" else variant).to(device)
        block.load_state_dict(base.state_dict())
        blocks[variant] = block.train(train)
    with torch.no_grad():  # sanity: the three executions compute the same thing
        reference = blocks["loop"].forward_per_sample(images)
        for variant in ("dense", "gather"):
            torch.testing.assert_close(blocks[variant](images)[0], reference, rtol=1e-3, atol=1e-3)

    steps = {variant: make_step(blocks[variant], variant, images, train) for variant in VARIANTS}
    samples = time_interleaved(steps, steps_per_block=steps_per_block, rounds=rounds, warmup_steps=warmup,
                               device=device)
    results = {}
    for variant in VARIANTS:
        seconds = quantiles(samples[variant])
        results[variant] = {
            "seconds_per_step": seconds,
            "images_per_s": args.batch_size / seconds["median"],
            "speedup_vs_loop": paired_ratios(samples, "loop", variant),
        }
    rows = [
        [variant, f"{results[variant]['seconds_per_step']['median'] * 1e3:.1f}",
         f"{results[variant]['images_per_s']:.1f}",
         f"{results[variant]['speedup_vs_loop']['median']:.2f}x "
         f"(IQR {results[variant]['speedup_vs_loop']['p25']:.2f}-{results[variant]['speedup_vs_loop']['p75']:.2f})"]
        for variant in VARIANTS
    ]
    print()
    print(f"MoE block, {args.num_experts} experts, top-{blocks['dense'].top_k}, {args.channels} channels, "
          f"{args.size}x{args.size}, batch {args.batch_size}, {args.mode}, {device}")
    print(markdown_table(["dispatch", "ms/step", "images/s", "speed-up vs loop"], rows))
    if not args.no_json:
        payload = {
            "machine": info,
            "load_start": load_start,
            "load_end": loadavg()[0],
            "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                       "top_k": blocks["dense"].top_k, "steps_per_block": steps_per_block, "rounds": rounds,
                       "warmup": warmup},
            "results": results,
            "samples_s": samples,
        }
        path = write_json(f"moe_dispatch_{device.type}", payload, args.out)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
