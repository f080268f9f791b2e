"""mim-unetr, the MiM encoder in a Swin-UNETR-style decoder (METHOD.md §9): shapes, names, sizes, input checks."""

from __future__ import annotations

import pytest
import torch

from mim3d.errors import BadInputError
from mim3d.models import build_segmenter


@pytest.mark.parametrize(("roi", "in_channels", "num_classes"), [
    ((64, 64, 64), 1, 2),  # a cube: token grid 4³, fifth level 2³
    ((96, 64, 32), 2, 14),  # non-cubic, two input channels; the D axis has the smallest grid, 2 -> 1
    ((32, 64, 96), 1, 14),  # non-cubic the other way
])
def test_small_preset_maps_each_roi_to_logits_of_the_same_size(roi, in_channels, num_classes):
    net = build_segmenter("mim-unetr", num_classes, "small", roi_size=roi, in_channels=in_channels).eval()
    with torch.no_grad():
        logits = net(torch.rand(1, in_channels, *roi))
    assert logits.shape == (1, num_classes, *roi)
    assert torch.isfinite(logits).all()


def test_training_step_sends_gradients_to_the_encoder_and_the_decoder():
    # no drop-path: with batch 1 it may skip a whole branch and zero that branch's gradients by chance
    net = build_segmenter("mim-unetr", 2, "small", roi_size=(32, 32, 64), drop_path_rate=0.0)
    net(torch.rand(1, 1, 32, 32, 64)).square().mean().backward()
    for name in ("backbone.patch_embed1.proj.weight", "backbone.blocks4.0.gamma_1",
                 "backbone.blocks4.0.attn.relative_position_bias_table", "backbone.fpn.0.weight",
                 "encoder1.layer.conv1.conv.weight", "out.conv.conv.weight"):
        grad = net.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_hidden_states_follow_the_swin_unetr_pyramid_and_are_normalised_over_channels():
    net = build_segmenter("mim-unetr", 2, "small", roi_size=(64, 64, 96)).eval()  # embed dims 24, 48, 96, 192
    with torch.no_grad():
        hidden = net.hidden_states(torch.rand(2, 1, 64, 64, 96))
    assert [tuple(h.shape) for h in hidden] == [(2, 24, 32, 32, 48), (2, 48, 16, 16, 24), (2, 96, 8, 8, 12),
                                                (2, 192, 4, 4, 6), (2, 384, 2, 2, 3)]
    for h in hidden:
        assert torch.allclose(h.mean(dim=1), torch.zeros(()), atol=1e-4)
        assert torch.allclose(h.var(dim=1, unbiased=False), torch.ones(()), atol=1e-2)


def test_state_dict_keeps_the_official_backbone_names_and_adds_the_fine_tuning_parts():
    net = build_segmenter("mim-unetr", 2, "small", roi_size=(96, 96, 96))
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["backbone.pos_embed"] == (1, 216, 192)
    assert shapes["backbone.patch_embed1.proj.weight"] == (24, 1, 2, 2, 2)
    assert shapes["backbone.blocks4.3.gamma_2"] == (192,)
    assert shapes["backbone.blocks4.0.attn.relative_position_bias_table"] == (11**3, 6)  # (2·6 − 1)³ offsets, 6 heads
    assert shapes["backbone.blocks4.0.attn.relative_position_index"] == (216, 216)
    assert shapes["backbone.fpn.0.weight"] == (384, 192, 2, 2, 2)
    assert shapes["backbone.fpn.1.running_var"] == (384,)
    assert shapes["encoder10.layer.conv1.conv.weight"] == (384, 384, 3, 3, 3)
    assert shapes["out.conv.conv.weight"] == (2, 24, 1, 1, 1)
    assert net.backbone.pos_embed.requires_grad
    assert not [k for k in shapes if k.startswith(("backbone.norm.", "backbone.stage", "backbone.decoder"))]


def test_roi_edge_that_is_not_a_multiple_of_32_is_refused():
    with pytest.raises(BadInputError, match=r"roi_size: \(96, 80, 96\) gives an odd token grid .*multiple of 32"):
        build_segmenter("mim-unetr", 2, "small", roi_size=(96, 80, 96))


def test_roi_of_32_cubed_is_refused_because_its_fifth_level_is_a_single_voxel():
    with pytest.raises(BadInputError, match=r"roi_size: \(32, 32, 32\) leaves a single voxel at the fifth level"):
        build_segmenter("mim-unetr", 2, "small", roi_size=(32, 32, 32))


def test_input_of_another_shape_is_refused_naming_the_expected_shape():
    net = build_segmenter("mim-unetr", 2, "small", roi_size=(64, 64, 64))
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 1, 64, 64, 64\), got \(1, 1, 64, 64, 32\)"):
        net(torch.rand(1, 1, 64, 64, 32))


def test_base_preset_has_the_parameter_count_of_the_official_network():
    net = build_segmenter("mim-unetr", 14, "base")
    backbone = sum(p.numel() for p in net.backbone.parameters())
    decoder = sum(p.numel() for p in net.parameters()) - backbone
    # METHOD.md §2.6: fine-tuning backbone ≈ 24.13 M, Swin-UNETR decoder (fs 48, 14 classes) ≈ 54.13 M, total ≈ 78.3 M
    assert backbone == 24_132_060
    assert decoder == 54_125_294


@pytest.mark.slow
def test_base_preset_maps_a_96_cube_to_14_class_logits():
    net = build_segmenter("mim-unetr", 14, "base").eval()
    with torch.no_grad():
        logits = net(torch.rand(1, 1, 96, 96, 96))
    assert logits.shape == (1, 14, 96, 96, 96)
    assert torch.isfinite(logits).all()
