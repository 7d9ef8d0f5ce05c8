"""The rule of issue 13 at every public entry point: a failed call changes nothing.

Each case makes one public call fail (DeltaBase, SaveLoadMixin, MergeMixin, opendelta.route,
load_peft_lora, save_peft_lora) and asserts the exception type and message, then that the
backbone (parameters, buffers, requires_grad flags, hooks, state_dict keys, module tree),
every delta's state (attached, merged, layers, values) and the checkpoint directory (its
files and its parent's entries) are exactly as before.
"""
import os

import pytest
import torch

import opendelta
import tiny_models as tm
from helpers import outputs, perturb
from invariants import assert_same, delta_state, directory_state, model_state
from opendelta import (AdapterModel, AutoDeltaModel, CheckpointError, LoraModel, load_peft_lora,
                       save_peft_lora)
from opendelta.core.dispatch import ROUTING_SWITCH, current_routing


@pytest.fixture
def world(tmp_path):
    """A BERT with a merged LoRA ("lora"), an attached Adapter ("adapter"), a frozen backbone
    and a saved checkpoint of the LoRA."""
    model = tm.build("bert", "lm")
    lora = LoraModel(model, modified_modules=["query", "value"])
    adapter = AdapterModel(model, modified_modules=["output.dense"], name="adapter")
    perturb(lora, std=0.3, seed=1)
    perturb(adapter, std=0.3, seed=2)
    lora.freeze_module(exclude=["deltas"])
    path = lora.save_finetuned(tmp_path / "ckpt")
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write("notes")
    lora.merge()
    return {"model": model, "lora": lora, "adapter": adapter, "path": path, "tmp": tmp_path}


def _wrong_shapes(delta):
    return {k: v[..., :1].clone() for k, v in delta.state_dict().items()}


def _bad_route_rows(w):
    with opendelta.route(["adapter"] * 3):  # the batch has 2 rows
        outputs(w["model"], tm.example_inputs("bert"))


CASES = {
    "constructor: key matching nothing": (ValueError, r"modified_modules entry 'nowhere' matches no module",
                                          lambda w: LoraModel(w["model"], modified_modules=["nowhere"])),
    "constructor: impossible hyperparameter": (ValueError, r"lora_r must be a positive integer",
                                               lambda w: LoraModel(w["model"], lora_r=0)),
    "freeze_module: typo": (ValueError, r"\['clasifier'\] match no module",
                            lambda w: w["lora"].freeze_module(exclude=["deltas", "clasifier"])),
    "detach: another module": (ValueError, r"built on another module",
                               lambda w: w["lora"].detach(tm.build("bert", "lm"))),
    "attach: another module": (ValueError, r"built on another module",
                               lambda w: w["lora"].attach(tm.build("bert", "lm"))),
    "merge: not mergeable": (TypeError, r"AdapterLayer .* not a linear re-parameterisation",
                             lambda w: w["adapter"].merge()),
    "merge_and_detach: not mergeable": (TypeError, r"cannot be merged", lambda w: w["adapter"].merge_and_detach()),
    "load_state_dict: wrong shapes": (RuntimeError, r"size mismatch .*Nothing was loaded",
                                      lambda w: w["lora"].load_state_dict(_wrong_shapes(w["lora"]))),
    "load_state_dict: unexpected key": (RuntimeError, r"unexpected key\(s\) \['nope'\]",
                                        lambda w: w["lora"].load_state_dict({**w["lora"].state_dict(),
                                                                             "nope": torch.zeros(1)})),
    "load_delta_state_dict: unexpected key": (CheckpointError, r"unexpected keys .*nope",
                                              lambda w: w["lora"].load_delta_state_dict(
                                                  {**w["lora"].checkpoint_state_dict(), "nope": torch.zeros(1)})),
    "load_checkpoint: missing directory": (CheckpointError, r"absent is missing",
                                           lambda w: w["lora"].load_checkpoint(w["tmp"] / "absent")),
    "load_checkpoint: another delta's": (CheckpointError, r"does not fit this AdapterModel",
                                         lambda w: w["adapter"].load_checkpoint(w["path"])),
    "save_finetuned: push_to_dc": (ValueError, r"DeltaCenter no longer exists",
                                   lambda w: w["lora"].save_finetuned(w["path"], push_to_dc=True)),
    "save_finetuned: into a file": (CheckpointError, r"it is a file",
                                    lambda w: w["lora"].save_finetuned(os.path.join(w["path"], "README.md"))),
    "save_finetuned: writer fails": (OSError, r"injected",
                                     lambda w: w["lora"].save_finetuned(w["path"], save_function=_failing_save)),
    "from_finetuned: another architecture": (CheckpointError, r"cannot rebuild the lora delta on GPT2LMHeadModel",
                                             lambda w: LoraModel.from_finetuned(w["path"], w["gpt2"],
                                                                                check_hash=False)),
    "from_finetuned: another delta type": (CheckpointError, r"holds a 'lora' delta, not a 'adapter' one",
                                           lambda w: AdapterModel.from_finetuned(w["path"], w["model"])),
    "route: unknown name": (ValueError, r"route names \['zzz'\] match no delta attached",
                            lambda w: opendelta.route(["zzz"], w["model"]).__enter__()),
    "route: rows that do not fit": (ValueError, r"rows|batch", _bad_route_rows),
    "save_peft_lora: not LoRA": (TypeError, r"only LoRA, IA3 and parameter LoRA deltas have a PEFT format; "
                                            r"this is a .adapter. delta",
                                 lambda w: save_peft_lora(w["adapter"], w["path"])),
    "load_peft_lora: not an adapter": (CheckpointError, r"adapter_config.json is missing",
                                       lambda w: load_peft_lora(w["path"], w["model"])),
    "AutoDeltaModel.from_finetuned: two formats": (CheckpointError, r"holds checkpoints of 2 formats",
                                                   lambda w: AutoDeltaModel.from_finetuned(w["mixed"], w["model"])),
}


def _failing_save(obj, path):
    with open(path, "wb") as f:
        f.write(b"\x00" * 7)
    raise OSError(5, "I/O error injected")


@pytest.mark.parametrize("case", list(CASES))
def test_a_failed_public_call_changes_nothing(world, case):
    error, message, call = CASES[case]
    w = world
    w["gpt2"] = tm.build("gpt2", "lm")
    mixed = w["mixed"] = os.path.join(w["tmp"], "mixed")
    os.makedirs(mixed, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        with open(os.path.join(w["path"], name), "rb") as src, open(os.path.join(mixed, name), "wb") as dst:
            dst.write(src.read())
    with open(os.path.join(mixed, "adapter_config.json"), "w") as f:
        f.write('{"peft_type": "LORA", "r": 2}')
    inputs = tm.example_inputs("bert")
    before = {"backbone": model_state(w["model"]), "lora": delta_state(w["lora"]),
              "adapter": delta_state(w["adapter"]), "directory": directory_state(w["path"]),
              "gpt2": model_state(w["gpt2"]), "mixed": directory_state(mixed)}
    expected = outputs(w["model"], inputs)
    with pytest.raises(error, match=message):
        call(w)
    after = {"backbone": model_state(w["model"]), "lora": delta_state(w["lora"]),
             "adapter": delta_state(w["adapter"]), "directory": directory_state(w["path"]),
             "gpt2": model_state(w["gpt2"]), "mixed": directory_state(mixed)}
    for key in before:
        assert_same(before[key], after[key], f"{key} after '{case}'")
    assert ROUTING_SWITCH.open_blocks == 0 and current_routing() is None
    assert torch.equal(outputs(w["model"], inputs), expected)
