"""MiM pre-training model: official layout, masking invariants, leakage, alignment forms, learning on real CT."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_mim import ReferenceMiM

from mim3d.errors import BadInputError
from mim3d.models import build_pretrainer
from mim3d.models.layers import patchify, random_masking, sincos_pos_embed, unpatchify
from mim3d.models.mim import MiMPretrainer, _blocks

KEY_TABLE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "mim_official_pretrain_keys.json"
FEW_LEVELS = dict(level2_count=2, level3_count=2)  # 1 + 2 + 4 passes instead of 21: same code path, faster


@pytest.fixture(scope="module")
def small() -> MiMPretrainer:
    torch.manual_seed(0)
    return build_pretrainer("mim", "small").eval()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_base_state_dict_has_exactly_the_official_names_shapes_and_parameter_count():
    table = json.loads(KEY_TABLE.read_text())
    model = build_pretrainer("mim", "base")
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == table["entries"]
    assert len(shapes) == 363
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == table["trainable_parameters"] == 71_047_696


@pytest.mark.parametrize(("preset", "overrides", "crop"), [
    ("small", {}, 128),
    ("small", {"input_size": 96}, 192),
    ("base", {"level2_count": 1, "level3_count": 1, "depths": (1, 1, 1, 2), "decoder_depth": 1}, 192),
])
def test_every_preset_and_input_size_returns_every_finite_loss_term(preset, overrides, crop):
    model = build_pretrainer("mim", preset, **overrides)
    with torch.no_grad():
        out = model(torch.rand(1, 1, crop, crop, crop), generator=seeded(0))
    assert set(out) == {"loss", "reconstruction_level1", "reconstruction_level2", "reconstruction_level3",
                        "alignment_level1_2", "alignment_level2_3"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.values())


def test_wrong_crop_shape_is_refused_with_the_expected_shape(small):
    with pytest.raises(ValueError, match=r"\(B, 1, 128, 128, 128\)"):
        small(torch.rand(1, 1, 96, 96, 96))


def test_unknown_option_and_invalid_ratio_are_refused_by_name():
    with pytest.raises(BadInputError, match="Did you mean 'level2_count'"):
        build_pretrainer("mim", "small", level2_cont=3)
    with pytest.raises(BadInputError, match="level1_mask_ratio"):
        build_pretrainer("mim", "small", level1_mask_ratio=0.3)
    with pytest.raises(BadInputError, match="Valid: byol, ce, off"):
        build_pretrainer("mim", "small", alignment_form="infonce")
    with pytest.raises(BadInputError, match=r"embed_dims\[3\]: 64 must be divisible by 6"):
        build_pretrainer("mim", "small", embed_dims=(8, 16, 32, 64), num_heads=4)


def test_patchify_orders_tokens_h_w_d_with_d_fastest_and_inverts():
    volume = torch.arange(2 * 32 * 48 * 16, dtype=torch.float32).reshape(1, 2, 32, 48, 16)
    tokens = patchify(volume, 16)  # grid (2, 3, 1)
    assert tokens.shape == (1, 6, 16**3 * 2)
    for t, (h, w) in enumerate([(h, w) for h in range(2) for w in range(3)]):
        expected = volume[0, :, h * 16:(h + 1) * 16, w * 16:(w + 1) * 16, :].permute(1, 2, 3, 0).flatten()
        assert torch.equal(tokens[0, t], expected)
    assert torch.equal(unpatchify(tokens, 16, (2, 3, 1), channels=2), volume)


def test_sincos_embedding_matches_the_mae_formula_with_h_w_d_channel_thirds():
    dim, grid = 12, (2, 3, 4)
    emb = sincos_pos_embed(dim, grid)[0].double()
    for t, (h, w, d) in enumerate(np.ndindex(*grid)):
        expected = []
        for pos in (h, w, d):
            omega = [1 / 10000 ** (k / 2) for k in range(2)]
            expected += [math.sin(pos * o) for o in omega] + [math.cos(pos * o) for o in omega]
        assert torch.allclose(emb[t], torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def test_random_masking_keeps_the_smallest_noise_and_restores_order():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    ids_keep, mask, ids_restore = random_masking(noise, 2)
    assert ids_keep.tolist() == [[1, 3]]
    assert mask.tolist() == [[1, 0, 1, 0]]
    shuffled = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), torch.arange(4)[None])


@pytest.fixture(scope="module")
def levels(small):
    crop = torch.rand(2, 1, 128, 128, 128)
    with torch.no_grad():
        return crop, small.forward_levels(crop, small.draw_noise(2, seeded(1)))


def test_each_level_masks_exactly_the_configured_token_count(small, levels):
    _, lv = levels
    n = small.num_tokens  # 64 for the small preset's 4³ grid
    assert lv.level1.mask.sum(1).tolist() == [n // 2] * 2  # 4 of 8 groups
    assert lv.level2.mask.sum(1).tolist() == [n - int(n * 0.4)] * 8  # 2 samples × 4 volumes
    assert lv.level3.mask.sum(1).tolist() == [n - int(n * 0.5)] * 32  # 8 volumes × 4 cubes


def test_level1_masks_whole_octant_blocks_of_the_token_grid(small, levels):
    _, lv = levels
    mask = lv.level1.mask.reshape(2, 4, 4, 4)
    octants = _blocks(mask[:, None], 2).flatten(2)  # (B, 8, 8 tokens)
    assert torch.all((octants.sum(-1) == 0) | (octants.sum(-1) == 8))
    assert octants.amax(-1).sum(1).tolist() == [4, 4]


def test_level1_target_is_the_whole_crop_at_half_resolution(levels):
    crop, lv = levels
    assert torch.equal(lv.level1.volume, F.interpolate(crop, size=(64,) * 3, mode="trilinear", align_corners=False))


def test_level2_volumes_are_the_masked_level1_octants(levels):
    crop, lv = levels
    group_mask = _blocks(lv.level1.mask.reshape(2, 1, 4, 4, 4), 2).flatten(2).amax(-1)  # (B, 8)
    for b in range(2):
        for j, g in enumerate(lv.level2_groups[b].tolist()):
            assert group_mask[b, g] == 1
            h, w, d = g // 4, g // 2 % 2, g % 2
            octant = crop[b, :, h * 64:(h + 1) * 64, w * 64:(w + 1) * 64, d * 64:(d + 1) * 64]
            assert torch.equal(lv.level2.volume[b * 4 + j], octant)
    assert all(len(set(row)) == 4 for row in lv.level2_groups.tolist())


def test_level3_volumes_are_upsampled_masked_level2_tokens(levels):
    _, lv = levels
    for v in range(8):
        for k, t in enumerate(lv.level3_tokens[v].tolist()):
            assert lv.level2.mask[v, t] == 1
            h, w, d = t // 16, t // 4 % 4, t % 4
            cube = lv.level2.volume[v:v + 1, :, h * 16:(h + 1) * 16, w * 16:(w + 1) * 16, d * 16:(d + 1) * 16]
            expected = F.interpolate(cube, size=(64,) * 3, mode="trilinear", align_corners=False)
            assert torch.equal(lv.level3.volume[v * 4 + k], expected[0])


def test_raster_grouping_masks_runs_of_consecutive_tokens_as_the_official_code():
    model = build_pretrainer("mim", "small", level1_grouping="raster")
    with torch.no_grad():
        lv = model.forward_levels(torch.rand(1, 1, 128, 128, 128), model.draw_noise(1, seeded(2)))
    runs = lv.level1.mask.reshape(8, 8)  # 8 runs of 8 consecutive tokens
    assert torch.all((runs.sum(1) == 0) | (runs.sum(1) == 8))


def test_changing_only_masked_voxels_leaves_visible_token_outputs_unchanged(small):
    volume = torch.rand(1, 1, 64, 64, 64)
    ids_keep, mask, _ = random_masking(torch.rand(1, 64, generator=seeded(3)), 24)
    voxel_mask = unpatchify(mask[..., None].expand(-1, -1, 16**3), 16, (4, 4, 4)).bool()
    with torch.no_grad():
        before = small.forward_encoder(volume, mask, ids_keep)
        after = small.forward_encoder(torch.where(voxel_mask, torch.rand_like(volume), volume), mask, ids_keep)
        changed_visible = small.forward_encoder(torch.where(voxel_mask, volume, volume + 0.5), mask, ids_keep)
    assert torch.allclose(before, after, atol=1e-5)
    assert not torch.allclose(before, changed_visible, atol=1e-3)  # the check can fail


def test_same_seed_repeats_the_losses_and_another_seed_changes_them():
    small = build_pretrainer("mim", "small", **FEW_LEVELS).eval()
    crop = torch.rand(1, 1, 128, 128, 128)
    with torch.no_grad():
        a, b = small(crop, generator=seeded(5)), small(crop, generator=seeded(5))
        c = small(crop, generator=seeded(6))
        given = small(crop, noise=small.draw_noise(1, seeded(5)))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], given[k]) for k in a)
    assert not torch.equal(a["reconstruction_level2"], c["reconstruction_level2"])


@pytest.fixture(scope="module")
def hand_checked_tensors():
    child = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # (M=1, K=2, C=3)
    parents = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]])  # (M=1, R=3, C=3)
    target = torch.tensor([[0, 1]])
    return child, parents, target


def test_ce_alignment_is_cross_entropy_of_raw_dot_products(hand_checked_tensors):
    model = build_pretrainer("mim", "small", level2_count=1, level3_count=1)
    # logits: child 0 -> [2, 0, 0], child 1 -> [0, 3, 0]
    expected = (-math.log(math.e**2 / (math.e**2 + 2)) - math.log(math.e**3 / (math.e**3 + 2))) / 2
    assert model.alignment_loss(*hand_checked_tensors).item() == pytest.approx(expected, rel=1e-6)


def test_ce_alignment_with_l2_normalisation_and_temperature(hand_checked_tensors):
    model = build_pretrainer("mim", "small", alignment_l2_normalize=True, alignment_temperature=0.5)
    # unit vectors: both children hit their own region with cosine 1 -> logits [2, 0, 0] and [0, 2, 0]
    expected = -math.log(math.e**2 / (math.e**2 + 2))
    assert model.alignment_loss(*hand_checked_tensors).item() == pytest.approx(expected, rel=1e-6)


def test_byol_alignment_is_two_minus_two_cosine_to_the_source_region(hand_checked_tensors):
    model = build_pretrainer("mim", "small", alignment_form="byol")
    child, parents, target = hand_checked_tensors
    target = torch.tensor([[1, 1]])  # child 0 ⟂ region 1 (loss 2), child 1 ∥ region 1 (loss 0)
    assert model.alignment_loss(child, parents, target).item() == pytest.approx(1.0, rel=1e-6)


def test_alignment_off_leaves_only_weighted_reconstruction_terms():
    model = build_pretrainer("mim", "small", alignment_form="off", reconstruction_weights=(1.0, 0.5, 0.25),
                             **FEW_LEVELS)
    with torch.no_grad():
        out = model(torch.rand(1, 1, 128, 128, 128), generator=seeded(0))
    assert "alignment_level1_2" not in out
    expected = out["reconstruction_level1"] + 0.5 * out["reconstruction_level2"] + 0.25 * out["reconstruction_level3"]
    assert torch.allclose(out["loss"], expected)


def test_alignment_gradient_reaches_the_child_but_not_the_parent_features():
    model = build_pretrainer("mim", "small", reconstruction_weights=(0.0, 0.0, 0.0), **FEW_LEVELS)
    levels = model.forward_levels(torch.rand(1, 1, 128, 128, 128), model.draw_noise(1, seeded(0)))
    for level in (levels.level1, levels.level2, levels.level3):
        level.features.retain_grad()
    model.objective(levels)["loss"].backward()
    assert levels.level1.features.grad.abs().sum() == 0  # level 1 is only ever a (stop-gradient) parent
    assert levels.level2.features.grad.abs().sum() > 0  # child of 1↔2 (its parent role in 2↔3 is detached)
    assert levels.level3.features.grad.abs().sum() > 0


@pytest.mark.parametrize("grouping", ["octant", "raster"])
def test_encoder_and_losses_equal_the_official_forward_on_identical_weights_and_masks(grouping):
    torch.manual_seed(0)
    ours = build_pretrainer("mim", "small", level1_grouping=grouping, **FEW_LEVELS)
    reference = ReferenceMiM(ours.config)
    reference.load_state_dict(ours.state_dict(), strict=True)
    volume, crop = torch.rand(2, 1, 64, 64, 64), torch.rand(1, 1, 128, 128, 128)
    ids_keep, mask, ids_restore = random_masking(torch.rand(2, 64, generator=seeded(4)), 26)
    noise = ours.draw_noise(1, seeded(7))
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_encoder(volume, mask, ids_keep),
                                   reference.forward_encoder(volume, mask, ids_keep), rtol=1e-4, atol=1e-4)
        latent = ours.forward_encoder(volume, mask, ids_keep)
        for a, b in zip(ours.forward_decoder(latent, ids_restore), reference.forward_decoder(latent, ids_restore),
                        strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        ours_out, reference_out = ours(crop, noise=noise), reference(crop, noise=noise)
    for key in ours_out:
        torch.testing.assert_close(ours_out[key], reference_out[key], rtol=1e-4, atol=1e-4)


def test_gradients_equal_the_official_forward():
    torch.manual_seed(0)
    ours = build_pretrainer("mim", "small", **FEW_LEVELS)
    reference = ReferenceMiM(ours.config)
    reference.load_state_dict(ours.state_dict(), strict=True)
    crop, noise = torch.rand(1, 1, 128, 128, 128), ours.draw_noise(1, seeded(8))
    ours(crop, noise=noise)["loss"].backward()
    reference(crop, noise=noise)["loss"].backward()
    for (name, a), b in zip(ours.named_parameters(), reference.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_depthwise_conv_fast_backward_matches_autograd():
    from mim3d.models.layers import _DepthwiseConv3d

    x = torch.randn(1, 2, 4, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.randn(2, 1, 3, 3, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    assert torch.autograd.gradcheck(_DepthwiseConv3d.apply, (x.requires_grad_(), w.requires_grad_(),
                                                              b.requires_grad_()))


def test_small_model_overfits_one_real_ct_crop(example_ct_path):
    import SimpleITK as sitk

    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(example_ct_path))).astype(np.float32)  # (K, J, I)
    volume = torch.from_numpy(np.clip((hu + 1000) / 2000, 0, 1))[None, None]
    padding = [n for s in reversed(volume.shape[2:]) for n in (0, max(0, 128 - s))]
    crop = F.pad(volume, padding)[..., :128, :128, :128]  # zero = -1000 HU, as in pre-training (§8.2)
    torch.manual_seed(0)
    model = build_pretrainer("mim", "small", **FEW_LEVELS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    noise = model.draw_noise(1, seeded(0))  # fixed masks: the model can memorise this crop
    losses, reconstruction = [], []
    for _ in range(20):
        out = model(crop, noise=noise)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
        reconstruction.append(sum(out[f"reconstruction_level{k}"].item() for k in (1, 2, 3)))
    # Per-patch normalised CT noise is unpredictable, so reconstruction plateaus well above zero (about 0.8 per level).
    assert losses[-1] < 0.8 * losses[0], losses
    assert reconstruction[-1] < 0.9 * reconstruction[0], reconstruction


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = build_pretrainer("mim", "small", **FEW_LEVELS)
    recomputed = build_pretrainer("mim", "small", activation_checkpointing=True, **FEW_LEVELS)
    recomputed.load_state_dict(plain.state_dict())
    crop, noise = torch.rand(1, 1, 128, 128, 128), plain.draw_noise(1, seeded(9))
    losses = [model(crop, noise=noise)["loss"] for model in (plain, recomputed)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(plain.parameters(), recomputed.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
