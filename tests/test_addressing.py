"""Name-based addressing, common structure, default targets and their errors."""
import pytest
from torch import nn

import tiny_models as tm
from opendelta import AdapterModel, BitFitModel, CommonStructureMap, LoraModel
from opendelta.core.addressing import (endswith_in, endswith_in_normal, endswith_in_regex,
                                                   is_child_key, superstring_in)


def test_documented_helpers():
    assert endswith_in_normal("distilbert.transformer.layer.0.attention.out_lin", ["attention.out_lin"])
    assert not endswith_in_normal("encoder.layer.0.attention.self.query", ["uery"])
    assert endswith_in_normal("query", ["query"])
    assert endswith_in_regex("encoder.layer.3.attention", [r"[0-5]\.attention"])
    assert not endswith_in_regex("encoder.layer.13.attention", [r"[0-5]\.attention"])
    assert not endswith_in_regex("attn.c_attn", ["attn"])  # tail must start on a boundary
    assert endswith_in("encoder.layer.3.attention", [r"[r][0-5]\.attention", "nothing"])
    assert is_child_key("encoder.layer.0", ["encoder"]) and not is_child_key("encoder_2.x", ["encoder"])
    assert superstring_in("uery", ["a.query", "b"]) and not superstring_in("zz", ["a.query"])


def test_find_key_and_regex_rules():
    model = tm.build("bert", "lm")
    delta = LoraModel(model, modified_modules=[r"[r]encoder\.layer\.[0]\.attention\.self\.(query|key)"])
    hosts = sorted(h for h, _, _ in delta._layers)
    assert hosts == ["bert.encoder.layer.0.attention.self.key", "bert.encoder.layer.0.attention.self.query"]
    assert delta.find_key("bert.encoder.layer.0.attention.self.query", ["self.query"])
    assert not delta.find_key("bert.encoder.layer.0.attention.self.query", ["uery"])


def test_common_structure_transform_and_addressing():
    model = tm.build("distilbert", "cls")
    mapping = CommonStructureMap(model)
    assert mapping.transform("distilbert.transformer.layer.1.attention.q_lin") == "encoder.block.1.attn.q"
    assert mapping.transform("distilbert.transformer.layer.1.ffn.lin2") == "encoder.block.1.ff.w2"
    assert mapping.transform("classifier") is None
    delta = LoraModel(model, modified_modules=["attn.k"], common_structure=True)
    assert sorted(h for h, _, _ in delta._layers) == [f"distilbert.transformer.layer.{i}.attention.k_lin"
                                                     for i in range(2)]


def test_gpt2_defaults_use_fused_conv1d():
    model = tm.build("gpt2", "lm")
    assert [h.split(".", 2)[-1] for h, _, _ in LoraModel(model)._layers] == ["0.attn.c_attn", "1.attn.c_attn"]
    hosts = [h.split(".", 2)[-1] for h, _, _ in AdapterModel(tm.build("gpt2", "lm"))._layers]
    assert hosts == ["0.attn.c_proj", "0.mlp.c_proj", "1.attn.c_proj", "1.mlp.c_proj"]


def test_exclude_only_keeps_defaults_minus_excluded():
    model = tm.build("bert", "cls")
    all_hosts = [h for h, _, _ in LoraModel(tm.build("bert", "cls"))._layers]
    delta = LoraModel(model, exclude_modules=["bert.encoder.layer.0"])
    hosts = [h for h, _, _ in delta._layers]
    assert len(all_hosts) == 4 and hosts == [h for h in all_hosts if ".layer.0." not in h]
    # Common names may be used to exclude as well.
    delta2 = LoraModel(tm.build("bert", "cls"), exclude_modules=["encoder.block.1"])
    assert [h for h, _, _ in delta2._layers] == [h for h in all_hosts if ".layer.1." not in h]


def test_unmatched_key_names_closest_modules():
    model = tm.build("bert", "cls")
    with pytest.raises(ValueError, match=r"'qurey'.*closest.*query"):
        LoraModel(model, modified_modules=["qurey"])
    with pytest.raises(ValueError, match="'uery' matches no module"):
        LoraModel(model, modified_modules=["uery"])
    with pytest.raises(ValueError, match="only matches excluded"):
        LoraModel(model, modified_modules=["query"], exclude_modules=["bert"])
    assert not any(n for n, _ in model.named_modules() if "lora" in n)  # nothing half-built


def test_plain_module_without_defaults_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no common structure map.*Sequential.*modified_modules"):
        LoraModel(model)
    delta = LoraModel(model, modified_modules=["0", "2"])
    assert len(delta._layers) == 2


def test_bad_hyperparameters_fail_at_construction():
    model = tm.build("bert", "cls")
    with pytest.raises(ValueError, match="lora_r must be a positive integer"):
        LoraModel(model, lora_r=0)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        LoraModel(model, lora_dropout=1.5)
    with pytest.raises(ValueError, match="bottleneck_dim must be a positive integer"):
        AdapterModel(model, bottleneck_dim=-3)
    with pytest.raises(ValueError, match="unknown non_linearity 'bogus'"):
        AdapterModel(model, non_linearity="bogus")
    with pytest.raises(TypeError, match="unexpected argument.*lora_rank"):
        LoraModel(model, lora_rank=4)
    with pytest.raises(TypeError, match="list of names, not the string"):
        LoraModel(model, modified_modules="query")
    with pytest.raises(ValueError, match="LoRA applies to Linear and Conv1D"):
        LoraModel(model, modified_modules=["attention"])
    # A failure after some layers were inserted takes them out again.
    with pytest.raises(ValueError, match="LoRA applies to Linear and Conv1D.*'bert.encoder.layer.0.output'"):
        LoraModel(model, modified_modules=["query", "[r]layer\\.0\\.output"])
    assert not any("lora" in n for n, _ in model.named_modules())
    assert not model.bert.encoder.layer[0].attention.self.query._forward_hooks
    with pytest.raises(ValueError, match="backend 'bmt' is not supported.*FSDP2"):
        LoraModel(model, backend="bmt")


def test_bitfit_adds_biases_where_missing_t5():
    model = tm.build("t5", "lm")
    delta = BitFitModel(model)
    hosts = {h for h, _, _ in delta._layers}
    assert "encoder.block.0.layer.0.SelfAttention.q" in hosts  # bias-free Linear
    assert "encoder.block.0.layer.0.layer_norm" in hosts       # T5LayerNorm has no bias
    assert all(p.shape == (tm.HIDDEN,) or p.shape == (64,) for _, p in delta.named_parameters())
