"""Every symbol of the OpenDelta manual's API index, imported from its documented location.

The index (65 entries) is what Sphinx builds from the manual's four API pages
(``docs/source/modules/{base,deltas,auto_delta,utils}`` of thunlp/OpenDelta 0.3.2):
``autoclass ... :members:`` lists a class and its members that have a docstring not
tagged ``[NODOC]`` (the manual's ``conf.py`` skips the others); ``automodule`` lists a
module and its documented functions. Signatures are those of OpenDelta 0.3.2's sources.

A parameter spec is ``(name, default)``; ``REQUIRED`` for no default, ``ANY`` where our
default differs by design (the comment says why), ``"*"`` starts keyword-only parameters
(their order is free), ``"**"`` means the documented callable takes ``**kwargs``. Our
callables may add parameters, but only optional ones, after the documented positional ones.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import pytest

REQUIRED, ANY = object(), object()
KW, VAR_KW = ("*", None), ("**", None)

BASE_ARGS = (("modified_modules", None), ("exclude_modules", None), ("unfrozen_modules", None),
             ("interactive_modify", False),
             ("common_structure", ANY),  # documented None/False; ours None = decided per method
             ("backend", "hf"))
INSERT_ARGS = (("delta_module", None), ("delta_name", "delta"), ("strict", False), ("_delta_info", None))


@dataclass(frozen=True)
class Doc:
    module: str
    name: str = ""                      # "" for the module itself; "Class.member" for members
    kind: str = "module"                # module | class | function | method | classmethod
    params: Optional[Tuple[Tuple[str, Any], ...]] = None   # None: not checked
    ordered: bool = True                # check the order of positional parameters

    @property
    def id(self) -> str:
        return f"{self.module}.{self.name}" if self.name else self.module


def delta_class(module: str, name: str, *hyper: Tuple[str, Any]) -> Doc:
    # Hyperparameters are keyword-only in our classes (positional in 0.3.2): order not checked.
    return Doc(f"opendelta.delta_models.{module}", name, "class",
               (("backbone_model", REQUIRED), *hyper, *BASE_ARGS), ordered=False)


API_INDEX = [
    # ---------------------------------------------------------------- modules/base
    Doc("opendelta.delta_configs", "BaseDeltaConfig", "class",
        (("modified_modules", None), ("exclude_modules", None),
         ("unfrozen_modules", ANY),  # documented ["deltas"]; ours None means ["deltas"]
         ("common_structure", ANY),  # documented False; ours None = decided by the delta model
         ("backbone_class", None), ("backbone_checkpoint_name", None), ("backbone_hash", None))),
    Doc("opendelta.delta_configs", "BaseDeltaConfig.from_finetuned", "classmethod",
        (("finetuned_delta_path", REQUIRED), VAR_KW)),
    Doc("opendelta.delta_configs", "BaseDeltaConfig.save_finetuned", "method",
        (("save_directory", REQUIRED), ("push_to_hub", False), VAR_KW)),
    Doc("opendelta.delta_configs", "BaseDeltaConfig.from_dict", "classmethod",
        (("config_dict", REQUIRED), VAR_KW)),
    Doc("opendelta.delta_configs", "BaseDeltaConfig.to_dict", "method", ()),
    Doc("opendelta.basemodel", "DeltaBase", "class", (("backbone_model", REQUIRED), *BASE_ARGS),
        ordered=False),  # 0.3.2 puts interactive_modify before common_structure
    Doc("opendelta.basemodel", "DeltaBase.forward", "method", (VAR_KW,)),
    Doc("opendelta.basemodel", "DeltaBase.from_config", "classmethod",
        (("config", REQUIRED), ("backbone_model", REQUIRED), ("check_hash", True), VAR_KW)),
    Doc("opendelta.basemodel", "DeltaBase.add_all_delta_to_backbone", "method",
        (("backbone", REQUIRED), ("modified_modules", REQUIRED))),
    Doc("opendelta.basemodel", "DeltaBase.update_module", "method", (("module", REQUIRED), ("key", REQUIRED))),
    Doc("opendelta.basemodel", "DeltaBase.freeze_module", "method",
        (("module", None), ("exclude", None), ("set_state_dict", True))),
    Doc("opendelta.basemodel", "DeltaBase.find_key", "method", (("key", REQUIRED), ("target_list", REQUIRED))),
    Doc("opendelta.basemodel", "DeltaBase.find_module", "method",
        (("root_module", REQUIRED), ("key", REQUIRED))),
    Doc("opendelta.basemodel", "DeltaBase.replace_module", "method",
        (("parent_module", REQUIRED), ("child_name", REQUIRED), ("child_module", REQUIRED),
         ("new_module", REQUIRED), ("delta_name", "delta"))),
    Doc("opendelta.basemodel", "DeltaBase.modify_module", "method", (("module", REQUIRED),)),
    Doc("opendelta.basemodel", "DeltaBase.insert_module", "method",
        (("module", REQUIRED), ("method", "sequential"), *INSERT_ARGS)),
    Doc("opendelta.basemodel", "DeltaBase.insert_sequential_module", "method",
        (("module", REQUIRED), *INSERT_ARGS)),
    Doc("opendelta.basemodel", "DeltaBase.insert_parallel_module", "method",
        (("module", REQUIRED), *INSERT_ARGS)),
    Doc("opendelta.basemodel", "DeltaBase.set_active_state_dict", "method", (("module", REQUIRED),)),
    Doc("opendelta.basemodel", "DeltaBase.log", "method",
        (("module", None), ("delta_ratio", True), ("trainable_ratio", True), ("visualization", True),
         ("cuda_memory", True))),
    Doc("opendelta.basemodel", "DeltaBase.attach", "method", (("module", None), ("reset_state_dict", True))),
    Doc("opendelta.basemodel", "DeltaBase.detach", "method", (("module", None), ("reset_state_dict", True))),
    # ---------------------------------------------------------------- modules/auto_delta
    Doc("opendelta.auto_delta", "AutoDeltaConfig", "class"),
    Doc("opendelta.auto_delta", "AutoDeltaConfig.from_dict", "classmethod", (("config_dict", REQUIRED), VAR_KW)),
    Doc("opendelta.auto_delta", "AutoDeltaConfig.from_finetuned", "classmethod",
        (("finetuned_model_name_or_path", REQUIRED), VAR_KW)),
    Doc("opendelta.auto_delta", "AutoDeltaModel", "class"),
    Doc("opendelta.auto_delta", "AutoDeltaModel.from_config", "classmethod",
        (("config", REQUIRED), ("backbone_model", REQUIRED), VAR_KW)),
    Doc("opendelta.auto_delta", "AutoDeltaModel.from_finetuned", "classmethod",
        (("finetuned_model_name_or_path", REQUIRED), ("backbone_model", REQUIRED), VAR_KW)),
    # ---------------------------------------------------------------- modules/deltas
    delta_class("lora", "LoraModel", ("lora_r", 8), ("lora_alpha", 16), ("lora_dropout", 0.0)),
    delta_class("bitfit", "BitFitModel"),
    Doc("opendelta.delta_models.bitfit", "BitFitModel.add_bias_to_modules_have_bias_or_known_type", "method",
        (("c", REQUIRED),)),
    Doc("opendelta.delta_models.bitfit", "BitFitModel.detach", "method", (("module", REQUIRED),)),
    Doc("opendelta.delta_models.bitfit", "BitFitModel.attach", "method", (("module", REQUIRED),)),
    delta_class("adapter", "AdapterModel", ("bottleneck_dim", 24), ("non_linearity", "gelu_new")),
    delta_class("low_rank_adapter", "LowRankAdapterModel", ("reduction_factor", 32),
                ("non_linearity", "gelu_new"), ("low_rank_w_init", "glorot-uniform"), ("low_rank_rank", 1)),
    delta_class("compacter", "CompacterModel", ("reduction_factor", 16), ("non_linearity", "gelu_new"),
                ("phm_c_init", "normal"), ("hypercomplex_division", 4), ("learn_phm", True),
                ("hypercomplex_nonlinearity", "glorot-uniform"), ("shared_phm_rule", False),
                ("factorized_phm", True), ("shared_W_phm", False), ("factorized_phm_rule", False),
                ("phm_rank", 1), ("phm_init_range", 0.0001), ("kronecker_prod", None),
                ("use_bias_up_sampler", True), ("use_bias_down_sampler", True)),
    delta_class("prefix", "PrefixModel", ("prefix_token_num", 6), ("reparameterize", True),
                ("embed_dim", 512), ("mid_dim", 512)),
    delta_class("soft_prompt", "SoftPromptModel", ("soft_token_num", 100), ("init_range", 0.5),
                ("token_init", True), ("other_expand_ids", {"attention_mask": 1, "token_type_ids": 0})),
    delta_class("parallel_adapter", "ParallelAdapterModel", ("bottleneck_dim", 24),
                ("non_linearity", "gelu_new"), ("scaled", 1.0)),
    # ---------------------------------------------------------------- modules/utils
    Doc("opendelta.utils.saving_loading_utils", "SaveLoadMixin", "class"),
    Doc("opendelta.utils.saving_loading_utils", "SaveLoadMixin.save_finetuned", "method",
        (("finetuned_delta_path", "./delta_checkpoints/"), ("save_config", True), ("state_dict", None),
         ("save_function", ANY),  # documented torch.save (for pytorch_model.bin)
         ("push_to_dc", ANY),     # documented True: DeltaCenter is gone, True now raises
         ("center_args", None), ("center_args_pool", None), ("list_tags", None), ("dict_tags", None),
         ("delay_push", False))),
    Doc("opendelta.utils.saving_loading_utils", "SaveLoadMixin.from_finetuned", "classmethod",
        (("finetuned_delta_path", REQUIRED), ("backbone_model", REQUIRED), ("delta_config", None),
         ("cache_dir", None), ("state_dict", None), KW, ("force_download", False), ("check_hash", True),
         ("local_files_only", False), VAR_KW)),
    Doc("opendelta.utils.saving_loading_utils", "SaveLoadMixin.load_checkpoint", "method"),
    Doc("opendelta.utils.saving_loading_utils", "SaveLoadMixin.save_checkpoint", "method"),
    Doc("opendelta.utils.saving_loading_utils", "SaveLoadMixin.create_default_name", "method", (VAR_KW,)),
    Doc("opendelta.utils.saving_loading_utils", "SaveLoadMixin.create_delta_center_args", "method",
        (("center_args", REQUIRED), ("center_args_pool", REQUIRED))),
    Doc("opendelta.utils.visualization", "Visualization", "class", (("plm", REQUIRED),)),
    Doc("opendelta.utils.visualization", "Visualization.structure_graph", "method",
        (("rootname", "root"), ("expand_params", False), ("keep_non_params", False),
         ("common_structure", False), ("mapping", None), ("only_common", False), ("printTree", True))),
    Doc("opendelta.utils.visualization", "Visualization.build_common_tree", "method",
        (("module", REQUIRED), ("mapping", REQUIRED), ("tree", None), ("query", ""), ("key_to_root", ""))),
    # 0.3.2 also accepted strict/warning/visualize and ignored them.
    Doc("opendelta.utils.structure_mapping", "CommonStructureMap", "class", (("backbone_model", REQUIRED),)),
    Doc("opendelta.utils.structure_mapping", "CommonStructureMap.transform", "method",
        (("org_key", REQUIRED),
         ("strict", ANY),  # documented True = None for unmapped names: our default does that
         ("warning", False))),
    Doc("opendelta.utils.model_md5"),
    Doc("opendelta.utils.model_md5", "gen_model_hash", "function", (("model", REQUIRED), ("with_parameters", True))),
    Doc("opendelta.utils.model_md5", "gen_parameter_hash", "function", (("generator", REQUIRED), ("md5", None))),
    Doc("opendelta.utils.signature"),
    Doc("opendelta.utils.signature", "signature", "function", (("f", REQUIRED),)),
    Doc("opendelta.utils.signature", "get_arg_names", "function", (("f", REQUIRED),)),
    Doc("opendelta.utils.signature", "get_arg_names_inside_func", "function", (("func", REQUIRED),)),
    Doc("opendelta.utils.name_based_addressing"),
    *[Doc("opendelta.utils.name_based_addressing", name, "function", (("str_a", REQUIRED), ("list_b", REQUIRED)))
      for name in ("superstring_in", "is_child_key", "endswith_in_normal", "substring_in_normal",
                   "endswith_in_regex", "substring_in_regex")],
]


def test_the_index_has_65_distinct_entries():
    assert len(API_INDEX) == 65
    assert len({doc.id for doc in API_INDEX}) == 65


def _resolve(doc: Doc) -> Tuple[Any, Any]:
    """``(owner, object)``: the class holding a member (else ``None``) and the symbol."""
    module = importlib.import_module(doc.module)
    if not doc.name:
        return None, module
    owner_name, _, member = doc.name.partition(".")
    owner = getattr(module, owner_name)
    if not member:
        return None, owner
    return owner, inspect.getattr_static(owner, member)


def _check_params(doc: Doc, func: Any) -> None:
    sig = inspect.signature(func)
    actual = list(sig.parameters.values())
    if doc.kind in ("method",) and actual and actual[0].name == "self":
        actual = actual[1:]
    kinds = inspect.Parameter
    named = {p.name: p for p in actual if p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)}
    positional_doc, keyword_only = [], False
    for name, default in doc.params:
        if name == "**":
            assert any(p.kind is kinds.VAR_KEYWORD for p in actual), f"{doc.id} must take **kwargs"
            continue
        if name == "*":
            keyword_only = True
            continue
        assert name in named, f"{doc.id} has no parameter {name!r}; it has {list(named)}"
        param = named[name]
        if default is REQUIRED:
            pass  # a documented required argument may have become optional
        elif default is not ANY:
            assert param.default is not param.empty and param.default == default, \
                f"{doc.id}: default of {name!r} is {param.default!r}, documented {default!r}"
        if not keyword_only:
            positional_doc.append(name)
    documented = {n for n, _ in doc.params}
    for p in actual:
        if p.name not in documented and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD):
            assert p.default is not p.empty, f"{doc.id}: extra parameter {p.name!r} must be optional"
    if doc.ordered:
        order = [p.name for p in actual if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
        assert order[:len(positional_doc)] == positional_doc, \
            f"{doc.id}: positional parameters {order}, documented {positional_doc}"


@pytest.mark.parametrize("doc", API_INDEX, ids=lambda d: d.id)
def test_documented_symbol(doc: Doc):
    owner, obj = _resolve(doc)
    if doc.kind == "module":
        assert inspect.ismodule(obj)
        return
    if doc.kind == "class":
        assert inspect.isclass(obj), f"{doc.id} is not a class"
        top = importlib.import_module("opendelta")
        if doc.module.startswith("opendelta.delta_models."):
            assert getattr(top, doc.name) is obj  # also ``from opendelta import LoraModel``
        func = obj
    elif doc.kind == "classmethod":
        assert isinstance(obj, classmethod), f"{doc.id} is not a classmethod"
        func = getattr(owner, doc.name.split(".")[1])
    elif doc.kind == "method":
        assert inspect.isfunction(obj), f"{doc.id} is not a method ({type(obj).__name__})"
        func = obj
    else:
        assert callable(obj) and not inspect.isclass(obj), f"{doc.id} is not a function"
        func = obj
    if doc.params is not None:
        _check_params(doc, func)
