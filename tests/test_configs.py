"""Config objects, the registry and the Auto classes."""
import json

import pytest

import tiny_models as tm
from opendelta import (AdapterModel, AutoDeltaConfig, AutoDeltaModel, BaseDeltaConfig, LoraModel,
                       get_delta_class, known_delta_types)
from opendelta.methods.lora import LoraConfig


def test_every_registered_config_round_trips_through_json():
    assert set(known_delta_types()) >= {"adapter", "bitfit", "compacter", "lora", "low_rank_adapter",
                                        "parallel_adapter", "prefix", "soft_prompt"}
    for delta_type in known_delta_types():
        config = get_delta_class(delta_type).config_class(modified_modules=["x"], backbone_hash="abc")
        data = json.loads(config.to_json_string())
        assert data["delta_type"] == delta_type and data["modified_modules"] == ["x"]
        again = AutoDeltaConfig.from_dict(data)
        assert type(again) is type(config) and again == config
        for field in BaseDeltaConfig.field_names():
            assert field in data


def test_unknown_keys_survive_a_round_trip_and_overrides_win():
    config = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 4, "opendelta_version": "0.3.0"},
                                       lora_alpha=32)
    assert isinstance(config, LoraConfig) and (config.lora_r, config.lora_alpha) == (4, 32)
    assert config.to_dict()["opendelta_version"] == "0.3.0"


def test_unknown_delta_type_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown delta_type 'lorax'; known delta types: adapter, bitfit"):
        AutoDeltaConfig.from_dict({"delta_type": "lorax"})
    with pytest.raises(ValueError, match="no 'delta_type' key"):
        AutoDeltaConfig.from_dict({"lora_r": 4})
    with pytest.raises(EnvironmentError, match="factory"):
        AutoDeltaModel()


def test_from_config_builds_the_same_delta_and_overrides_win():
    original = LoraModel(tm.build("bert", "cls"), modified_modules=["query"], lora_r=4)
    config = original.config.to_dict()
    rebuilt = AutoDeltaModel.from_config(config, tm.build("bert", "cls"), lora_r=2)
    assert isinstance(rebuilt, LoraModel) and rebuilt.config.lora_r == 2
    assert [h for h, _, _ in rebuilt._layers] == [h for h, _, _ in original._layers]
    # A config made for one method cannot silently build another.
    adapter = AutoDeltaModel.from_config({"delta_type": "adapter", "bottleneck_dim": 6}, tm.build("bert", "cls"))
    assert isinstance(adapter, AdapterModel)
    assert adapter.delta_layers()[0][1].modulelist.down_proj.out_features == 6


def test_impossible_hyperparameters_fail_in_the_config_too():
    with pytest.raises(ValueError, match="lora_r must be a positive integer"):
        LoraConfig(lora_r=-1)
    with pytest.raises(TypeError, match="list of strings"):
        LoraConfig(modified_modules="query")


# ---------------------------------------------------------------- declared field validation
import dataclasses  # noqa: E402
import math  # noqa: E402

from opendelta.core.fields import (ChoiceError, ConfigFieldError, Rule, integer, number,  # noqa: E402
                                   rules_of, validated)

BUILT_IN = ["adapter", "bitfit", "compacter", "lora", "low_rank_adapter", "parallel_adapter", "prefix", "soft_prompt"]


@pytest.mark.parametrize("delta_type", BUILT_IN)
def test_every_field_of_a_built_in_config_declares_its_rule(delta_type):
    config_class = get_delta_class(delta_type).config_class
    rules = rules_of(config_class)
    assert set(config_class.field_names()) == set(rules)
    assert "validate" not in vars(config_class)  # no hand-written checks left
    config = config_class()
    for name, rule in rules.items():
        assert isinstance(rule, Rule)
        rule.check(config_class.__name__, name, getattr(config, name))  # the defaults pass


@pytest.mark.parametrize("delta_type", BUILT_IN)
def test_bool_is_not_an_int_and_numbers_are_finite(delta_type):
    config_class = get_delta_class(delta_type).config_class
    checked = 0
    for name, rule in rules_of(config_class).items():
        bad = {"int": [True, 1.0, "4"], "number": [True, math.nan, math.inf, "0.5"]}.get(rule.kind, [])
        for value in bad:
            with pytest.raises(ConfigFieldError, match=rf"{config_class.__name__}\.{name} must be") as caught:
                config_class(**{name: value})
            assert caught.value.field == name and caught.value.value is value
            checked += 1
    assert checked or delta_type == "bitfit"


def test_field_errors_name_the_field_the_value_and_the_rule():
    with pytest.raises(ConfigFieldError) as caught:
        LoraConfig(lora_dropout=1.0)
    err = caught.value
    assert (err.owner, err.field, err.value) == ("LoraConfig", "lora_dropout", 1.0)
    assert err.rule == "in [0, 1) (a finite number)"
    assert str(err) == "LoraConfig.lora_dropout must be in [0, 1) (a finite number), got 1.0"
    with pytest.raises(ConfigFieldError, match=r"LoraConfig.modified_modules\[1\] must be a string, got 3 \(int\)"):
        LoraConfig(modified_modules=["query", 3])
    with pytest.raises(ChoiceError, match=r"unknown low_rank_w_init 'xavier': LowRankAdapterConfig.low_rank_w_init "
                                          r"must be one of \['glorot-uniform', 'glorot-normal'\]"):
        get_delta_class("low_rank_adapter").config_class(low_rank_w_init="xavier")
    # copy() and from_dict() check too
    with pytest.raises(ConfigFieldError, match="lora_r must be a positive integer, got 0"):
        LoraConfig().copy(lora_r=0)
    with pytest.raises(ConfigFieldError, match="lora_alpha must be a finite number, got nan"):
        AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_alpha": float("nan")})


@dataclasses.dataclass
class RankedConfig(BaseDeltaConfig):
    """The documented way to declare a new method's fields."""

    delta_type = "ranked_example"
    rank: int = validated(8, integer(minimum=1))
    scale: float = validated(1.0, number(minimum=0, exclusive_minimum=True))


class HandWrittenConfig(BaseDeltaConfig):
    """The manual's pattern, with declared rules."""

    field_rules = {"my_rank": integer(minimum=1)}

    def __init__(self, my_rank=4, **kwargs):
        super().__init__(**kwargs)
        self.my_rank = my_rank


def test_new_and_hand_written_configs_declare_rules_the_same_way():
    assert RankedConfig(rank=3, scale=0.5).rank == 3
    with pytest.raises(ConfigFieldError, match=r"RankedConfig.scale must be a positive finite number, got 0"):
        RankedConfig(scale=0)
    assert HandWrittenConfig(my_rank=2).my_rank == 2
    with pytest.raises(ConfigFieldError, match=r"HandWrittenConfig.my_rank must be a positive integer, got True"):
        HandWrittenConfig.from_dict({"my_rank": True})
    with pytest.raises(ConfigFieldError, match="my_rank must be a positive integer"):
        HandWrittenConfig(my_rank=0).copy()  # checked once every field is set (from_dict / copy)


def test_a_config_alone_is_not_written_next_to_checkpoint_weights(tmp_path):
    delta = LoraModel(tm.build("bert", "cls"), modified_modules=["query"], lora_r=3)
    path = delta.save_finetuned(tmp_path / "ckpt")
    before = open(f"{path}/config.json").read()
    with pytest.raises(ValueError, match=r"holds a delta checkpoint \(model.safetensors\); writing only its "
                                         r"config.json would pair a new configuration with the old weights"):
        LoraConfig(lora_r=8).save_finetuned(path)
    assert open(f"{path}/config.json").read() == before
