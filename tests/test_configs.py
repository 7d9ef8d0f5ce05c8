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
