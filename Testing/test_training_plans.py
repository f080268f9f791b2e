"""Memory plans for training (mim3d.training.plans): the step's footprint traced with fake tensors, activation
checkpointing chosen only when the step does not fit without it, a refusal that says what would fit, and real
`mim3d pretrain` / `mim3d finetune` jobs in a real 6 GB memory cgroup, planned or refused (exit 2), never killed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_finetune import LABEL_MAP, write_cases
from test_memory import memory_cgroup
from test_pretrain import TINY

from mim3d import memory
from mim3d.errors import BadInputError
from mim3d.models import build_pretrainer, build_segmenter
from mim3d.protocol import EXIT_BAD_INPUT, EXIT_OK, parse_line
from mim3d.run_options import FinetuneOptions, PretrainOptions, parse_overrides
from mim3d.training import finetune, pretrain
from mim3d.training.encoder_modes import EncoderMode
from mim3d.training.plans import step_footprint, use_activation_checkpointing

GB = 10**9


def tiny_mim(**extra):
    return build_pretrainer("mim", "small", **parse_overrides(TINY["mim"]), **extra)


def footprints(model):
    noise = model.draw_noise(1, torch.Generator().manual_seed(0))
    crop = model.config.crop_size
    return [step_footprint(model, (torch.zeros(1, 1, crop, crop, crop), None, noise), lambda o: o["loss"],
                           checkpointing=c) for c in (False, True)]


def test_checkpointing_is_chosen_only_when_the_step_does_not_fit_without_it():
    plain, checkpointed = footprints(tiny_mim())
    assert checkpointed.activations < plain.activations and checkpointed.weights == plain.weights
    opts = PretrainOptions(override=TINY["mim"], preset="small")
    roomy = pretrain.plan_memory(opts, model := tiny_mim(), memory.Budget(plain.total, "test"))
    assert not roomy.activation_checkpointing and not model.activation_checkpointing
    tight = pretrain.plan_memory(opts, model := tiny_mim(), memory.Budget(plain.total - 1, "test"))
    assert tight.activation_checkpointing and model.activation_checkpointing  # on the CPU too only when needed
    assert tight.to_config()["choices"] == {"activation_checkpointing": True}
    assert tight.to_config()["estimate_bytes"] == checkpointed.total


def test_a_step_that_fits_nowhere_is_refused_with_what_would_fit():
    _, checkpointed = footprints(tiny_mim())
    opts = PretrainOptions(override=TINY["mim"], preset="small", batch_size=4)
    with pytest.raises(BadInputError) as refused:  # room for the activations of about 2 volumes alone
        pretrain.plan_memory(opts, tiny_mim(), memory.Budget(checkpointed.total + checkpointed.activations,
                                                             "test budget"))
    message = str(refused.value)
    assert message.startswith("not enough memory for mim small pre-training at batch 4: one step with activation "
                              "checkpointing needs about ")
    assert "(test budget). --batch-size " in message and " would fit (with --accum 2 " in message
    assert int(message.split("--batch-size ")[1].split()[0]) in (2, 3)  # per volume: less than one volume alone


def test_a_frozen_encoder_has_no_gradients_or_optimiser_state_to_plan_for():
    model = tiny_mim()
    full = footprints(model)[0]
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("decoder"))  # the encoder frozen
    frozen = footprints(model)[0]
    untrained = full.trained - frozen.trained
    assert 0 < frozen.trained < full.trained and full.total - frozen.total >= 3 * untrained


def test_mim_unetr_checkpointed_one_volume_at_a_time_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = build_segmenter("mim-unetr", 3, "small", (64, 64, 64), 1, embed_dims=(6, 12, 24, 48),
                            depths=(1, 1, 1, 1), num_heads=4)
    recomputed = build_segmenter("mim-unetr", 3, "small", (64, 64, 64), 1, embed_dims=(6, 12, 24, 48),
                                 depths=(1, 1, 1, 1), num_heads=4)
    recomputed.load_state_dict(plain.state_dict())
    use_activation_checkpointing(recomputed)
    assert recomputed.state_dict().keys() == plain.state_dict().keys()
    crops = torch.rand(2, 1, 64, 64, 64)
    losses = []
    for model in (plain, recomputed):
        torch.manual_seed(1)  # the same stochastic depth in the encoder
        losses.append(model(crops).float().log_softmax(1)[:, 1].mean())
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1])
    grads = [torch.cat([p.grad.flatten() for p in model.parameters()]) for model in (plain, recomputed)]
    # the same sums in another order (per volume, then over volumes): float rounding only (measured 1.6e-5)
    assert (grads[0] - grads[1]).norm() <= 1e-4 * grads[0].norm()


def test_default_small_fine_tuning_is_planned_within_what_a_6_gb_job_leaves():
    """4 crops of 96³ (issue 17): the full-resolution decoder blocks, recomputed all 4 crops at once, needed 6.0 GB;
    one crop at a time, about 4.1 GB, measured at 3.2 GB of resident memory (mim3d.models.mim_unetr)."""
    opts = FinetuneOptions(arch="mim-unetr", preset="small")
    model = build_segmenter("mim-unetr", 3, "small", opts.roi, 1)
    plan = finetune.plan_memory(opts, model, EncoderMode.of("full", model, "mim-unetr", 10), 3,
                                memory.Budget(int(5.5 * GB), "a 6 GB job"))
    assert plan.activation_checkpointing and model.activation_checkpointing
    assert plan.footprint.total < 4.5 * GB


def test_a_refused_full_fine_tuning_names_the_frozen_encoder_when_that_fits(tmp_path):
    roi, classes = (64, 64, 64), 3

    def checkpointed_step(model):
        return step_footprint(model, (torch.zeros(1, 1, *roi),), lambda out: out.float().log_softmax(1).mean(),
                              criterion_bytes=finetune.CRITERION_COPIES * classes * 64**3 * 4, checkpointing=True)

    full = checkpointed_step(build_segmenter("mim-unetr", classes, "small", roi, 1))
    frozen_model = build_segmenter("mim-unetr", classes, "small", roi, 1)
    EncoderMode.of("frozen", frozen_model, "mim-unetr", 1).apply(frozen_model, 0)
    frozen = checkpointed_step(frozen_model)
    budget = memory.Budget((full.total + frozen.total) // 2, "test")
    for pretrained, hint in ((str(tmp_path / "run"), True), (None, False)):
        opts = FinetuneOptions(arch="mim-unetr", preset="small", roi=roi, samples_per_volume=1, pretrained=pretrained)
        model = build_segmenter("mim-unetr", classes, "small", roi, 1)
        trainable = [p.requires_grad for p in model.parameters()]
        with pytest.raises(BadInputError) as refused:
            finetune.plan_memory(opts, model, EncoderMode.of("full", model, "mim-unetr", 10), classes, budget)
        assert ("--encoder frozen fits" in str(refused.value)) == hint, refused.value
        assert [p.requires_grad for p in model.parameters()] == trainable  # the trace left the model as it was


# ---- real jobs in a real 6 GB memory cgroup ---------------------------------------------------------------------

def in_cgroup(limit: int, argv: list[str], home) -> tuple[int, list[dict]]:
    with memory_cgroup(limit) as procs:
        command = ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", sys.executable, "-m", "mim3d", *argv]
        done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", timeout=1200,
                              env={**__import__("os").environ, "PYTHONUTF8": "1", "MIM3D_HOME": str(home)})
    return done.returncode, [e for e in map(parse_line, done.stdout.splitlines()) if e is not None]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["pretrain", "finetune"])
@pytest.mark.parametrize("preset", ["small", "base"])
def test_default_training_in_a_6_gb_cgroup_is_planned_or_refused_never_killed(command, preset, example_ct_path,
                                                                              example_ct_sm_path, example_seg_path,
                                                                              tmp_path):
    out = tmp_path / "run"
    if command == "pretrain":
        data = tmp_path / "scans"
        data.mkdir()
        (data / "ct.nii.gz").symlink_to(example_ct_path)
        argv = ["pretrain", "--data", str(data)]
    else:
        data = write_cases(tmp_path / "cases", example_ct_sm_path, example_seg_path)
        argv = ["finetune", "--images", str(data / "images"), "--labels", str(data / "labels"), "--label-table",
                str(data / "labels.json"), "--label-map", LABEL_MAP]
    code, events = in_cgroup(6 * GB, [*argv, "--out", str(out), "--preset", preset, "--max-steps", "1"], tmp_path)
    assert code in (EXIT_OK, EXIT_BAD_INPUT), f"exit code {code} (137: killed): {events[-1:]}"
    if code == EXIT_BAD_INPUT:
        message = events[-1]["message"]
        assert message.startswith("not enough memory for ") and " would fit" in message and " limit 6.0 GB)" in message
        assert not out.exists()
        assert preset == "base", message  # the small preset must fit
        return
    plan = json.loads((out / "config.json").read_text())["plan"]
    assert plan["estimate_bytes"] <= plan["budget_bytes"] and "limit 6.0 GB" in plan["budget_source"]
    assert events[-1]["type"] == "result" and events[-1]["step"] == 1


def test_a_plan_check_in_a_small_job_refuses_full_fine_tuning_and_names_the_frozen_encoder(example_ct_sm_path,
                                                                                           example_seg_path, tmp_path):
    """`mim3d finetune --check-plan` of the default small run (4 crops of 96³) in a 4.1 GB job, which leaves about
    3.8 GB once the worker has started (measured 0.3 GB): with checkpointing full needs 4.1 GB, frozen 3.5 GB."""
    data = write_cases(tmp_path / "cases", example_ct_sm_path, example_seg_path)
    (tmp_path / "encoder.pt").write_bytes(b"")  # named, not read: the plan needs no weights
    out = tmp_path / "run"
    argv = ["finetune", "--images", str(data / "images"), "--labels", str(data / "labels"), "--label-table",
            str(data / "labels.json"), "--label-map", LABEL_MAP, "--pretrained", str(tmp_path / "encoder.pt"),
            "--preset", "small", "--out", str(out), "--check-plan"]
    planned = {}
    for mode in ("full", "frozen"):
        code, events = in_cgroup(int(4.1 * GB), [*argv, "--encoder", mode], tmp_path)
        planned[mode] = events[0]
        assert code == (EXIT_BAD_INPUT if mode == "full" else EXIT_OK), events
        assert [e["type"] for e in events] == ["result"] + (["error"] if code else [])
        assert code == 0 or events[1]["message"] == events[0]["description"]  # the refusal, as a run would give it
        assert not out.exists()
    full, frozen = planned["full"], planned["frozen"]
    assert (full["fits"], frozen["fits"]) == (False, True), planned
    assert full["choices"] == frozen["choices"] == {"activation_checkpointing": True}
    assert full["estimate_bytes"] > full["budget_bytes"] >= frozen["estimate_bytes"]
    assert " would fit" in full["would_fit"] and full["would_fit"].endswith(
        "; or, keeping every other option, --encoder frozen fits (the pre-trained encoder stays fixed)")
    assert full["description"].startswith("not enough memory for mim-unetr small fine-tuning on 4 crop(s) of 96×96×96")
    assert "limit 4.1 GB" in full["budget_source"] and frozen["would_fit"] is None
