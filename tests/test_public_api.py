"""Every public import of the previous release still works after the package was laid out
in core/, methods/, io/, integrations/, tools/ and cli/ (the documented opendelta.utils.*
and delta_models paths are checked symbol by symbol in test_documented_api.py)."""
import importlib

import pytest

#: ``opendelta.__all__`` of the previous release
PREVIOUS_TOP_LEVEL = [
    "__version__", "AutoDeltaConfig", "AutoDeltaModel", "BackboneHashWarning", "BaseDeltaConfig",
    "CheckpointError", "CommonStructureMap", "DeltaBase", "DeltaLayer", "gen_model_hash", "gen_parameter_hash",
    "get_delta_class", "inspect_module_statistics", "load_peft_lora", "save_peft_lora",
    "inspect_optimizer_statistics", "known_delta_types", "register_delta", "route", "Visualization",
    "AdapterConfig", "AdapterModel", "BitFitConfig", "BitFitModel", "LoraConfig", "LoraModel", "PrefixConfig",
    "PrefixModel", "CompacterConfig", "CompacterModel", "LowRankAdapterConfig", "LowRankAdapterModel",
    "ParallelAdapterConfig", "ParallelAdapterModel", "SoftPromptConfig", "SoftPromptModel",
]

#: module paths the previous README and the OpenDelta manual name, and what they offered
MODULE_PATHS = {
    "opendelta.basemodel": ["DeltaBase"],
    "opendelta.delta_configs": ["BaseDeltaConfig"],
    "opendelta.auto_delta": ["AutoDeltaConfig", "AutoDeltaModel"],
    "opendelta.delta_models": ["LoraModel", "AdapterModel", "SoftPromptModel"],
    "opendelta.delta_models.lora": ["LoraModel", "LoraConfig"],
    "opendelta.delta_models.adapter": ["AdapterModel", "AdapterConfig"],
    "opendelta.delta_models.bitfit": ["BitFitModel", "BitFitConfig"],
    "opendelta.delta_models.prefix": ["PrefixModel", "PrefixConfig"],
    "opendelta.delta_models.soft_prompt": ["SoftPromptModel", "SoftPromptConfig"],
    "opendelta.delta_models.compacter": ["CompacterModel", "CompacterConfig"],
    "opendelta.delta_models.low_rank_adapter": ["LowRankAdapterModel", "LowRankAdapterConfig"],
    "opendelta.delta_models.parallel_adapter": ["ParallelAdapterModel", "ParallelAdapterConfig"],
    "opendelta.utils.structure_mapping": ["CommonStructureMap"],
    "opendelta.utils.name_based_addressing": ["endswith_in", "is_child_key", "superstring_in"],
    "opendelta.utils.visualization": ["Visualization"],
    "opendelta.utils.inspect": ["inspect_module_statistics", "inspect_optimizer_statistics"],
    "opendelta.utils.distributed": ["save_finetuned_distributed", "is_main_process", "gather_delta_state_dict"],
    "opendelta.integrations.hf_trainer": ["DeltaTrainerCallback"],
    "bigmodelvis": ["Visualization"],
}


@pytest.mark.parametrize("name", PREVIOUS_TOP_LEVEL)
def test_top_level_names(name):
    import opendelta

    assert getattr(opendelta, name) is not None
    assert name in opendelta.__all__


@pytest.mark.parametrize("path", list(MODULE_PATHS))
def test_module_paths(path):
    module = importlib.import_module(path)
    for name in MODULE_PATHS[path]:
        assert getattr(module, name) is not None, f"{path}.{name}"


def test_documented_paths_are_the_same_objects():
    import opendelta
    from opendelta.basemodel import DeltaBase
    from opendelta.delta_models.lora import LoraModel
    from opendelta.utils.visualization import Visualization

    assert DeltaBase is opendelta.DeltaBase and LoraModel is opendelta.LoraModel
    assert Visualization is opendelta.Visualization
