"""MoE routing, vectorised dispatch against the per-image loop, and the Switch balancing loss."""

from __future__ import annotations

import pytest
import torch

from camoxpert.moe import EXPERT_TYPES, MoEBlock, default_top_k, switch_balancing_loss


def _block(num_experts: int = 7, top_k: int | None = None, dispatch: str = "dense", channels: int = 16) -> MoEBlock:
    torch.manual_seed(0)
    block = MoEBlock(channels, num_experts=num_experts, top_k=top_k, dispatch=dispatch)
    # A larger router init than the default (which starts near uniform) so that images route differently.
    torch.nn.init.normal_(block.router.weight, std=1.0)
    return block


def test_default_top_k_follows_upstream_and_is_clamped():
    assert [default_top_k(e) for e in (1, 2, 3, 4, 5, 7, 8, 12)] == [1, 2, 2, 2, 2, 3, 4, 6]


def test_seven_experts_are_seven_different_types():
    block = MoEBlock(8, num_experts=7)
    assert [type(e) for e in block.experts] == list(EXPERT_TYPES)
    assert len(set(EXPERT_TYPES)) == 7


def test_routing_selects_exactly_top_k_per_image_with_weights_summing_to_one():
    block = _block()
    x = torch.randn(12, 16, 8, 8)
    weights, probs, selected = block.route(x)
    assert weights.shape == (12, 7)
    assert selected.sum(dim=1).tolist() == [3] * 12
    assert torch.equal(weights > 0, selected)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(12))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(12))
    # The selected experts are the ones with the highest router probability.
    top = probs.topk(3, dim=1).indices.sort(dim=1).values
    assert torch.equal(top, selected.nonzero()[:, 1].view(12, 3))
    # Different images take different routes.
    assert len({tuple(row.tolist()) for row in selected}) > 1


@pytest.mark.parametrize("dispatch", ["dense", "gather"])
def test_vectorised_dispatch_equals_per_sample_loop(dispatch):
    block = _block(dispatch=dispatch).eval()
    x = torch.randn(6, 16, 10, 10)
    with torch.no_grad():
        mixed, aux = block(x)
    reference = block.forward_per_sample(x)
    # Batched experts against one image at a time: other kernels and summation order, so float tolerance.
    torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-5)
    assert aux.dim() == 0


def test_dense_and_gather_give_same_output_and_gradients():
    dense, gather = _block(dispatch="dense"), _block(dispatch="gather")
    x = torch.randn(5, 16, 8, 8)
    out_dense, aux_dense = dense(x)
    out_gather, aux_gather = gather(x)
    # Every expert on the whole batch, weighted, against each expert on its rows: float tolerance; the
    # gradients pass through one more reduction, hence the looser rtol below.
    torch.testing.assert_close(out_dense, out_gather, rtol=1e-5, atol=1e-5)
    (out_dense.square().mean() + aux_dense).backward()
    (out_gather.square().mean() + aux_gather).backward()
    for (name, p_dense), p_gather in zip(dense.named_parameters(), gather.parameters()):
        # Unselected experts: zeros in dense mode (weight 0), no gradient at all in gather mode (never called).
        grad_dense = torch.zeros_like(p_dense) if p_dense.grad is None else p_dense.grad
        grad_gather = torch.zeros_like(p_gather) if p_gather.grad is None else p_gather.grad
        torch.testing.assert_close(grad_dense, grad_gather, rtol=1e-4, atol=1e-6, msg=name)


def test_routing_never_syncs_with_the_host(monkeypatch):
    """Dense dispatch has no ``.item()``, ``.tolist()`` or data-dependent shape: nothing waits for the GPU."""
    block = _block(dispatch="dense")

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in MoE forward")

    for name in ("item", "tolist", "nonzero", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out, aux = block(torch.randn(3, 16, 8, 8))
    assert out.shape == (3, 16, 8, 8)
    assert aux.dim() == 0


def test_unselected_experts_receive_no_gradient():
    block = _block(num_experts=7, top_k=1)
    x = torch.randn(2, 16, 8, 8)
    _, _, selected = block.route(x)
    out, _ = block(x)
    out.sum().backward()
    used = selected.any(dim=0).tolist()
    for e, expert in enumerate(block.experts):
        grads = [p.grad for p in expert.parameters() if p.grad is not None]
        has_grad = any(torch.count_nonzero(g) > 0 for g in grads)
        assert has_grad == used[e], f"expert {e}: used={used[e]} has_grad={has_grad}"


def test_balancing_loss_is_one_under_uniform_routing_and_larger_when_collapsed():
    uniform_mask = torch.eye(4).repeat(2, 1)  # 8 images, each expert picked twice
    probs = torch.full((8, 4), 0.25)
    assert switch_balancing_loss(probs, uniform_mask).item() == pytest.approx(1.0)
    collapsed_mask = torch.zeros(8, 4)
    collapsed_mask[:, 0] = 1
    collapsed_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)
    # E * f_0 * P_0 = 4 * 1.0 * 0.7
    assert switch_balancing_loss(collapsed_probs, collapsed_mask).item() == pytest.approx(2.8)


def test_balancing_loss_has_gradient_for_the_router():
    block = _block()
    _, aux = block(torch.randn(8, 16, 8, 8))
    assert aux.dim() == 0
    assert aux.item() >= 1.0 - 1e-6
    grad_weight, grad_bias = torch.autograd.grad(aux, [block.router.weight, block.router.bias])
    assert grad_weight.abs().sum() > 0
    assert grad_bias.abs().sum() > 0


def test_invalid_arguments_name_the_value():
    with pytest.raises(ValueError, match="top_k=8"):
        MoEBlock(8, num_experts=7, top_k=8)
    with pytest.raises(ValueError, match="dispatch='sparse'"):
        MoEBlock(8, dispatch="sparse")
    with pytest.raises(ValueError, match="num_experts=0"):
        MoEBlock(8, num_experts=0)


def test_more_experts_than_types_cycle_through_the_types():
    block = MoEBlock(8, num_experts=9)
    assert [type(e) for e in block.experts][7:] == list(EXPERT_TYPES[:2])
    assert block.top_k == 4


def test_the_model_says_when_a_step_can_leave_an_expert_idle():
    # What train.py tells DDP: the gather dispatch (the CPU's) runs only the chosen experts, dense runs all.
    from camoxpert.model import CamoXpert

    model = CamoXpert(backbone="resnet18", num_experts=3, pretrained=False)
    assert model.leaves_experts_idle(torch.device("cpu")) is True
    assert model.leaves_experts_idle(torch.device("cuda", 0)) is False
    for block in model.modules():
        if isinstance(block, MoEBlock):
            block.dispatch = "gather"
    assert model.leaves_experts_idle(torch.device("cuda", 0)) is True
