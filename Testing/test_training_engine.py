"""The pieces of the training engine that are pure functions: the learning-rate schedule, the weight-decay groups,
and the sharding that gives every optimiser step the same volumes however the global batch is split."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mim3d.training.distributed import Sharding, World, derive_seed
from mim3d.training.engine import lr_at, param_groups


def test_learning_rate_warms_up_linearly_from_zero():
    schedule = dict(lr=1e-3, min_lr=1e-5, warmup_steps=10, total_steps=110)
    assert [lr_at(s, **schedule) for s in (0, 5, 10)] == pytest.approx([0.0, 5e-4, 1e-3])


def test_learning_rate_follows_a_half_cosine_to_min_lr():
    schedule = dict(lr=1e-3, min_lr=1e-5, warmup_steps=10, total_steps=110)
    midway = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lr_at(60, **schedule) == pytest.approx(midway)
    assert lr_at(110, **schedule) == pytest.approx(1e-5)
    assert lr_at(500, **schedule) == pytest.approx(1e-5)  # past the end: stays at the floor


def test_learning_rate_without_warm_up_starts_at_the_peak():
    assert lr_at(0, lr=2e-4, min_lr=0.0, warmup_steps=0, total_steps=8) == 2e-4


def test_weight_decay_skips_biases_norms_and_frozen_parameters():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Conv3d(8, 8, 3))
    model[2].weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [model[0].weight.shape]
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["0.bias", "1.bias", "1.weight", "2.bias"]


def _step_volumes(num_items, batch, accum, world_size, epoch=0):
    """{optimiser step: the set of (dataset index, epoch position) it trains on}, over all ranks."""
    steps = {}
    for rank in range(world_size):
        sharding = Sharding(num_items, batch, accum, World(rank, world_size), seed=7)
        indices, positions = sharding.indices(epoch, 0), sharding.positions(0)
        for k, (index, position) in enumerate(zip(indices, positions, strict=True)):
            steps.setdefault(k // (batch * accum), set()).add((index, position))
    return steps


def test_every_step_takes_the_same_volumes_however_the_global_batch_is_split():
    reference = _step_volumes(11, batch=4, accum=1, world_size=1)
    assert len(reference) == 2  # 11 // 4 steps; the 3 left over are not used in this epoch
    for batch, accum, world_size in ((1, 4, 1), (2, 1, 2), (1, 1, 4), (1, 2, 2)):
        assert _step_volumes(11, batch, accum, world_size) == reference, (batch, accum, world_size)


def test_epochs_shuffle_differently_and_repeatably():
    sharding = Sharding(20, 1, 1, World(), seed=3)
    assert sharding.order(0) != sharding.order(1)
    assert sharding.order(1) == Sharding(20, 1, 1, World(), seed=3).order(1)
    assert sorted(sharding.order(1)) == list(range(20))


def test_resuming_mid_epoch_continues_with_the_next_volumes():
    sharding = Sharding(12, 2, 1, World(1, 2), seed=0)
    assert sharding.indices(4, 2) == sharding.indices(4, 0)[2 * 2:]


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, "noise", 1, 5) == derive_seed(0, "noise", 1, 5)
    assert len({derive_seed(0, "noise", 1, p) for p in range(100)}) == 100
    assert 0 <= derive_seed("x") < 2**63
    torch.Generator().manual_seed(derive_seed(2**40, "order", 10**6))  # always a valid torch seed


def test_ddp_searches_for_unused_parameters_only_for_mim_pre_training(tmp_path):
    """Real DDP in a real (one-process gloo) group: find_unused_parameters costs a graph search after every forward,
    needed only by MiM's projection heads that get no gradient (METHOD.md §12.7)."""
    import torch.distributed as dist

    from mim3d.models import build_pretrainer, build_segmenter
    from mim3d.training.distributed import wrap_model

    tiny = {"embed_dims": [6, 12, 24, 48], "depths": [1, 1, 1, 1], "num_heads": 4}
    vit = {"hidden_size": 48, "mlp_dim": 96, "num_layers": 1, "num_heads": 4}
    models = {"mim": build_pretrainer("mim", "small", **tiny, decoder_dim=24, decoder_depth=1, decoder_heads=4),
              "mae": build_pretrainer("mae", "small", **vit), "simmim": build_pretrainer("simmim", "small", **vit),
              "mim-unetr": build_segmenter("mim-unetr", 3, "small", (64, 64, 64), 1, **tiny),
              "unetr": build_segmenter("unetr", 3, "small", (64, 64, 64), 1, hidden_size=48, mlp_dim=96,
                                       num_heads=4)}
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        searched = {name: wrap_model(model, World(0, 2), torch.device("cpu")).find_unused_parameters
                    for name, model in models.items()}
    finally:
        dist.destroy_process_group()
    assert searched == {"mim": True, "mae": False, "simmim": False, "mim-unetr": False, "unetr": False}
