"""DDP promises, for real: 2 processes on the CPU (gloo) started by torchrun.

The multi-process tests run one worker script from this folder under
``python -m torch.distributed.run --standalone --nproc_per_node=2`` and check the JSON line that rank 0
prints; the workers use the library exactly as a training script would. The first tests check the
wrapper's behaviour as a module in this process, with a 1-process gloo group.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import autoparallel as ap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ddp_jobs import torchrun_result  # noqa: E402

CPU_DDP = ap.Runtime(mode="ddp", device=torch.device("cpu"), device_ids=(), backend="gloo")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 1)
        self.stage = 1

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.backbone(inputs)))


@pytest.mark.usefixtures("single_process_group")
def test_wrapper_behaves_like_the_model() -> None:
    plain = Net()
    model = ap.wrap(plain, runtime=CPU_DDP)

    assert type(model).__name__ == "DistributedModel"
    assert model.module is plain
    assert ap.unwrap(model) is plain
    assert ap.wrap(model, runtime=CPU_DDP) is model
    assert list(model.state_dict()) == list(plain.state_dict())  # no "module." prefix
    assert [name for name, _ in model.named_parameters()] == [name for name, _ in plain.named_parameters()]
    assert model.backbone is plain.backbone
    model.stage = 2
    assert plain.stage == 2
    model.load_state_dict(Net().state_dict())
    assert model(torch.randn(2, 3)).shape == (2, 1)


@pytest.mark.usefixtures("single_process_group")
def test_wrapper_follows_requires_grad_changes_from_fully_frozen_to_trainable() -> None:
    plain = Net().requires_grad_(False)
    model = ap.wrap(plain, runtime=CPU_DDP)  # DDP refuses a module with nothing to train; the wrapper waits
    assert model(torch.randn(2, 3)).requires_grad is False

    model.head.requires_grad_(True)
    model(torch.randn(2, 3)).sum().backward()
    assert plain.head.weight.grad is not None
    assert plain.backbone.weight.grad is None
    model.backbone.requires_grad_(True)
    model(torch.randn(2, 3)).sum().backward()  # DDP rebuilt with the backbone registered
    assert plain.backbone.weight.grad is not None


@pytest.mark.usefixtures("single_process_group")
def test_sync_bn_on_the_cpu_keeps_batchnorm_with_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="autoparallel"):
        model = ap.wrap(Net(), runtime=CPU_DDP, sync_bn=True)
    assert type(model.norm) is nn.BatchNorm1d
    assert "sync_bn=True ignored on cpu" in caplog.text


def test_collectives_gather_and_reduce_one_process_outside_ddp() -> None:
    values = torch.tensor([1.0, 2.0])
    assert torch.equal(ap.all_gather(values), values)
    assert torch.equal(ap.all_reduce(values, op="mean"), values)
    assert ap.all_gather(torch.tensor(3.0)).shape == (1,)  # a 0-dim tensor is one row, as under DDP
    assert ap.broadcast_object({"run": 1}) == {"run": 1}
    ap.barrier()
    with pytest.raises(ValueError, match=r"all_reduce\(op='avg'\) is not supported: use one of sum, mean, max, min"):
        ap.all_reduce(values, op="avg")


@pytest.mark.usefixtures("single_process_group")
def test_ddp_refuses_a_user_ddp_before_or_after_wrap() -> None:
    with pytest.raises(ValueError, match=r"already wrapped in DistributedDataParallel, whose gradient hooks"):
        ap.wrap(nn.parallel.DistributedDataParallel(Net()), runtime=CPU_DDP)
    with pytest.raises(ValueError, match=r"already distributed by autoparallel.wrap.*remove the DistributedData"):
        nn.parallel.DistributedDataParallel(ap.wrap(Net(), runtime=CPU_DDP))


def test_ddp_without_a_process_group_says_how_to_get_one() -> None:
    with pytest.raises(ValueError, match=r"DDP needs an initialised process group: call autoparallel.runtime\(\)"):
        ap.wrap(Net(), runtime=CPU_DDP)


@pytest.mark.distributed
def test_ddp_matches_single_process_with_accumulation() -> None:
    result = torchrun_result("_ddp_equivalence.py")

    assert (result["mode"], result["world_size"], result["wrapper"]) == ("ddp", 2, "DistributedModel")
    # global batch 8 = 4 per process; 53 samples -> 6 batches per epoch in both modes
    assert (result["per_process_batch"], result["batches_per_epoch"]) == (4, 6)
    assert result["max_change_from_init"] > 1e-2  # it trained
    # Across process counts only float tolerance holds (measured 6e-8, one ulp at 0.5): each rank sums half
    # the batch, then gloo adds the halves. A missing or doubled all-reduce moves weights by > 1e-2.
    assert result["max_difference_to_single_process"] < 1e-6
    first, second = result["param_checksums_per_rank"]
    assert first == second  # exact: every rank applies the same all-reduced gradient to the same weights
    # micro-step 0 ran under no_sync (local gradients differ), micro-step 1 all-reduced them
    micro0, micro1 = result["grad_checksums_micro0"], result["grad_checksums_micro1"]
    assert micro0[0] != micro0[1]
    assert micro1[0] == micro1[1]


@pytest.mark.distributed
def test_ddp_options_given_to_wrap_change_what_ddp_does() -> None:
    result = torchrun_result("_ddp_options.py")

    # Each rank's running statistics come from its own data: equal only when rank 0's are broadcast.
    assert result["default"] == {"running_means_equal": True, "weights_equal": True}
    assert result["broadcast_buffers=False"] == {"running_means_equal": False, "weights_equal": True}
    assert result["unused, default"] == "trained"  # the first step found the unused head
    # Given by hand, False is what DDP gets: the next step refuses, with the fix named.
    assert result["unused, find_unused_parameters=False"].startswith("UsageError: a parameter got no gradient"), \
        result["unused, find_unused_parameters=False"]
    assert "step, with the DDP options given to ap.wrap(): pass find_unused_parameters=True" in \
        result["unused, find_unused_parameters=False"]
    # A head unfrozen after the first step, and never used: the rebuilt DDP makes its own first-step choice.
    assert result["unused head unfrozen later, default"] == "trained"


@pytest.mark.usefixtures("single_process_group")
def test_an_optimizer_step_on_gradients_of_an_eval_mode_forward_is_refused() -> None:
    model = ap.wrap(Net(), runtime=CPU_DDP)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.eval()
    model(torch.randn(4, 3)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ap.UsageError, match=r"forward in eval mode.*Call model.train\(\) before training steps"):
        optimizer.step()
    other = nn.Linear(2, 1)  # another model's optimizer (a GAN's generator while D is in eval mode) may step
    other(torch.randn(3, 2)).sum().backward()
    torch.optim.SGD(other.parameters(), lr=0.1).step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.train()
    optimizer.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()  # a training-mode step goes through
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.distributed
def test_distributed_evaluation_counts_every_sample_once() -> None:
    result = torchrun_result("_ddp_eval.py")

    # 7 samples, 1 per rank per batch: 4 on rank 0 and 3 on rank 1, cut into 3 batches each (no padding), so a
    # gather per batch could not wait for a rank that has run out.
    assert result["per_rank_batches"] == [3, 3]
    assert result["gathered_indices"] == [0, 1, 2, 3, 4, 5, 6]
    assert result["count"] == 7
    # Batches of 1 on two ranks against one batch of 7: float tolerance (measured 3e-8); a missing or
    # repeated sample changes the squared sum by > 1e-2.
    assert result["max_difference_to_single_process"] < 1e-6
    assert result["squared_sum_difference"] < 1e-6
    first, second = result["reference_checksums_per_rank"]
    assert first == second  # model.eval() gave both ranks rank 0's BatchNorm statistics
    assert result["ranks_refusing_mismatched_gather"] == 2
    assert result["broadcast_run_names"] == [True, True]


@pytest.mark.distributed
def test_topk_moe_with_frozen_backbone_and_unfreezing() -> None:
    result = torchrun_result("_ddp_moe_unfreeze.py")

    assert all(count > 0 for count in result["micro_steps_with_an_idle_expert"])  # unused parameters happened
    assert result["backbone_moved_while_frozen"] is False
    assert result["backbone_change_after_unfreeze"] > 1e-3
    assert result["rank_parameter_difference"] == 0.0  # the unfrozen backbone is synchronised too
