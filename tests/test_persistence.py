"""save_finetuned / from_finetuned: exact round trips, file contents, hashing, atomic writes,
the one-format rule, strict loading and bad input (each failure leaves the backbone as it
was). Fault injection at every file-system step: test_transactions.py."""
import json
import os
import shutil
import struct
import time
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import opendelta
import tiny_models as tm
from helpers import outputs, perturb
from matrix_cases import TABLE, supported_pairs
from opendelta.io.state import delta_tensors
from opendelta import AdapterModel, AutoDeltaConfig, AutoDeltaModel, LoraModel, get_delta_class
from opendelta.io.hashing import gen_model_hash, gen_parameter_hash
from opendelta.io.files import BackboneHashWarning, CheckpointError

ARCHS = ["bert", "gpt2", "t5", "llama"]
#: hyperparameters that fit the tiny models (hidden 32, 64 positions), from the case table.
TINY_KWARGS = {name: case.kwargs for name, case in TABLE.items()}


def snapshot(model):
    """Names and values of everything in the model's state, to prove it is unchanged."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_unchanged(model, before):
    after = snapshot(model)
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not any(True for _ in opendelta.core.dispatch.iter_delta_layers(model))


def safetensors_layout(path):
    """(header length, total bytes of tensor data) of a safetensors file."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return header_len, data


def delta_class(name):
    """The class of a case-table row (``lora_dora`` is a LoraModel) or of a delta_type."""
    return TABLE[name].cls if name in TABLE else get_delta_class(name)


def tuned(arch, delta_type, task="lm", **kwargs):
    model = tm.build(arch, task)
    delta = delta_class(delta_type)(model, **kwargs)
    delta.freeze_module()
    perturb(delta)
    return model, delta


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("delta_type, arch", supported_pairs(archs=ARCHS))
def test_exact_round_trip_and_file_contents(tmp_path, arch, delta_type):
    model, delta = tuned(arch, delta_type, **TINY_KWARGS.get(delta_type, {}))
    inputs = tm.example_inputs(arch)
    expected = outputs(model, inputs)
    path = delta.save_finetuned(tmp_path / "ckpt")
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]

    # Only this delta's tensors are in the file, under the names they have in the backbone.
    delta_names = sorted(n for n, _ in delta.named_parameters())
    buffers = sorted(f"{prefix}.{n}" for prefix, layer in delta.delta_layers()
                     for n, b in layer.state_dict().items() if not isinstance(b, torch.nn.Parameter)
                     and n not in dict(layer.named_parameters()))
    with safe_open(path + "/model.safetensors", "pt") as f:
        keys = sorted(f.keys())
    assert keys == sorted(delta_names + buffers)
    # ~4 bytes per fp32 parameter plus a small header.
    n_params = sum(p.numel() for _, p in delta.named_parameters())
    header_len, data = safetensors_layout(path + "/model.safetensors")
    n_buffer_bytes = sum(b.numel() * b.element_size() for k, b in delta_tensors(delta).items()
                         if not isinstance(b, torch.nn.Parameter))
    assert data == 4 * n_params + n_buffer_bytes
    assert os.path.getsize(path + "/model.safetensors") == 8 + header_len + data
    assert header_len < 600 + 160 * len(keys)

    fresh = tm.build(arch)
    fresh.train()
    loaded = delta_class(delta_type).from_finetuned(path, fresh)
    assert not fresh.training  # documented: from_finetuned puts the backbone in eval mode
    assert type(loaded) is type(delta)
    assert torch.equal(outputs(fresh, inputs), expected)
    for (n1, p1), (n2, p2) in zip(delta.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)

    # The Auto class gives the same.
    other = tm.build(arch)
    AutoDeltaModel.from_finetuned(path, backbone_model=other)
    assert torch.equal(outputs(other, inputs), expected)


def test_checkpoint_keys_listed(tmp_path):
    """The default LoRA on BERT: exactly its A and B matrices, nothing of the backbone."""
    _, delta = tuned("bert", "lora")
    path = delta.save_finetuned(tmp_path / "ckpt")
    with safe_open(path + "/model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    expected = {}
    for layer in (0, 1):
        for proj in ("query", "value"):
            prefix = f"bert.encoder.layer.{layer}.attention.self.{proj}.lora"
            expected[f"{prefix}.lora_A"] = (8, tm.HIDDEN)
            expected[f"{prefix}.lora_B"] = (tm.HIDDEN, 8)
    assert shapes == expected
    # 8 tensors of 8 x 32 fp32 = 8192 bytes of data, and a header of < 1 KB.
    header_len, data = safetensors_layout(path + "/model.safetensors")
    assert data == 8192 and header_len < 1024


def test_config_json_holds_everything_needed(tmp_path):
    model, delta = tuned("bert", "lora", lora_r=4, lora_alpha=32, modified_modules=["query", "value"])
    path = delta.save_finetuned(tmp_path / "ckpt")
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["delta_type"] == "lora"
    assert (config["lora_r"], config["lora_alpha"], config["lora_dropout"]) == (4, 32, 0.0)
    assert config["modified_modules"] == ["query", "value"]
    assert config["exclude_modules"] == [] and config["unfrozen_modules"] == ["deltas"]
    assert config["backbone_class"] == "BertForMaskedLM"
    assert "backbone_checkpoint_name" in config
    assert config["backbone_hash"] == gen_model_hash(model)
    assert config["backbone_hash"].startswith("sha256:") and len(config["backbone_hash"]) == 7 + 32
    assert config["opendelta_version"] == opendelta.__version__
    assert config["torch_version"] == torch.__version__.split("+")[0]
    assert config["transformers_version"] and config["safetensors_version"]
    # AutoDeltaConfig reads it back.
    cfg = AutoDeltaConfig.from_finetuned(path)
    assert type(cfg).__name__ == "LoraConfig" and cfg.lora_r == 4 and cfg.lora_alpha == 32
    assert AutoDeltaConfig.from_finetuned(path, lora_r=2).lora_r == 2


def test_second_lora_on_one_backbone_saves_canonical_names(tmp_path):
    """A LoRA living under ``lora_1`` is saved as ``lora`` and loads on any backbone."""
    model = tm.build("bert")
    inputs = tm.example_inputs("bert")
    first = LoraModel(model)
    second = LoraModel(model, modified_modules=["query"])
    assert second.layer_attr == "lora_1"
    perturb(first, seed=1)
    perturb(second, seed=2)
    first.detach()
    expected = outputs(model, inputs)  # the second LoRA alone
    path = second.save_finetuned(tmp_path / "second")
    with safe_open(path + "/model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(".query.lora.lora_" in k for k in keys)

    fresh = tm.build("bert")
    LoraModel.from_finetuned(path, fresh)
    assert torch.equal(outputs(fresh, inputs), expected)

    # Onto a backbone that already hosts a LoRA: the names are mapped back to lora_1.
    crowded = tm.build("bert")
    resident = LoraModel(crowded)
    loaded = LoraModel.from_finetuned(path, crowded)
    assert loaded.layer_attr == "lora_1"
    resident.detach()
    assert torch.equal(outputs(crowded, inputs), expected)


def test_unfrozen_head_is_saved_and_hash_check_passes(tmp_path):
    model = tm.build("bert", "cls")
    inputs = tm.example_inputs("bert", "cls")
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "classifier"])
    perturb(delta)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
    expected = outputs(model, inputs)
    path = delta.save_finetuned(tmp_path / "ckpt")
    with safe_open(path + "/model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"classifier.weight", "classifier.bias"} <= keys
    assert keys - {"classifier.weight", "classifier.bias"} == {n for n, _ in delta.named_parameters()}

    assert json.load(open(os.path.join(path, "config.json")))["unfrozen_modules"] == ["deltas", "classifier"]

    fresh = tm.build("bert", "cls")  # its classifier differs: the checkpoint restores it
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackboneHashWarning)
        loaded = LoraModel.from_finetuned(path, fresh)
    assert torch.equal(outputs(fresh, inputs), expected)
    loaded.freeze_module()  # to train on: the head is trainable again, as when it was saved
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_unfrozen_backbone_is_not_saved_whole(tmp_path):
    model = tm.build("bert")
    delta = LoraModel(model)  # freeze_module never called: everything requires grad
    path = delta.save_finetuned(tmp_path / "ckpt")
    with safe_open(path + "/model.safetensors", "pt") as f:
        assert set(f.keys()) == {n for n, _ in delta.named_parameters()}


def test_plain_pytorch_state_dict_path_is_exact(tmp_path):
    model = tm.build("gpt2")
    inputs = tm.example_inputs("gpt2")
    delta = AdapterModel(model)
    delta.freeze_module(set_state_dict=True)
    perturb(delta)
    expected = outputs(model, inputs)
    state = model.state_dict()
    assert set(state) == {n for n, _ in delta.named_parameters()}
    torch.save(state, tmp_path / "delta.pt")

    fresh = tm.build("gpt2")
    AdapterModel(fresh)
    result = fresh.load_state_dict(torch.load(tmp_path / "delta.pt", weights_only=True), strict=False)
    assert result.unexpected_keys == []
    assert torch.equal(outputs(fresh, inputs), expected)


def test_load_onto_backbone_dtype_and_save_checkpoint_helpers(tmp_path):
    model, delta = tuned("llama", "lora")
    path = delta.save_finetuned(tmp_path / "ckpt")
    half = tm.build("llama").to(torch.bfloat16)
    loaded = LoraModel.from_finetuned(path, half, check_hash=False)
    assert {p.dtype for _, p in loaded.named_parameters()} == {torch.bfloat16}
    for (_, p), (_, q) in zip(delta.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p.to(torch.bfloat16), q)

    # Lower-level helpers: weights only, into an existing delta.
    file = delta.save_checkpoint(tmp_path / "weights.safetensors")
    target = LoraModel(tm.build("llama"))
    target.load_checkpoint(file)
    for (_, p), (_, q) in zip(delta.named_parameters(), target.named_parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------ hashing
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_model_hash_dtypes_and_detach_independence(dtype):
    model = tm.build("bert").to(dtype)
    h = gen_model_hash(model)
    assert h == gen_model_hash(tm.build("bert").to(dtype))
    delta = LoraModel(model)
    perturb(delta)
    assert gen_model_hash(model) == h  # deltas are not part of the backbone's hash
    delta.detach()
    assert gen_model_hash(model) == h
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[0, 0] += 1
    assert gen_model_hash(model) != h
    assert gen_model_hash(model, with_parameters=False) == gen_model_hash(tm.build("bert").to(dtype),
                                                                          with_parameters=False)
    assert gen_parameter_hash([torch.ones(3, dtype=dtype)]) != gen_parameter_hash([torch.zeros(3, dtype=dtype)])


def test_model_hash_on_meta_device_is_structural():
    with torch.device("meta"):
        meta = tm.build("bert")
    real = tm.build("bert")
    assert gen_model_hash(meta) == gen_model_hash(meta, with_parameters=False) \
        == gen_model_hash(real, with_parameters=False)
    assert gen_model_hash(real) != gen_model_hash(real, with_parameters=False)


def test_model_hash_is_fast_on_large_parameters():
    big = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(12)])  # 50M params, 200 MB
    start = time.perf_counter()
    gen_model_hash(big)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"hashing 200 MB took {elapsed:.2f} s"


def test_hash_mismatch_warns_silences_or_raises(tmp_path):
    model, delta = tuned("bert", "lora")
    path = delta.save_finetuned(tmp_path / "ckpt")
    saved = json.load(open(os.path.join(path, "config.json")))["backbone_hash"]

    def changed_backbone():
        m = tm.build("bert")
        with torch.no_grad():
            m.bert.embeddings.word_embeddings.weight[1, 1] += 1
        return m

    other = changed_backbone()
    with pytest.warns(BackboneHashWarning) as record:
        LoraModel.from_finetuned(path, other)
    message = str(record[0].message)
    assert saved in message and gen_model_hash(other) in message and "check_hash=False" in message

    with warnings.catch_warnings():
        warnings.simplefilter("error", BackboneHashWarning)
        LoraModel.from_finetuned(path, changed_backbone(), check_hash=False)

    strict = changed_backbone()
    before = snapshot(strict)
    with pytest.raises(CheckpointError, match="parameters differ"):
        LoraModel.from_finetuned(path, strict, strict_hash=True)
    assert_unchanged(strict, before)


# ------------------------------------------------------------------------------ atomic writes
def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, delta = tuned("bert", "lora")
    inputs = tm.example_inputs("bert")
    expected = outputs(model, inputs)
    path = delta.save_finetuned(tmp_path / "ckpt")
    files_before = {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)}

    import safetensors.torch as st

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)  # a partial write, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", crash)
    perturb(delta, seed=5)
    with pytest.raises(KeyboardInterrupt):
        delta.save_finetuned(path)
    with pytest.raises(KeyboardInterrupt):
        delta.save_finetuned(tmp_path / "new")
    monkeypatch.undo()

    assert {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)} == files_before
    assert not os.path.exists(tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary left behind
    fresh = tm.build("bert")
    LoraModel.from_finetuned(path, fresh)
    assert torch.equal(outputs(fresh, inputs), expected)


def test_weights_and_config_from_two_saves_are_refused(tmp_path):
    _, delta = tuned("bert", "lora")
    a = delta.save_finetuned(tmp_path / "a")
    perturb(delta, seed=3)
    b = delta.save_finetuned(tmp_path / "b")
    shutil.copy(os.path.join(b, "model.safetensors"), os.path.join(a, "model.safetensors"))
    fresh = tm.build("bert")
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match="two different saves"):
        LoraModel.from_finetuned(a, fresh)
    assert_unchanged(fresh, before)


def test_save_overwrites_in_place_and_keeps_other_files(tmp_path):
    model, delta = tuned("bert", "lora")
    inputs = tm.example_inputs("bert")
    path = delta.save_finetuned(tmp_path / "ckpt")
    open(os.path.join(path, "README.md"), "w").write("notes")
    perturb(delta, seed=9)
    expected = outputs(model, inputs)
    delta.save_finetuned(path)
    assert sorted(os.listdir(path)) == ["README.md", "config.json", "model.safetensors"]
    fresh = tm.build("bert")
    LoraModel.from_finetuned(path, fresh)
    assert torch.equal(outputs(fresh, inputs), expected)


# ------------------------------------------------------------------------------ bad input
@pytest.fixture
def saved(tmp_path):
    _, delta = tuned("bert", "lora")
    return delta.save_finetuned(tmp_path / "ckpt")


def _expect_failure(path, match, loader=AutoDeltaModel.from_finetuned, arch="bert"):
    backbone = tm.build(arch)
    before = snapshot(backbone)
    with pytest.raises(CheckpointError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore", BackboneHashWarning)  # another architecture also warns
        loader(path, backbone)
    assert_unchanged(backbone, before)


def test_missing_config(saved):
    os.remove(os.path.join(saved, "config.json"))
    _expect_failure(saved, r"config\.json is missing")


def test_missing_weights(saved):
    os.remove(os.path.join(saved, "model.safetensors"))
    _expect_failure(saved, r"model\.safetensors is missing")


def test_truncated_weights(saved):
    file = os.path.join(saved, "model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])
    _expect_failure(saved, r"model\.safetensors is not a valid safetensors file .*truncated or corrupt")


def test_corrupt_weights(saved):
    file = os.path.join(saved, "model.safetensors")
    open(file, "wb").write(os.urandom(64))
    _expect_failure(saved, r"model\.safetensors is not a valid safetensors file")


def test_corrupt_config(saved):
    open(os.path.join(saved, "config.json"), "w").write("{not json")
    _expect_failure(saved, r"config\.json is not valid JSON")


def test_unknown_delta_type(saved):
    file = os.path.join(saved, "config.json")
    config = json.load(open(file))
    config["delta_type"] = "telepathy"
    json.dump(config, open(file, "w"))
    _expect_failure(saved, r"config\.json: unknown delta_type 'telepathy'; known delta types: .*lora")


def test_checkpoint_of_another_architecture(tmp_path):
    _, delta = tuned("gpt2", "lora")
    path = delta.save_finetuned(tmp_path / "gpt2")
    with pytest.raises(CheckpointError), pytest.warns(BackboneHashWarning, match="structure"):
        AutoDeltaModel.from_finetuned(path, tm.build("bert"))
    _expect_failure(path, r"made for a GPT2LMHeadModel, this backbone is a BertForMaskedLM")
    _, explicit = tuned("gpt2", "lora", modified_modules=["c_attn"])
    path = explicit.save_finetuned(tmp_path / "gpt2-explicit")
    _expect_failure(path, r"made for a GPT2LMHeadModel, this backbone is a BertForMaskedLM")


def test_path_that_is_neither_directory_nor_hub_id(tmp_path, saved):
    _expect_failure(str(tmp_path / "no" / "such" / "dir"),
                    "neither an existing directory nor a Hugging Face Hub repo id")
    _expect_failure(os.path.join(saved, "config.json"), "is a file; pass the checkpoint directory")


def test_strict_keys_and_shapes(saved):
    file = os.path.join(saved, "model.safetensors")
    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    first = sorted(tensors)[0]

    missing = {k: v for k, v in tensors.items() if k != first}
    save_file(missing, file, metadata=metadata)
    _expect_failure(saved, r"missing delta tensors " + first.replace(".", r"\."))

    save_file({**tensors, "bert.encoder.layer.0.foo.lora.lora_A": torch.zeros(2)}, file, metadata=metadata)
    _expect_failure(saved, r"unexpected keys .*bert\.encoder\.layer\.0\.foo\.lora\.lora_A")

    save_file({**tensors, first: torch.zeros(3, 3)}, file, metadata=metadata)
    _expect_failure(saved, r"shape mismatch for .*checkpoint \(3, 3\)")


def test_checkpoint_of_another_delta_type(saved):
    _expect_failure(saved, r"holds a 'lora' delta, not a 'adapter' one", loader=AdapterModel.from_finetuned)


def test_save_finetuned_argument_errors(tmp_path):
    _, delta = tuned("bert", "lora")
    with pytest.raises(ValueError, match="repo_id"):
        delta.save_finetuned(tmp_path / "x", push_to_hub=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        delta.save_finetuned(tmp_path / "x", bogus=1)
    with pytest.raises(TypeError, match="save_function must be callable"):
        delta.save_finetuned(tmp_path / "x", save_function="torch.save")
    open(tmp_path / "file", "w").write("")
    with pytest.raises(CheckpointError, match="is a file"):
        delta.save_finetuned(tmp_path / "file")
    with pytest.raises(ValueError, match="DeltaCenter no longer exists.*push_to_hub=True"):
        delta.save_finetuned(tmp_path / "y", push_to_dc=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_save_function_writes_the_original_format(tmp_path):
    """save_function=torch.save (the original's default) writes pytorch_model.bin, which loads."""
    model, delta = tuned("bert", "lora")
    inputs = tm.example_inputs("bert")
    expected = outputs(model, inputs)
    path = delta.save_finetuned(tmp_path / "ckpt", save_function=torch.save)
    assert sorted(os.listdir(path)) == ["config.json", "pytorch_model.bin"]
    fresh = tm.build("bert", "lm")
    AutoDeltaModel.from_finetuned(path, fresh)
    assert torch.equal(outputs(fresh, inputs), expected)
    assert delta.create_default_name(model_path_public_name="bert-base", dataset="sst2") == "bert-base_lora_sst2"
    args = delta.create_delta_center_args({"train_tasks": "sst2"}, {"dataset_name": "glue", "train_tasks": "x"})
    assert args["train_tasks"] == "sst2" and args["train_datasets"] == "glue" and args["delta_type"] == "lora"


# ------------------------------------------------------------------------------ one format per directory
def test_a_save_replaces_every_checkpoint_file_of_the_directory(tmp_path):
    """The documented rule: whatever format a save writes, the checkpoint files of the other
    formats go, so a stale checkpoint can never be loaded; other files stay."""
    model, delta = tuned("bert", "lora")
    inputs = tm.example_inputs("bert")
    path = delta.save_finetuned(tmp_path / "ckpt", save_function=torch.save)
    open(os.path.join(path, "notes.txt"), "w").write("kept")
    perturb(delta, seed=4)
    expected = outputs(model, inputs)
    delta.save_finetuned(path)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "notes.txt"]
    fresh = tm.build("bert", "lm")
    LoraModel.from_finetuned(path, fresh)
    assert torch.equal(outputs(fresh, inputs), expected)
    # The low-level helper follows the same rule: weights only, the config goes with the rest.
    weights = delta.save_checkpoint(path)
    assert weights == os.path.join(path, "model.safetensors")
    assert sorted(os.listdir(path)) == ["model.safetensors", "notes.txt"]
    fresh = tm.build("bert", "lm")
    again = LoraModel(fresh)
    again.load_checkpoint(path)
    assert torch.equal(outputs(fresh, inputs), expected)


def test_two_weight_files_in_one_directory_are_refused(tmp_path):
    """Written by hand (or by an old version that replaced files one by one): which is
    current cannot be told, so nothing is loaded."""
    _, delta = tuned("bert", "lora")
    path = delta.save_finetuned(tmp_path / "ckpt")
    torch.save(delta.checkpoint_state_dict(), os.path.join(path, "pytorch_model.bin"))
    fresh = tm.build("bert", "lm")
    before = snapshot(fresh)
    message = r"holds checkpoints of 2 formats .*model.safetensors.*pytorch_model.bin"
    with pytest.raises(CheckpointError, match=message):
        LoraModel.from_finetuned(path, fresh)
    with pytest.raises(CheckpointError, match=message):
        delta.load_checkpoint(path)
    assert_unchanged(fresh, before)
