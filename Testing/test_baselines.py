"""MAE and SimMIM on a MONAI ViT, and the UNETR their encoders fine-tune in (METHOD.md §14.2)."""

import dataclasses

import pytest
import torch

from mim3d.errors import BadInputError
from mim3d.models import build_pretrainer, build_segmenter
from mim3d.models.layers import patchify, random_masking, unpatchify
from mim3d.models.mae import build_vit, masked_l1_loss
from mim3d.presets import resolve

METHODS = ("mae", "simmim")
SMALL = 64  # input edge of the small presets: a 4×4×4 token grid, 16 tokens kept


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models gain nothing from a second thread; on a shared CPU, OpenMP spin-waits make steps 10× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_models():
    torch.manual_seed(0)
    return {method: build_pretrainer(method, preset="small") for method in METHODS}


def _masking(model, batch: int, seed: int = 0):
    noise = model.draw_noise(batch, torch.Generator().manual_seed(seed))["tokens"]
    return random_masking(noise, model.len_keep)


def test_vit_tokens_and_their_voxels_follow_the_patchify_order():
    vit = build_vit(resolve("mae", "small", in_channels=2))
    volume = torch.rand(1, 2, SMALL, SMALL, SMALL)
    rearrange = vit.patch_embedding.patch_embeddings[0]  # the perceptron's patch split, before its Linear
    assert torch.equal(rearrange(volume), patchify(volume, 16))


def test_mae_encoder_sees_exactly_the_kept_quarter_of_the_tokens(small_models):
    model = small_models["mae"]
    assert model.len_keep == int(64 * (1 - 0.75)) == 16
    ids_keep, mask, _ = _masking(model, batch=2)
    assert mask.sum(dim=1).tolist() == [48, 48]
    with torch.no_grad():
        latent = model.forward_encoder(torch.rand(2, 1, SMALL, SMALL, SMALL), ids_keep)
    assert latent.shape == (2, 16, 192)


def test_mae_decoder_predicts_the_voxels_of_every_patch(small_models):
    model = small_models["mae"]
    ids_keep, mask, ids_restore = _masking(model, batch=2)
    with torch.no_grad():
        pred = model.predict(torch.rand(2, 1, SMALL, SMALL, SMALL), ids_keep, mask, ids_restore)
    assert pred.shape == (2, 64, 16**3)


def test_simmim_encodes_every_token_and_predicts_the_voxels_of_every_patch(small_models):
    model = small_models["simmim"]
    ids_keep, mask, ids_restore = _masking(model, batch=2)
    volume = torch.rand(2, 1, SMALL, SMALL, SMALL)
    with torch.no_grad():
        assert model.forward_encoder(volume, mask).shape == (2, 64, 192)
        assert model.predict(volume, ids_keep, mask, ids_restore).shape == (2, 64, 16**3)


@pytest.mark.parametrize("method", METHODS)
def test_predictions_never_depend_on_the_masked_voxels(small_models, method):
    model = small_models[method]
    ids_keep, mask, ids_restore = _masking(model, batch=2)
    volume = torch.rand(2, 1, SMALL, SMALL, SMALL)
    patches = patchify(volume, 16)
    patches[mask.bool()] = torch.rand(int(mask.sum()), 16**3)
    changed = unpatchify(patches, 16, (4, 4, 4))
    assert not torch.equal(changed, volume)
    with torch.no_grad():
        torch.testing.assert_close(
            model.predict(changed, ids_keep, mask, ids_restore), model.predict(volume, ids_keep, mask, ids_restore)
        )


@pytest.mark.parametrize("method", METHODS)
def test_small_preset_gives_a_finite_loss_with_finite_gradients(small_models, method):
    model = small_models[method]
    out = model(torch.rand(2, 1, SMALL, SMALL, SMALL), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "reconstruction"}
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    model.zero_grad()
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_same_generator_seed_repeats_the_loss_and_another_seed_changes_it(small_models, method):
    model, volume = small_models[method], torch.rand(1, 1, SMALL, SMALL, SMALL)
    with torch.no_grad():
        loss_a, loss_b, loss_c = (model(volume, generator=torch.Generator().manual_seed(s))["loss"] for s in (3, 3, 4))
    assert torch.equal(loss_a, loss_b)
    assert not torch.equal(loss_a, loss_c)


def test_noise_is_drawn_uniform_on_the_cpu(small_models):
    noise = small_models["mae"].draw_noise(3, torch.Generator().manual_seed(0))
    assert noise["tokens"].shape == (3, 64) and noise["tokens"].device.type == "cpu"
    assert noise["tokens"].min() >= 0 and noise["tokens"].max() < 1


def test_l1_loss_counts_only_the_masked_patches():
    target = torch.rand(2, 8, 5)
    mask = torch.zeros(2, 8)
    mask[:, :3] = 1
    pred = torch.where(mask.bool().unsqueeze(-1), target, torch.rand(2, 8, 5) + 10)  # visible patches far off
    assert masked_l1_loss(pred, target, mask) == 0
    assert masked_l1_loss(pred + 0.5 * mask.unsqueeze(-1), target, mask) == pytest.approx(0.5)


@pytest.mark.parametrize("method", METHODS)
def test_wrong_volume_shape_is_refused_with_the_expected_shape(small_models, method):
    with pytest.raises(ValueError, match=r"expects volumes of shape \(B, 1, 64, 64, 64\), got \(1, 1, 32, 32, 32\)"):
        small_models[method](torch.rand(1, 1, 32, 32, 32))


@pytest.mark.parametrize("preset", ["base", "small"])
def test_pretraining_and_unetr_presets_share_the_encoder_sizes(preset):
    fields = ("hidden_size", "mlp_dim", "num_heads")
    unetr = dataclasses.asdict(resolve("unetr", preset))
    for method in METHODS:
        config = dataclasses.asdict(resolve(method, preset))
        assert {f: config[f] for f in fields} == {f: unetr[f] for f in fields}, method
        assert (config["patch_size"], config["num_layers"]) == (16, 12), method  # what MONAI UNETR builds


@pytest.mark.parametrize("method", METHODS)
def test_pretrained_encoder_state_dict_loads_strictly_into_unetr_vit(small_models, method):
    encoder = {k.removeprefix("vit."): v for k, v in small_models[method].state_dict().items() if k.startswith("vit.")}
    net = build_segmenter("unetr", num_classes=3, preset="small", roi_size=(SMALL,) * 3)
    net.vit.load_state_dict(encoder, strict=True)
    torch.testing.assert_close(net.vit.blocks[5].mlp.linear1.weight, encoder["blocks.5.mlp.linear1.weight"])


def test_unetr_maps_a_window_to_class_logits():
    net = build_segmenter("unetr", num_classes=3, preset="small", roi_size=(SMALL,) * 3)
    with torch.no_grad():
        assert net(torch.rand(1, 1, SMALL, SMALL, SMALL)).shape == (1, 3, SMALL, SMALL, SMALL)


def test_unetr_has_no_layer_count_option_because_monai_fixes_it():
    with pytest.raises(BadInputError, match="unknown unetr option 'num_layers'"):
        build_segmenter("unetr", num_classes=2, preset="small", roi_size=(SMALL,) * 3, num_layers=10)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_base_preset_runs_one_forward_pass_on_a_96_cube(method):
    model = build_pretrainer(method, preset="base")
    assert model.len_keep == int(216 * (1 - 0.75)) == 54
    with torch.no_grad():
        out = model(torch.rand(1, 1, 96, 96, 96), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("method", METHODS)
def test_loss_falls_over_fifteen_adam_steps_on_a_fixed_volume(method):
    torch.manual_seed(0)
    model = build_pretrainer(method, preset="small")
    axis = torch.linspace(0, 1, SMALL)
    h, w, d = torch.meshgrid(axis, axis, axis, indexing="ij")
    volume = (0.5 + 0.3 * torch.sin(6 * h) * torch.cos(4 * w) + 0.2 * d).reshape(1, 1, SMALL, SMALL, SMALL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        loss = model(volume, generator=generator)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


def test_attention_runs_through_sdpa_with_the_same_result_as_monai_explicit_softmax():
    from monai.networks.blocks.selfattention import SABlock

    net = build_segmenter("unetr", num_classes=3, preset="small", roi_size=(SMALL,) * 3).eval()
    blocks = [m for m in net.modules() if isinstance(m, SABlock)]
    assert blocks and all(b.use_flash_attention for b in blocks)
    x = torch.rand(1, 1, SMALL, SMALL, SMALL)
    with torch.no_grad():
        fast = net(x)
        for b in blocks:
            b.use_flash_attention = False
        torch.testing.assert_close(fast, net(x), rtol=1e-4, atol=1e-4)
