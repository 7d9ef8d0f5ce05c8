"""Documented behaviours of the OpenDelta manual: utils modules, config persistence, common
structure names of the layer stacks (1.16.2) and ``dummy_inputs`` (FAQ 3)."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from torch import nn

import tiny_models as tm
from opendelta import AdapterModel, AutoDeltaConfig, BaseDeltaConfig, CommonStructureMap, LoraModel
from opendelta.core.shapes import probe_sizes
from opendelta.core.structure import container_names
from opendelta.core.structure_maps import COMMON_STRUCTURES
from opendelta.methods.adapter import AdapterConfig
from opendelta.methods.lora import LoraConfig
from opendelta.utils.model_md5 import gen_model_hash, gen_parameter_hash
from opendelta.utils.name_based_addressing import substring_in, substring_in_normal, substring_in_regex
from opendelta.utils.signature import get_arg_names, get_arg_names_inside_func, signature


class MyConfig(BaseDeltaConfig):
    """A user's config written the way the manual documents it."""

    def __init__(self, my_rank=4, my_scale=1.0, *, my_tag="x", **kwargs):
        super().__init__(**kwargs)
        for arg_name in get_arg_names_inside_func(self.__init__):
            if not hasattr(self, arg_name):
                setattr(self, arg_name, locals()[arg_name])


class MyWiderConfig(MyConfig):
    """A subclass of it, in the same style: the parent's loop still finds its own names."""

    def __init__(self, my_width=16, **kwargs):
        super().__init__(**kwargs)
        for arg_name in get_arg_names_inside_func(self.__init__):
            if not hasattr(self, arg_name):
                setattr(self, arg_name, locals()[arg_name])


# ---------------------------------------------------------------------------- utils
def test_signature_helpers():
    def f(self, a, b=2, *rest, c=3, **more):
        pass

    sig = signature(f)
    assert sig == (["self", "a", "b"], [2], "rest", "more")
    assert (sig.args, sig.defaults, sig.varargs, sig.keywords) == (["self", "a", "b"], [2], "rest", "more")
    assert signature(lambda: None) == ([], None, None, None)
    assert get_arg_names(f) == ["a", "b"]
    assert get_arg_names(LoraConfig.__init__)[:2] == ["modified_modules", "exclude_modules"]
    assert get_arg_names_inside_func(f) == ("a", "b", "c")
    assert get_arg_names_inside_func(MyConfig().__init__) == ("my_rank", "my_scale", "my_tag")
    with pytest.raises(TypeError, match="Python function"):
        get_arg_names_inside_func(len)
    with pytest.raises(TypeError, match="callable"):
        signature(3)


def test_model_md5_is_the_io_hash_with_the_documented_arguments():
    from opendelta.io import hashing

    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    assert gen_model_hash is hashing.gen_model_hash
    assert gen_model_hash(model, with_parameters=True) != gen_model_hash(model, with_parameters=False)
    hasher = gen_parameter_hash(model.parameters())
    assert isinstance(hasher, type(hashlib.sha256()))  # the hash object, as documented
    assert "sha256:" + hasher.hexdigest()[:32] == hashing.gen_parameter_hash(list(model.parameters()))
    md5 = hashlib.md5(b"structure")
    assert gen_parameter_hash(model.parameters(), md5=md5) is md5
    expected = hashlib.md5(b"structure")
    hashing.gen_parameter_hash(list(model.parameters()), expected)
    assert md5.hexdigest() == expected.hexdigest() != hashlib.md5(b"structure").hexdigest()
    with torch.no_grad():
        model[0].weight[0, 0] += 1
    assert gen_parameter_hash(model.parameters()).hexdigest() != hasher.hexdigest()
    with pytest.raises(TypeError, match="hashlib object"):
        gen_parameter_hash(model.parameters(), md5="md5")


def test_saving_loading_utils_is_the_mixin_of_every_delta():
    from opendelta.io.checkpoint import SaveLoadMixin as Mixin
    from opendelta.utils.saving_loading_utils import SaveLoadMixin

    assert SaveLoadMixin is Mixin and issubclass(LoraModel, SaveLoadMixin)


def test_substring_helpers_match_whole_segments():
    name = "encoder.layer.10.attention.self.query"
    assert substring_in_normal(name, ["layer.10"]) and substring_in_normal(name, ["self"])
    assert not substring_in_normal(name, ["layer.1"]) and not substring_in_normal(name, ["ttention"])
    assert substring_in_regex(name, [r"layer\.1\d"]) and substring_in_regex(name, ["[r]attention\\.s.*"])
    assert not substring_in_regex(name, [r"ayer\.10"]) and not substring_in_regex(name, [r"layer\.1"])
    assert substring_in(name, ["nothing", r"[r]\d+\.attention"]) and not substring_in(name, ["att"])


# ------------------------------------------------------------------ config persistence
def test_builtin_config_round_trips_through_a_directory_and_the_file(tmp_path):
    config = AdapterConfig(bottleneck_dim=12, non_linearity="relu", modified_modules=["attn.proj"])
    path = config.save_finetuned(tmp_path / "cfg")
    assert path == os.path.join(tmp_path, "cfg", "config.json")
    data = json.loads(open(path).read())
    assert (data["delta_type"], data["bottleneck_dim"], data["non_linearity"]) == ("adapter", 12, "relu")
    assert os.listdir(tmp_path / "cfg") == ["config.json"]  # no temporary file left
    for source in (tmp_path / "cfg", path):  # a directory, or the JSON file itself
        loaded = AdapterConfig.from_finetuned(source)
        assert type(loaded) is AdapterConfig and loaded == config
        assert BaseDeltaConfig.from_finetuned(source).delta_type == "adapter"
    loaded = AdapterConfig.from_finetuned(path, bottleneck_dim=8)
    assert loaded.bottleneck_dim == 8 and loaded.non_linearity == "relu"
    with pytest.raises(ValueError, match="describes a 'adapter' delta, not a 'lora' one"):
        LoraConfig.from_finetuned(path)


def test_auto_config_reads_the_json_file_too(tmp_path):
    path = LoraConfig(lora_r=5).save_finetuned(tmp_path)
    for source in (tmp_path, path):
        config = AutoDeltaConfig.from_finetuned(source)
        assert isinstance(config, LoraConfig) and config.lora_r == 5


def test_user_config_written_the_documented_way_round_trips(tmp_path):
    config = MyConfig(my_rank=7, my_tag="y", modified_modules=["fc"])
    assert (config.my_rank, config.my_scale, config.my_tag, config.modified_modules) == (7, 1.0, "y", ["fc"])
    assert MyConfig.hyperparameter_names() == ["my_rank", "my_scale", "my_tag"]
    assert config.to_dict()["my_rank"] == 7
    assert config == MyConfig(my_rank=7, my_tag="y", modified_modules=["fc"]) != MyConfig(my_rank=8)
    assert config.copy(my_scale=0.5).my_scale == 0.5 and config.copy() == config
    path = config.save_finetuned(tmp_path)
    loaded = MyConfig.from_finetuned(path)
    assert type(loaded) is MyConfig and loaded == config and loaded.my_tag == "y"
    loaded, unused = MyConfig.from_finetuned(tmp_path, return_unused_kwargs=True, my_rank=2, cache_dir_x=1)
    assert loaded.my_rank == 2 and unused == {"cache_dir_x": 1}
    wider = MyWiderConfig(my_width=32, my_rank=3)
    wider.delta_type = "my_method"  # what a user's delta model sets on its config
    again = MyWiderConfig.from_finetuned(wider.save_finetuned(tmp_path / "w"))
    assert (again.my_width, again.my_rank, again.delta_type) == (32, 3, "my_method")
    assert MyWiderConfig.field_names()[-4:] == ["my_rank", "my_scale", "my_tag", "my_width"]


def test_config_files_are_replaced_atomically(tmp_path, monkeypatch):
    first = LoraConfig(lora_r=4).save_finetuned(tmp_path)
    before = open(first).read()
    LoraConfig(lora_r=6).save_finetuned(tmp_path)  # overwriting works
    assert LoraConfig.from_finetuned(tmp_path).lora_r == 6

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        LoraConfig(lora_r=9).save_finetuned(tmp_path)
    assert os.listdir(tmp_path) == ["config.json"]  # the temporary file was removed
    assert LoraConfig.from_finetuned(tmp_path).lora_r == 6 and before != open(first).read()


def test_config_file_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no configuration file or directory"):
        LoraConfig.from_finetuned(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no config.json \(found: nothing\)"):
        LoraConfig.from_finetuned(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        LoraConfig.from_finetuned(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, found list"):
        LoraConfig.from_finetuned(tmp_path / "list.json")
    with pytest.raises(TypeError, match=r"\['lora_rank'\] that are no field"):
        LoraConfig.from_finetuned(tmp_path, lora_rank=3)
    with pytest.raises(ValueError, match="push_to_hub=True is not supported"):
        LoraConfig().save_finetuned(tmp_path, push_to_hub=True)
    with pytest.raises(ValueError, match="is a file"):
        LoraConfig().save_finetuned(tmp_path / "bad.json")


def test_config_inside_a_delta_checkpoint_loads_alone(tmp_path):
    model = tm.build("bert", "cls")
    delta = LoraModel(model, modified_modules=["query"], lora_r=3)
    delta.save_finetuned(tmp_path)
    config = LoraConfig.from_finetuned(tmp_path)
    assert (config.lora_r, config.modified_modules) == (3, ["query"])


# ------------------------------------------------------------- common structure (1.16.2)
STACKS = {  # the layer-stack containers of each architecture's language model
    "bert": {"bert.encoder": "encoder", "bert.encoder.layer": "encoder.block"},
    "roberta": {"roberta.encoder": "encoder", "roberta.encoder.layer": "encoder.block"},
    "deberta-v2": {"deberta.encoder": "encoder", "deberta.encoder.layer": "encoder.block"},
    "distilbert": {"distilbert.transformer": "encoder", "distilbert.transformer.layer": "encoder.block"},
    "gpt2": {"transformer.h": "decoder.block"},
    "opt": {"model.decoder": "decoder", "model.decoder.layers": "decoder.block"},
    "t5": {"encoder": "encoder", "encoder.block": "encoder.block", "decoder": "decoder",
           "decoder.block": "decoder.block"},
    "bart": {"model.encoder": "encoder", "model.encoder.layers": "encoder.block", "model.decoder": "decoder",
             "model.decoder.layers": "decoder.block"},
    "llama": {"model.layers": "decoder.block"},
    "qwen2": {"model.layers": "decoder.block"},
    "mistral": {"model.layers": "decoder.block"},
}


@pytest.mark.parametrize("arch", tm.ARCH_NAMES)
def test_layer_stacks_have_their_common_names(arch):
    model = tm.build(arch, "lm")
    mapping = CommonStructureMap(model)
    containers = {name: mapping.transform(name) for name, _ in model.named_modules()
                  if mapping.transform(name) in ("encoder", "decoder", "encoder.block", "decoder.block")}
    assert containers == STACKS[arch]
    block = [n for n in STACKS[arch] if STACKS[arch][n].endswith("block")][0]
    assert mapping.transform(f"{block}.1") == STACKS[arch][block] + ".1"


def test_the_manual_bert_example():
    mapping = CommonStructureMap(tm.build("bert", "lm"))
    assert mapping.transform("bert.encoder") == "encoder"
    assert mapping.transform("bert.encoder.layer") == "encoder.block"
    assert mapping.transform("bert.encoder.layer.0") == "encoder.block.0"
    assert mapping.transform("bert.encoder.layer.0.attention") == "encoder.block.0.attn"
    assert mapping.transform("bert.encoder.layer.0.attention.self.query") == "encoder.block.0.attn.q"
    assert mapping.transform("bert.encoder.layer.0.output.dense") == "encoder.block.0.ff.w2"
    assert mapping.transform("cls.predictions.decoder") == "lm_head.proj"
    assert mapping.transform("bert.embeddings") is None and mapping.transform("bert") is None
    with pytest.raises(KeyError, match="'bert.pooler' has no common structure name"):
        mapping.transform("bert.pooler", strict=True)
    with pytest.warns(UserWarning, match="'bert.embeddings' has no common"):
        mapping.transform("bert.embeddings", warning=True)


def test_t5_names_ending_in_an_index_try_literal_and_index_rules():
    mapping = CommonStructureMap("t5")
    assert mapping.transform("encoder.block.1.layer.0") == "encoder.block.1.attn"
    assert mapping.transform("decoder.block.0.layer.1") == "decoder.block.0.crossattn"
    assert mapping.transform("decoder.block.0.layer.2") == "decoder.block.0.ff"
    assert mapping.transform("encoder.block.1") == "encoder.block.1"


def test_container_names_are_derived_from_the_maps():
    assert container_names(COMMON_STRUCTURES["distilbert"]) == {
        "transformer.layer": "encoder.block", "transformer": "encoder"}
    assert container_names(COMMON_STRUCTURES["gpt2"]) == {"h": "decoder.block"}
    assert container_names({"a.stack.{i}": "decoder.block.{i}", "x.{i}": "y.{i}"}) == {
        "a.stack": "decoder.block", "a": "decoder", "x": "y"}
    # two rules disagreeing about a container leave it unnamed; listed names win
    assert container_names({"s.{i}": "encoder.block.{i}", "s.{i}.q": "decoder.block.{i}.q"}) == {}
    assert container_names({"enc.layer.{i}": "encoder.block.{i}", "enc": "body"}) == {"enc.layer": "encoder.block"}


# ------------------------------------------------------------------ dummy_inputs (FAQ 3)
class Gain(nn.Module):
    """Sizes not readable from the module: no Linear, no norm, a bare parameter."""

    def __init__(self, dim):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, hidden):
        return hidden * self.gain


class FeatureNet(nn.Module):
    """Takes float features, not token ids: the default pseudo input cannot run it."""

    def __init__(self):
        super().__init__()
        self.block = Gain(6)

    def forward(self, features):
        return self.block(features)


def test_dummy_inputs_attribute_is_the_pseudo_input():
    model = FeatureNet()
    with pytest.raises(RuntimeError, match=r"dummy forward of FeatureNet with token ids.*set "
                                           r"backbone_model.dummy_inputs"):
        AdapterModel(model, modified_modules=["block"], bottleneck_dim=3)
    assert "adapter" not in model.block._modules
    seen = []
    model.block.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    for dummy in ({"features": torch.randn(2, 5, 6)}, (torch.randn(2, 5, 6),), torch.randn(2, 5, 6)):
        model.dummy_inputs = dummy
        assert probe_sizes(model, ["block"]) == {"block": (6, 6)}
    assert seen == [(2, 5, 6)] * 3
    delta = AdapterModel(model, modified_modules=["block"], bottleneck_dim=3)
    down = model.block.adapter.modulelist.down_proj
    assert (down.in_features, down.out_features) == (6, 3)
    x = torch.randn(2, 6)
    assert model(x).shape == (2, 6)
    delta.detach()
    assert torch.equal(model(x), x)


def test_transformers_dummy_inputs_and_a_failing_one():
    t5 = tm.build("t5", "lm")  # its dummy_inputs carry decoder_input_ids
    assert probe_sizes(t5, ["decoder.block.0.layer.1"]) == {"decoder.block.0.layer.1": (32, 32)}
    model = FeatureNet()
    model.dummy_inputs = {"input_ids": torch.tensor([[1, 2]])}
    with pytest.raises(RuntimeError, match=r"FeatureNet.dummy_inputs used as a fallback failed"):
        probe_sizes(model, ["block"])
