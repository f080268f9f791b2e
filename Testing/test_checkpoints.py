"""Checkpoints: mim3d's own format, official MiM checkpoints read without running code, and pre-trained weights loaded
into pre-training models, mim-unetr and MONAI UNETR with an exact report (METHOD.md §9.4, §10, §15.3)."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import pytest
import torch

from mim3d.errors import BadInputError
from mim3d.models import build_pretrainer, build_segmenter, checkpoints, load_pretrained
from mim3d.models.checkpoints import read_checkpoint, save_checkpoint
from mim3d.presets import config_to_dict

KEY_TABLE = Path("/work/shared/reference/mim_official_pretrain_keys.json")
if not KEY_TABLE.exists():
    KEY_TABLE = Path(__file__).parent / "data" / "mim_official_pretrain_keys.json"

# METHOD.md §9.4: checkpoint keys the fine-tuning network does not use.
PRETRAINING_ONLY = re.compile(r"norm\.|stage[123]_output_decode\.|decoder_embed\.|mask_token$|decoder_pos_embed$|"
                              r"decoder_blocks\.|decoder_norm\.|decoder_pred\.|"
                              r"aggregate_(mid|down|pred_up_feature|pred_mid_feature)\.")
# METHOD.md §9.4: mim-unetr keys left at initialisation.
FINE_TUNING_ONLY = re.compile(r"backbone\.fpn\.|gamma_[12]$|relative_position_(bias_table|index)$|"
                              r"^(encoder(1|2|3|4|10)|decoder[1-5]|out)\.")


def _official_state() -> dict[str, torch.Tensor]:
    """Random tensors of the official shapes; pos_embed channels 0, 1, 2 hold each token's h, w, d index."""
    entries = json.loads(KEY_TABLE.read_text())["entries"]
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) for k, shape in entries.items()}
    grid = torch.stack(torch.meshgrid(*[torch.arange(6.0)] * 3, indexing="ij"), dim=-1).reshape(216, 3)
    state["pos_embed"][0, :, :3] = grid
    return state


@pytest.fixture(scope="module")
def official_state() -> dict[str, torch.Tensor]:
    return _official_state()


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory, official_state) -> Path:
    """A stand-in for the released checkpoint-final.pth, laid out as misc.save_model writes it (§10.1)."""
    tiny = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(tiny.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    tiny(torch.rand(2, 4)).sum().backward()
    optimizer.step()
    args = argparse.Namespace(model="convmae_convvit_base_patch16", input_size=96, batch_size=2, epochs=800,
                              blr=1.5e-4, attn_loss_name="CE", not_use_attn=False, mask_ratio_up=0.5,
                              output_dir="./output", dataset_split=["btcv", "tcia"])
    path = tmp_path_factory.mktemp("official") / "checkpoint-final.pth"
    torch.save({"model": official_state, "optimizer": optimizer.state_dict(), "epoch": 790,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 17},
                "args": args}, path)
    return path


@pytest.fixture(scope="module")
def small_mim_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    model = build_pretrainer("mim", "small")
    path = tmp_path_factory.mktemp("small") / "mim-small.pth"
    save_checkpoint(path, method="mim", config=config_to_dict(model.config), model_state=model.state_dict(), epoch=3)
    return path, model.state_dict()


@pytest.fixture(scope="module")
def base_pretrainer():
    return build_pretrainer("mim", "base")


@pytest.fixture(scope="module")
def small_vit_checkpoints(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """mim3d checkpoints of the small MAE and SimMIM pre-training models (input 64³: a 4×4×4 token grid)."""
    folder = tmp_path_factory.mktemp("vit")
    saved = {}
    for method in ("mae", "simmim"):
        model = build_pretrainer(method, "small")
        path = save_checkpoint(folder / f"{method}-small.pth", method=method, config=config_to_dict(model.config),
                               model_state=model.state_dict())
        saved[method] = path, model.state_dict()
    return saved


# ---- official checkpoints -----------------------------------------------------------------------------------------

def test_official_checkpoint_reads_as_official_with_its_namespace_args(official_checkpoint):
    kind, payload = read_checkpoint(official_checkpoint)
    assert kind == "official-mim"
    assert isinstance(payload["args"], argparse.Namespace) and payload["args"].attn_loss_name == "CE"
    assert payload["epoch"] == 790 and len(payload["model"]) == 363


def test_official_checkpoint_loads_strictly_into_the_base_pretrainer(official_checkpoint, official_state,
                                                                     base_pretrainer):
    report = load_pretrained(base_pretrainer, official_checkpoint)
    assert (len(report.loaded), report.ignored, report.missing) == (363, [], [])
    loaded = base_pretrainer.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in official_state.items())


def test_official_checkpoint_loads_the_encoder_of_base_mim_unetr(official_checkpoint, official_state):
    net = build_segmenter("mim-unetr", 14, "base")
    report = load_pretrained(net, official_checkpoint)
    ignored = {k for k in official_state if PRETRAINING_ONLY.match(k)}
    assert report.source == "official-mim" and report.method == "mim"
    assert report.loaded == sorted(f"backbone.{k}" for k in official_state.keys() - ignored)
    assert len(report.loaded) == 235  # patch_embed1–5 (18), pos_embed (1), blocks1–3 (6 × 14), blocks4 (11 × 12)
    assert report.ignored == sorted(ignored)
    assert report.missing == sorted(k for k in net.state_dict() if FINE_TUNING_ONLY.search(k))
    assert report.adapted == []
    state = net.state_dict()
    assert all(torch.equal(state[f"backbone.{k}"], official_state[k]) for k in official_state.keys() - ignored)


def test_official_checkpoint_into_a_128_roi_interpolates_the_positions_trilinearly(official_checkpoint,
                                                                                    official_state):
    net = build_segmenter("mim-unetr", 14, "base", roi_size=(128, 128, 128))
    report = load_pretrained(net, official_checkpoint)
    assert report.adapted == ["backbone.pos_embed interpolated from the 6×6×6 to the 8×8×8 token grid"]
    positions = net.state_dict()["backbone.pos_embed"]
    assert positions.shape == (1, 512, 384)
    # align_corners=False: target index i samples source coordinate (i + 0.5)·6/8 − 0.5, clamped to [0, 5];
    # trilinear interpolation of the linear h, w, d channels returns that coordinate, per axis, in H·W·D order.
    source = ((torch.arange(8.0) + 0.5) * 6 / 8 - 0.5).clamp(0, 5)
    expected = torch.stack(torch.meshgrid(source, source, source, indexing="ij"), dim=-1).reshape(512, 3)
    torch.testing.assert_close(positions[0, :, :3], expected)
    key = "blocks4.10.mlp.fc2.weight"
    assert torch.equal(net.state_dict()[f"backbone.{key}"], official_state[key])


# ---- mim3d checkpoints ----------------------------------------------------------------------------------------------

def test_small_mim_checkpoint_fine_tunes_end_to_end_on_a_non_cubic_roi(small_mim_checkpoint):
    path, pretrained = small_mim_checkpoint
    net = build_segmenter("mim-unetr", 3, "small", roi_size=(64, 64, 32), in_channels=2)
    report = load_pretrained(net, path)
    backbone_keys = [k for k in net.backbone.state_dict() if not re.search(r"fpn\.|gamma_|relative_position_", k)]
    assert (report.source, report.method) == ("mim3d", "mim")
    assert len(report.loaded) == len(backbone_keys) == 109  # patch_embed1–5, pos_embed, 3 CBlocks × 14, 4 × 12
    assert sorted(report.adapted) == [
        "backbone.patch_embed1.proj.weight tiled from 1 to 2 input channels",
        "backbone.pos_embed interpolated from the 4×4×4 to the 4×4×2 token grid"]
    state = net.state_dict()
    assert torch.equal(state["backbone.patch_embed1.proj.weight"],
                       pretrained["patch_embed1.proj.weight"].repeat(1, 2, 1, 1, 1))
    assert torch.equal(state["backbone.blocks4.3.attn.qkv.weight"], pretrained["blocks4.3.attn.qkv.weight"])
    with torch.no_grad():
        assert net.eval()(torch.rand(1, 2, 64, 64, 32)).shape == (1, 3, 64, 64, 32)
    assert report.summary().startswith(f"mim-small.pth (mim3d, mim): loaded {len(report.loaded)} tensors, ignored ")


def test_small_checkpoint_into_the_base_pretrainer_is_refused_listing_keys(small_mim_checkpoint, base_pretrainer):
    path, _ = small_mim_checkpoint
    with pytest.raises(BadInputError, match=rf"{re.escape(str(path))}: does not match this mim model \(\d+ "
                                            r"differences, e.g. blocks1\.1\.attn\.bias missing from the checkpoint"):
        load_pretrained(base_pretrainer, path)


def test_small_checkpoint_into_base_mim_unetr_is_refused_naming_the_mismatch(small_mim_checkpoint):
    net = build_segmenter("mim-unetr", 2, "base", roi_size=(64, 64, 64))
    with pytest.raises(BadInputError, match=r"its encoder does not match this model: 126 model tensors missing "
                                            r"from the checkpoint \(e\.g\. blocks1\.1\.attn\.bias, "):
        load_pretrained(net, small_mim_checkpoint[0])


def test_mim_checkpoint_into_unetr_is_refused_pointing_to_mim_unetr(small_mim_checkpoint):
    net = build_segmenter("unetr", 2, "small", roi_size=(64, 64, 64))
    with pytest.raises(BadInputError, match="a MiM checkpoint holds the hybrid MiM encoder; fine-tune it with arch "
                                            "'mim-unetr', not 'unetr'"):
        load_pretrained(net, small_mim_checkpoint[0])


def test_mae_checkpoint_loads_its_vit_into_unetr_with_interpolated_positions_and_tiled_channels(
        small_vit_checkpoints):
    path, pretrained = small_vit_checkpoints["mae"]
    net = build_segmenter("unetr", 2, "small", roi_size=(96, 96, 64), in_channels=2)
    report = load_pretrained(net, path)
    assert (report.source, report.method) == ("mim3d", "mae")
    assert report.loaded == sorted(k for k in pretrained if k.startswith("vit."))
    assert report.ignored == sorted(k for k in pretrained if not k.startswith("vit."))
    assert report.missing == sorted(k for k in net.state_dict() if not k.startswith("vit."))
    assert sorted(report.adapted) == [
        "vit.patch_embedding.patch_embeddings.1.weight tiled from 1 to 2 input channels",
        "vit.patch_embedding.position_embeddings interpolated from the 4×4×4 to the 6×6×4 token grid"]
    state = net.state_dict()
    assert torch.equal(state["vit.blocks.11.mlp.linear2.weight"], pretrained["vit.blocks.11.mlp.linear2.weight"])
    # Tiling the input channels: a two-channel patch embeds as its channel sum did in the one-channel encoder.
    volume = torch.rand(1, 2, 32, 32, 32)
    one_channel = build_pretrainer("mae", "small")
    one_channel.load_state_dict(pretrained)
    with torch.no_grad():
        torch.testing.assert_close(net.vit.patch_embedding.patch_embeddings(volume),
                                   one_channel.vit.patch_embedding.patch_embeddings(volume.sum(1, keepdim=True)))


def test_simmim_checkpoint_continues_simmim_pretraining_exactly_and_not_mae(small_vit_checkpoints):
    path, pretrained = small_vit_checkpoints["simmim"]
    model = build_pretrainer("simmim", "small")
    report = load_pretrained(model, path)
    assert (len(report.loaded), report.ignored, report.missing) == (len(pretrained), [], [])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in pretrained.items())
    with pytest.raises(BadInputError, match="a simmim checkpoint cannot continue mae pre-training"):
        load_pretrained(build_pretrainer("mae", "small"), path)


def test_mae_checkpoint_into_mim_unetr_is_refused_pointing_to_unetr(small_vit_checkpoints):
    net = build_segmenter("mim-unetr", 2, "small", roi_size=(64, 64, 64))
    with pytest.raises(BadInputError, match="a mae checkpoint holds a ViT encoder; fine-tune it with arch 'unetr'"):
        load_pretrained(net, small_vit_checkpoints["mae"][0])


def test_checkpoint_of_a_newer_format_version_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "new.pth", method="mim", config={}, model_state={"w": torch.zeros(1)})
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "format_version": 2}, path)
    with pytest.raises(BadInputError, match=r"new\.pth: written by a newer mim3d \(format_version 2"):
        read_checkpoint(path)


# ---- files that are refused --------------------------------------------------------------------------------------

class _RunsCode:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle protocol 2"])
def test_checkpoint_whose_pickle_runs_code_is_refused(tmp_path, writer):
    marker, path = tmp_path / "ran", tmp_path / "checkpoint-final.pth"
    payload = {"args": _RunsCode(marker), "model": {"w": torch.zeros(1)}}  # the code-running global comes first
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    net = build_segmenter("mim-unetr", 2, "small", roi_size=(64, 64, 64))
    with pytest.raises(BadInputError, match=rf"{re.escape(str(path))}: refused to unpickle '(posix|os)\.system': "
                                            "unpickling it could run code"):
        load_pretrained(net, path)
    assert not marker.exists()


def _text(path: Path) -> None:
    path.write_text("epoch 790, loss 0.42\n")


def _truncated(path: Path) -> None:
    torch.save({"model": {"w": torch.rand(1000)}}, path)
    path.write_bytes(path.read_bytes()[:700])


def _without_model(path: Path) -> None:
    torch.save({"state_dict": {"module.patch_embed.proj.weight": torch.zeros(1)}}, path)


def _bare_tensor(path: Path) -> None:
    torch.save(torch.zeros(3), path)


def _foreign_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model.json", "{}")


@pytest.mark.parametrize(("make", "message"), [
    (_text, "cannot be read as a PyTorch checkpoint; it is truncated, corrupt or another kind of file"),
    (_truncated, "cannot be read as a PyTorch checkpoint; it is truncated, corrupt or another kind of file"),
    (_foreign_zip, "cannot be read as a PyTorch checkpoint; it is truncated, corrupt or another kind of file"),
    (_without_model, r"no 'model' entry \(top-level keys: state_dict\)"),
    (_bare_tensor, "holds a Tensor, expected a checkpoint dict with a 'model' state dict"),
    (None, "no such file"),
])
def test_unusable_file_is_refused_naming_the_file_and_the_problem(tmp_path, make, message):
    path = tmp_path / "weights.pth"
    if make:
        make(path)
    net = build_segmenter("mim-unetr", 2, "small", roi_size=(64, 64, 64))
    with pytest.raises(BadInputError, match=rf"^{re.escape(str(path))}: {message}"):
        load_pretrained(net, path)


# ---- writing -----------------------------------------------------------------------------------------------------

def test_saved_checkpoint_reads_back_with_weights_only_and_leaves_no_temporary_file(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.rand(1, 3)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "last.pth", method="mim", config={"input_size": 64, "depths": [1, 1]},
                           model_state=model.state_dict(), optimizer=optimizer.state_dict(), epoch=5,
                           rng=torch.get_rng_state())
    assert os.listdir(tmp_path) == ["last.pth"]
    payload = torch.load(path, weights_only=True)
    assert (payload["format"], payload["format_version"], payload["method"], payload["epoch"]) == (
        "mim3d-checkpoint", 1, "mim", 5)
    assert torch.equal(payload["model"]["weight"], model.weight)
    assert read_checkpoint(path)[0] == "mim3d"


def test_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pth", method="mim", config={}, model_state={"w": torch.ones(2)})
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, method="mim", config={}, model_state={"w": torch.zeros(2)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pth"]


def test_saving_an_entry_that_weights_only_loading_would_refuse_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['scheduler'\]\['fn'\] is a function"):
        save_checkpoint(tmp_path / "x.pth", method="mim", config={}, model_state={}, scheduler={"fn": lambda e: e})
    assert os.listdir(tmp_path) == []
