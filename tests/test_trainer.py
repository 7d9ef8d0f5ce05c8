"""An unchanged ``transformers.Trainer`` on a tiny delta model (CPU, a few steps)."""
from __future__ import annotations

import json
import os

import pytest
import torch

import tiny_models
from helpers import outputs
from opendelta import LoraModel

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from opendelta.integrations.hf_trainer import DeltaTrainerCallback, allow_partial_loading  # noqa: E402

STEPS, SAVE_EVERY = 6, 3
HEAD = {"classifier.weight", "classifier.bias"}


def _dataset():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, tiny_models.VOCAB, (8,), generator=g),
             "labels": torch.tensor(i % 3)} for i in range(32)]


def _model(delta_seed: int = 0):
    model = tiny_models.build("bert", "cls")  # same backbone every time, as a pretrained one
    torch.manual_seed(delta_seed)  # ... but a differently initialised delta per seed
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=4)
    delta.freeze_module(exclude=["deltas", "classifier"])
    return model, delta


def _trainer(model, out_dir, callbacks=()):
    args = TrainingArguments(str(out_dir), use_cpu=True, max_steps=STEPS, save_steps=SAVE_EVERY,
                             save_strategy="steps", per_device_train_batch_size=4, learning_rate=1e-2,
                             logging_steps=1, report_to=[], disable_tqdm=True, seed=0)
    return Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=list(callbacks))


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_unchanged_trainer_writes_delta_only_checkpoints_and_resumes(tmp_path):
    model, delta = _model()
    before = _trainable(model)
    trainer = _trainer(model, tmp_path / "run")
    trainer.train()
    assert trainer.state.global_step == STEPS
    trained = _trainable(model)
    assert all(not torch.equal(before[n], trained[n]) for n in trained), "every trainable tensor moved"

    delta_names = {n for n, _ in delta.named_parameters()}
    for step in (SAVE_EVERY, STEPS):
        keys = set(load_file(str(tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors")))
        assert keys == delta_names | HEAD  # no frozen backbone tensor

    # Resume on a fresh copy (differently initialised delta): the checkpoint's delta, head,
    # optimizer, scheduler and step are restored, so training ends where the full run did.
    fresh, _ = _model(delta_seed=1)
    resumed = _trainer(fresh, tmp_path / "run")
    result = resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{SAVE_EVERY}"))
    assert result.global_step == STEPS
    # The history up to the checkpoint is restored and steps 4..6 reproduce the full run's.
    def losses(t):
        return [(e["step"], e["loss"]) for e in t.state.log_history if "loss" in e]
    assert losses(resumed) == losses(trainer)
    assert [step for step, _ in losses(resumed)] == list(range(1, STEPS + 1))
    got = _trainable(fresh)
    for name in trained:
        torch.testing.assert_close(got[name], trained[name], atol=1e-6, rtol=1e-5)
    # AdamW moments were restored, not restarted: they hold SAVE_EVERY + 3 steps of history.
    states = resumed.optimizer.state.values()
    assert states and all(int(s["step"]) == STEPS for s in states)


def test_callback_saves_finetuned_and_makes_resume_quiet(tmp_path):
    model, delta = _model()
    delta.freeze_module(exclude=["deltas", "classifier"], set_state_dict=False)
    assert len(model.state_dict()) > 20  # the whole model, before the callback
    callback = DeltaTrainerCallback(delta, save_with_checkpoints=True)
    assert set(model.state_dict()) == {n for n, _ in delta.named_parameters()} | HEAD
    trainer = _trainer(model, tmp_path / "run", [callback])
    trainer.train()

    # save_finetuned at the end and next to each checkpoint: loadable onto a fresh backbone.
    inputs = tiny_models.example_inputs("bert", "cls")
    for path in (tmp_path / "run" / "delta", tmp_path / "run" / f"checkpoint-{STEPS}" / "delta"):
        fresh = tiny_models.build("bert", "cls")
        LoraModel.from_finetuned(str(path), fresh)
        torch.testing.assert_close(outputs(fresh, inputs), outputs(model.eval(), inputs), atol=0, rtol=0)
    with open(tmp_path / "run" / "delta" / "config.json") as f:
        assert json.load(f)["delta_type"] == "lora"

    # Loading a trainable-only state dict reports no frozen tensor as missing.
    fresh, _ = _model(delta_seed=1)
    allow_partial_loading(fresh)
    partial = load_file(str(tmp_path / "run" / f"checkpoint-{STEPS}" / "model.safetensors"))
    assert fresh.load_state_dict(partial, strict=False).missing_keys == []
    del partial["classifier.bias"]  # a trainable tensor missing still is reported
    assert fresh.load_state_dict(partial, strict=False).missing_keys == ["classifier.bias"]


def test_checkpoint_deltas_go_where_trainer_wrote_its_checkpoint_or_nowhere(tmp_path):
    from transformers import TrainerControl, TrainerState

    model, delta = _model()
    callback = DeltaTrainerCallback(delta, save_at_end=False, save_with_checkpoints=True)
    args = _trainer(model, tmp_path / "run").args
    state = TrainerState(global_step=SAVE_EVERY)
    # No checkpoint-3 written (a Trainer naming its checkpoints differently): a clear error,
    # and no stray delta directory.
    with pytest.raises(RuntimeError, match=f"Trainer wrote no .*checkpoint-{SAVE_EVERY}"):
        callback.on_save(args, state, TrainerControl())
    assert not (tmp_path / "run" / f"checkpoint-{SAVE_EVERY}").exists()
    (tmp_path / "run" / f"checkpoint-{SAVE_EVERY}").mkdir(parents=True)
    callback.on_save(args, state, TrainerControl())
    assert (tmp_path / "run" / f"checkpoint-{SAVE_EVERY}" / "delta" / "config.json").is_file()


def test_callback_refuses_unfrozen_backbone():
    model = tiny_models.build("bert", "cls")
    delta = LoraModel(model, modified_modules=["query"])
    with pytest.raises(ValueError, match="freeze_module"):
        DeltaTrainerCallback(delta)


@pytest.mark.slow
def test_trainer_example_runs(tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "examples/trainer_lora.py", "--steps", "4", "--output-dir",
                           str(tmp_path)], cwd=repo, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4", "delta"]
    keys = set(load_file(str(tmp_path / "checkpoint-4" / "model.safetensors")))
    assert keys and all(".lora." in k or k.startswith("classifier.") for k in keys)
    assert set(load_file(str(tmp_path / "delta" / "model.safetensors"))) == keys
