"""mim3d.data.transforms: the pre-training and fine-tuning pipelines (METHOD.md §8.2, §9.5) on the real CT: values,
padding, crops that depend only on (seed, epoch, index), the content-keyed cache, unreadable volumes mid-run, and
remapped labels in model space."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from volume_helpers import make_image, ramp, write_image

from mim3d.data import FinetuneCase, FinetunePreprocessing, finetune_train_dataset, finetune_val_dataset
from mim3d.data import transforms as T
from mim3d.data.cache import QUANTUM
from mim3d.errors import BadInputError

STEP = 1.0 / QUANTUM  # the cache's storage step for [0, 1] values


@pytest.fixture
def read_count(monkeypatch) -> list:
    """Every volume read by the pipelines, appended as it happens."""
    reads, original = [], T.read_source
    monkeypatch.setattr(T, "read_source", lambda source: reads.append(source) or original(source))
    return reads


def _synthetic(tmp_path: Path, name: str, shape_kji=(16, 16, 16), low=-1500, high=1500) -> Path:
    return write_image(tmp_path / name, make_image(ramp(shape_kji, low, high), spacing=(1.0, 1.0, 2.0)))


def test_pretraining_item_is_a_float_crop_of_the_crop_size_in_0_1(tmp_path, example_ct_sm_path):
    item = T.pretraining_dataset([example_ct_sm_path], crop_size=64, cache_dir=tmp_path)[0]
    assert item.shape == (1, 64, 64, 64) and item.dtype == torch.float32
    assert item.min() >= 0 and item.max() <= 1 and item.std() > 0.1


def test_pretraining_values_are_the_hu_window_of_the_ras_volume(tmp_path):
    path = _synthetic(tmp_path, "ramp.nii.gz")  # 16³, identity LPS direction: I points to L, J to P
    item = T.pretraining_dataset([path], crop_size=16, cache_dir=None)[0]  # the crop is the whole volume
    hu_ijk = ramp((16, 16, 16), -1500, 1500).transpose(2, 1, 0).astype(np.float64)
    expected = np.clip((hu_ijk[::-1, ::-1, :] + 1000) / 2000, 0, 1)  # to RAS: I and J reversed
    assert np.allclose(item[0].numpy(), expected, atol=STEP)


def test_a_volume_smaller_than_the_crop_is_padded_with_zero(tmp_path, example_ct_sm_path):
    item = T.pretraining_dataset([example_ct_sm_path], crop_size=64, cache_dir=tmp_path)[0]  # 122×101×30
    assert (item[..., :17] == 0).all() and (item[..., 47:] == 0).all()  # (64 - 30) / 2 = 17 slices each side
    assert (item[..., 17:47] > 0).float().mean() > 0.5


def test_the_crop_depends_only_on_seed_epoch_and_index(tmp_path, example_ct_sm_path, example_ct_path):
    volumes = [example_ct_sm_path, example_ct_path]
    cached = T.pretraining_dataset(volumes, crop_size=48, cache_dir=tmp_path, seed=5)
    uncached = T.pretraining_dataset(volumes, crop_size=48, cache_dir=None, seed=5)
    first = [cached[i] for i in (0, 1)]
    assert all(torch.equal(a, uncached[i]) for i, a in enumerate(first))
    cached.set_epoch(3)
    uncached.set_epoch(3)
    assert torch.equal(cached[1], uncached[1]) and not torch.equal(cached[1], first[1])
    other_seed = T.pretraining_dataset(volumes, crop_size=48, cache_dir=tmp_path, seed=6)
    assert not torch.equal(other_seed[1], first[1])


def test_persistent_dataloader_workers_give_the_crops_of_a_single_process_each_epoch(tmp_path):
    volumes = [_synthetic(tmp_path, f"v{i}.nii.gz", (24, 20, 28), -1200 + 50 * i) for i in range(4)]
    dataset = T.pretraining_dataset(volumes, crop_size=12, cache_dir=tmp_path / "cache", seed=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        direct = torch.stack([dataset[i] for i in range(4)])
        assert torch.equal(torch.cat(list(loader)), direct)


def test_a_second_dataset_is_served_from_the_cache_without_reading_the_source(tmp_path, example_ct_sm_path,
                                                                              read_count):
    first = T.pretraining_dataset([example_ct_sm_path], crop_size=32, cache_dir=tmp_path)[0]
    assert len(read_count) == 1
    again = T.pretraining_dataset([example_ct_sm_path], crop_size=32, cache_dir=tmp_path)[0]
    assert len(read_count) == 1 and torch.equal(first, again)


def test_a_changed_source_invalidates_the_cache_even_with_the_same_size_and_mtime(tmp_path, read_count):
    path = _synthetic(tmp_path, "ct.nii")  # uncompressed: the last 2 bytes are the last voxel
    before = T.pretraining_dataset([path], crop_size=16, cache_dir=tmp_path / "cache")[0]
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-2:] = np.int16(-1000).tobytes()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    after = T.pretraining_dataset([path], crop_size=16, cache_dir=tmp_path / "cache")[0]
    assert len(read_count) == 2
    assert after[0, 0, 0, -1] == 0 and before[0, 0, 0, -1] == 1  # the last voxel, I and J reversed to RAS


def test_a_volume_unreadable_mid_run_is_replaced_by_the_next_and_counted_across_workers(tmp_path, caplog):
    volumes = [_synthetic(tmp_path, f"v{i}.nii.gz", (20, 20, 20), -1200 + 100 * i) for i in range(3)]
    dataset = T.pretraining_dataset(volumes, crop_size=16, cache_dir=None, seed=2)
    expected = torch.stack([dataset[i] for i in range(3)])
    volumes[1].write_text("damaged")
    with caplog.at_level(logging.WARNING, logger="mim3d.data.transforms"):
        replaced = dataset[1]
    assert dataset.skipped == 1 and "v1.nii.gz" in caplog.text and "could not be read" in caplog.text
    assert not torch.equal(replaced, expected[1]) and replaced.shape == (1, 16, 16, 16)
    loaded = torch.cat(list(torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2)))
    assert torch.equal(loaded[0], expected[0]) and torch.equal(loaded[2], expected[2])
    assert torch.equal(loaded[1], replaced) and dataset.skipped == 2


def test_no_readable_volume_at_all_stops_with_a_bad_input_error(tmp_path):
    path = _synthetic(tmp_path, "v.nii.gz")
    dataset = T.pretraining_dataset([path], crop_size=8, cache_dir=None)
    path.unlink()
    with pytest.raises(BadInputError, match="none of the 1 training volumes could be read"):
        dataset[0]


@pytest.fixture(scope="module")
def finetune(tmp_path_factory, example_data):
    """The real CT slab with TotalSegmentator labels remapped (5 liver -> 1, 1 spleen -> 2), a shared cache."""
    case = FinetuneCase(example_data / "example_ct_sm.nii.gz", example_data / "example_seg.nii.gz", "ct_sm",
                        label_map={5: 1, 1: 2})
    settings = FinetunePreprocessing(roi=(32, 32, 32), num_samples=3)
    return case, settings, tmp_path_factory.mktemp("finetune-cache")


def test_finetune_items_are_lists_of_crops_with_float_images_and_integer_labels(finetune):
    case, settings, cache = finetune
    crops = finetune_train_dataset([case], settings, cache, seed=0)[0]
    assert len(crops) == 3
    for crop in crops:
        assert crop["image"].shape == (1, 32, 32, 32) and crop["image"].dtype == torch.float32
        assert crop["label"].shape == (1, 32, 32, 32) and crop["label"].dtype == torch.int64
        assert set(crop["label"].unique().tolist()) <= {0, 1, 2}
    assert any((crop["label"] > 0).any() for crop in crops)  # pos 1 : neg 1 puts foreground in some crops


def test_finetune_crops_depend_only_on_seed_epoch_and_index(finetune):
    case, settings, cache = finetune
    a, b = (finetune_train_dataset([case], settings, cache, seed=3) for _ in range(2))
    b.set_epoch(1)
    one = b[0]
    b.set_epoch(0)
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
               for x, y in zip(a[0], b[0], strict=True))
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a[0], one, strict=True))


def test_remapped_labels_survive_into_model_space_with_their_volumes(finetune):
    case, settings, cache = finetune
    item = finetune_val_dataset([case], settings, cache)[0]
    assert item["name"] == "ct_sm" and item["image"].dtype == torch.float32 and item["label"].dtype == torch.int64
    assert torch.allclose(item["image"].affine.diagonal()[:3], torch.tensor([1.5, 1.5, 2.0], dtype=torch.float64))
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
    for value, source_id in ((1, 5), (2, 1)):  # liver, spleen: the same millilitres at 1.5×1.5×2 as at 3×3×3 mm
        model_ml = float((item["label"] == value).sum()) * 1.5 * 1.5 * 2.0 / 1000
        source_ml = float((source == source_id).sum()) * 27.0 / 1000
        assert model_ml == pytest.approx(source_ml, rel=0.05)
    liver_mean = float(item["image"][item["label"] == 1].mean())  # liver ~90 HU in window (-175, 250)
    assert 0.5 < liver_mean < 0.75


def test_thin_slab_crops_keep_consecutive_slices_and_pad_the_rest_as_the_sliding_windows_do(finetune):
    case, settings, cache = finetune
    plain = replace(settings, flip_prob=0.0, rot90_prob=0.0, affine_prob=0.0, scale_intensity_prob=0.0,
                    shift_intensity_prob=0.0, tissue_intensity_prob=0.0)
    whole = finetune_train_dataset([case], replace(plain, slab_prob=0.0), cache, seed=0)[0]
    slabs = finetune_train_dataset([case], replace(plain, slab_prob=1.0, slab_mm=(4.0, 8.0)), cache, seed=0)[0]
    for full, slab in zip(whole, slabs, strict=True):  # the same crops; 2 mm slices: 2 to 4 of them kept
        for k in range(32):  # each slice is the crop's own, or padding: image 0 and background
            assert (torch.equal(slab["image"][..., k], full["image"][..., k])
                    and torch.equal(slab["label"][..., k], full["label"][..., k])) or (
                not slab["image"][..., k].any() and not slab["label"][..., k].any())
        kept = [k for k in range(32) if slab["image"][..., k].any()]
        assert 1 <= len(kept) <= 4 and kept == list(range(kept[0], kept[0] + len(kept)))
        assert sum(bool(full["image"][..., k].any()) for k in range(32)) > 4  # so the slab really cut the crop


def test_tissue_intensity_changes_voxels_inside_the_window_and_leaves_air_and_padding_at_zero(finetune):
    case, settings, cache = finetune
    plain = replace(settings, flip_prob=0.0, rot90_prob=0.0, affine_prob=0.0, scale_intensity_prob=0.0,
                    shift_intensity_prob=0.0, slab_prob=0.0)
    before = finetune_train_dataset([case], replace(plain, tissue_intensity_prob=0.0), cache, seed=1)[0]
    after = finetune_train_dataset([case], replace(plain, tissue_intensity_prob=1.0), cache, seed=1)[0]
    for x, y in zip(before, after, strict=True):
        assert torch.equal(y["image"][x["image"] == 0], x["image"][x["image"] == 0])
        assert not torch.equal(x["image"], y["image"]) and y["image"].min() >= 0 and y["image"].max() <= 1
        assert torch.equal(x["label"], y["label"])


def test_crops_show_the_body_at_other_places_sizes_and_angles_with_its_labels_on_it(tmp_path):
    # A body box of 60 x 50 voxels fits one 64 x 64 window: without the affine augmentation every crop holds the
    # body at one place, as a body-cropped training scan does, unlike the wider box `mim3d segment` tiles on a
    # patient with arms down. With it the body moves, grows, shrinks and turns, and its labels with it.
    body = np.full((10, 50, 60), 0, np.int16)  # water, (K, J, I) at 6 x 6 x 3 mm
    labels = np.zeros_like(body, dtype=np.uint8)
    body[:, 12:24, 10:22] = labels[:, 12:24, 10:22] = 200  # an organ at 200 HU, label 1 (200 -> 1 below)
    spacing = (6.0, 6.0, 3.0)
    case = FinetuneCase(write_image(tmp_path / "ct.nii.gz", make_image(body, spacing)),
                        write_image(tmp_path / "labels.nii.gz", make_image(labels, spacing)), "box",
                        label_map={200: 1})
    plain = FinetunePreprocessing(spacing_mm=spacing, roi=(64, 64, 32), num_samples=4, flip_prob=0.0, rot90_prob=0.0,
                                  scale_intensity_prob=0.0, shift_intensity_prob=0.0, slab_prob=0.0,
                                  tissue_intensity_prob=0.0)

    def organs(settings: FinetunePreprocessing) -> np.ndarray:
        dataset, found = finetune_train_dataset([case], settings, tmp_path / "cache", seed=0), []
        for epoch in range(4):
            dataset.set_epoch(epoch)
            for crop in dataset[0]:
                label, bright = crop["label"][0] == 1, crop["image"][0] > (100 + 175) / 425  # above 100 HU
                i, j, _ = (axis.float().mean().item() for axis in torch.nonzero(label, as_tuple=True))
                overlap = 2 * (label & bright).sum().item() / (label.sum() + bright.sum()).item()
                found.append((i, j, label.sum().item(), overlap))
        return np.array(found)

    still, moved = organs(replace(plain, affine_prob=0.0)), organs(replace(plain, affine_prob=1.0))
    assert np.ptp(still[:, 0]) == 0 and np.ptp(still[:, 1]) == 0  # the premise: otherwise one place in plane
    assert np.ptp(moved[:, 0]) > 4 and np.ptp(moved[:, 1]) > 4  # voxels; up to ±16 drawn
    assert np.ptp(moved[:, 2]) > 0.1 * moved[:, 2].mean()  # zoomed: the organ's voxel count changes
    assert still[:, 3].min() == 1.0 and moved[:, 3].min() > 0.85  # the labels lie on the organ they label


def test_class_ratios_centre_crops_on_a_small_organ_as_often_as_on_a_large_one(tmp_path):
    # A large organ (label 1) fills the lower half of the volume, a small one (label 2) sits at the top: pos/neg
    # crops centre on labelled voxels by their number, so the small organ is rarely in the crop.
    body = np.full((40, 20, 20), 40, np.int16)  # (K, J, I), 2 mm isotropic, soft tissue
    body[0, 0, 0] = -1000
    labels = np.zeros_like(body, dtype=np.uint8)
    labels[2:18] = 1
    labels[36:38, 8:11, 8:11] = 2
    case = FinetuneCase(write_image(tmp_path / "ct.nii.gz", make_image(body, (2.0, 2.0, 2.0))),
                        write_image(tmp_path / "labels.nii.gz", make_image(labels, (2.0, 2.0, 2.0))), "two")
    plain = FinetunePreprocessing(spacing_mm=(2.0, 2.0, 2.0), roi=(16, 16, 8), num_samples=6, flip_prob=0.0,
                                  rot90_prob=0.0, affine_prob=0.0, slab_prob=0.0)

    def with_small_organ(settings: FinetunePreprocessing) -> float:
        dataset, found = finetune_train_dataset([case], settings, tmp_path / "cache", seed=0), []
        for epoch in range(10):
            dataset.set_epoch(epoch)
            found += [bool((crop["label"] == 2).any()) for crop in dataset[0]]
        return float(np.mean(found))

    assert with_small_organ(plain) < 0.15  # about 1 in 60 of the crops' centres
    assert with_small_organ(replace(plain, class_ratios=(1.0, 1.0, 1.0))) > 0.2  # a third, by design


@pytest.mark.parametrize(("field", "value", "message"), [
    ("slab_mm", (30.0, 10.0), r"slab_mm: \(30\.0, 10\.0\) must be \(thinnest, thickest\)"),
    ("tissue_scale", 1.5, r"tissue_scale 1\.5, tissue_offset 0\.15: need a scale in \[0, 1\)"),
    ("roi", (0, 96, 96), r"roi: \(0, 96, 96\) must be three positive"),
    ("hu_window", (250.0, -175.0), r"hu_window: \(250\.0, -175\.0\) must be \(low, high\)"),
    ("flip_prob", 1.5, r"flip_prob: 1\.5 must lie in \[0, 1\]"),
    ("affine_prob", -0.1, r"affine_prob: -0\.1 must lie in \[0, 1\]"),
    ("zoom", 1.0, r"zoom 1\.0, shift 0\.25: need a non-negative angle and shift and a zoom in \[0, 1\)"),
    ("class_ratios", (0.0, 0.0), r"class_ratios: \(0\.0, 0\.0\) must be non-negative, not all 0"),
])
def test_invalid_finetune_settings_are_refused_naming_the_field(finetune, field, value, message):
    case, _, _ = finetune
    with pytest.raises(BadInputError, match=message):
        finetune_train_dataset([case], FinetunePreprocessing(**{field: value}), None)


def test_invalid_pretraining_crop_size_is_refused(example_ct_sm_path):
    with pytest.raises(BadInputError, match=r"crop_size: 0 must be a positive number of voxels"):
        T.pretraining_dataset([example_ct_sm_path], crop_size=0, cache_dir=None)


def test_cache_entries_are_complete_folders_without_leftovers(tmp_path, example_ct_sm_path):
    T.pretraining_dataset([example_ct_sm_path], crop_size=32, cache_dir=tmp_path)[0]
    [kind] = [p for p in tmp_path.iterdir() if p.name.startswith("pretrain-")]
    [entry] = list(kind.iterdir())
    assert sorted(p.name for p in entry.iterdir()) == ["image.npy", "meta.json"]
    assert np.load(entry / "image.npy").dtype == np.uint16
    shutil.rmtree(tmp_path)
