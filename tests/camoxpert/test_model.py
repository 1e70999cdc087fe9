"""CamoXpert: output structure for several timm backbones, DataParallel pass-through, stage groups for
unfreezing, gradient checkpointing, pretrained-weight loading and its fallback."""

from __future__ import annotations

import copy
import logging

import pytest
import timm
import torch
from torch import nn

import camoxpert.backbone as backbone_module
from camoxpert.model import CamoXpert


def _model(name: str = "edgenext_xx_small", **kwargs) -> CamoXpert:
    torch.manual_seed(0)
    return CamoXpert(name, decoder_channels=kwargs.pop("decoder_channels", 16), **kwargs)


@pytest.mark.parametrize("name", ["edgenext_xx_small", "resnet18", "mobilenetv3_small_050"])
def test_output_structure_and_shapes(name):
    model = _model(name, deep_supervision=True, num_experts=4, top_k=2)
    images = torch.randn(2, 3, 64, 64)
    output = model(images)
    assert set(output) == {"mask", "aux_loss", "side"}
    assert output["mask"].shape == (2, 1, 64, 64)
    assert output["aux_loss"].dim() == 0
    assert output["aux_loss"].requires_grad
    levels = len(timm.create_model(name, features_only=True).feature_info)
    assert len(output["side"]) == levels
    assert all(side.shape == (2, 1, 64, 64) for side in output["side"])


def test_channels_come_from_feature_info():
    model = _model("resnet18")
    assert model.feature_channels == [64, 64, 128, 256, 512]
    assert model.feature_reductions == [2, 4, 8, 16, 32]
    assert [level.lateral[0].in_channels for level in model.decoder.levels] == model.feature_channels


def test_without_deep_supervision_side_is_empty_and_defaults_follow_the_contract():
    model = _model()
    output = model(torch.randn(1, 3, 64, 64))
    assert output["side"] == []
    assert model.num_experts == 7
    assert model.top_k == 3
    assert all(level.moe.top_k == 3 and len(level.moe.experts) == 7 for level in model.decoder.levels)
    assert model.pretrained_loaded is False


def test_non_square_input_keeps_its_size():
    model = _model("resnet18", num_experts=3)
    output = model(torch.randn(1, 3, 96, 64))
    assert output["mask"].shape == (1, 1, 96, 64)


def test_dataparallel_on_cpu_passes_through():
    model = _model(num_experts=3).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(images)
        wrapped = nn.DataParallel(model)(images)
    torch.testing.assert_close(wrapped["mask"], plain["mask"])
    assert wrapped["aux_loss"].dim() == 0


def test_forward_never_syncs_with_the_host(monkeypatch):
    """``.item()`` / ``.tolist()`` in forward would sync the GPU every step (upstream did it per routed image)."""
    model = _model(num_experts=4, deep_supervision=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in forward")

    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    output = model(torch.randn(2, 3, 64, 64))
    assert output["mask"].shape == (2, 1, 64, 64)


@pytest.mark.parametrize(
    ("name", "deepest", "count"), [("edgenext_xx_small", "stages_3", 4), ("resnet18", "layer4", 5)]
)
def test_backbone_stages_are_deepest_first_and_cover_the_backbone(name, deepest, count):
    model = _model(name, num_experts=2)
    stages = model.backbone_stages()
    assert len(stages) == count
    assert stages[0] is getattr(model.backbone, deepest)
    covered = [id(p) for stage in stages for p in stage.parameters()]
    assert len(covered) == len(set(covered))
    assert set(covered) == {id(p) for p in model.backbone.parameters()}


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = _model(num_experts=3, deep_supervision=True)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing = True
    assert checkpointed.backbone.grad_checkpointing is True
    images = torch.randn(2, 3, 64, 64)
    losses = []
    for model in (plain, checkpointed):
        out = model(images)
        loss = out["mask"].sigmoid().mean() + out["aux_loss"] + sum(s.mean() for s in out["side"])
        loss.backward()
        losses.append(loss.detach())
    # Recomputed activations are the same kernels on the same shapes, but the backward accumulates the
    # gradients in another order: float tolerance.
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_flag_survives_dataparallel_replication():
    model = _model(num_experts=2, gradient_checkpointing=True)
    replica = model._replicate_for_data_parallel()  # what nn.DataParallel does for every device
    assert replica.gradient_checkpointing is True
    patched = [name for name, module in model.named_modules() if "forward" in vars(module)]
    assert patched == []  # the flag is read in forward; no instance method is patched


def test_unknown_backbone_names_the_value():
    with pytest.raises(ValueError, match="'not_a_model'"):
        CamoXpert("not_a_model")


def test_pretrained_falls_back_to_random_init_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(backbone_module, "_cached_weight_file", lambda name: None)
    monkeypatch.setattr(backbone_module, "_network_reachable", lambda *a, **k: False)
    with caplog.at_level(logging.WARNING, logger="camoxpert.backbone"):
        model = CamoXpert("resnet18", num_experts=2, pretrained=True, decoder_channels=16)
    assert model.pretrained_loaded is False
    assert "RANDOM initialisation" in caplog.text
    assert "resnet18" in caplog.text


def test_pretrained_path_loads_the_weights(tmp_path):
    torch.manual_seed(123)
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = CamoXpert("resnet18", num_experts=2, pretrained_path=path, decoder_channels=16)
    assert model.pretrained_loaded is True
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    torch.testing.assert_close(model.backbone.conv1.weight, source.conv1.weight)


def test_missing_pretrained_path_is_an_error_naming_the_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        CamoXpert("resnet18", pretrained_path=missing)
