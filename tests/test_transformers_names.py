"""Guards for the transformers names opendelta relies on (scripts/compat.sh runs them on every
release it tests, CI on the oldest supported and the newest tested).

The common-structure maps name architectures by ``config.model_type`` and modules by their
attribute paths; ``core/shapes.py`` recognises GPT-2's ``Conv1D`` and the norm layers by their
class names. A rename in a transformers release would not fail loudly there: a map entry
would just match nothing, and default targets would quietly shrink. These tests make such
a rename fail on the release that makes it.
"""
from __future__ import annotations

import re
from typing import Dict, List

import pytest
from torch import nn

import tiny_models as tm
from opendelta.core.shapes import is_conv1d_transposed, is_linear_like, is_norm
from opendelta.core.structure_maps import COMMON_STRUCTURES

transformers = pytest.importorskip("transformers")

#: common-name leaves that are linear layers (``layer_norm`` ones are norms).
LINEAR_LEAVES = {"q", "k", "v", "qkv", "proj", "w1", "w2", "w3"}


def _models(arch: str) -> List[nn.Module]:
    """The tiny ``arch`` model(s) that together hold every module its map names.

    T5's map lists both feed-forward variants (``wi``, or gated ``wi_0``/``wi_1``); one
    model has only one of them, so a gated T5 comes too.
    """
    models = [tm.build(arch, "lm")]
    if arch == "t5":  # what T5Config(feed_forward_proj="gated-gelu") sets
        models.append(tm.build(arch, "lm", feed_forward_proj="gated-gelu", is_gated_act=True,
                               dense_act_fn="gelu_new"))
        assert hasattr(models[1].encoder.block[0].layer[1].DenseReluDense, "wi_0")
    return models


def _pattern(original: str) -> "re.Pattern[str]":
    return re.compile(r"(?:.*\.)?" + re.escape(original).replace(r"\{i\}", r"\d+"))


@pytest.mark.parametrize("model_type", sorted(COMMON_STRUCTURES))
def test_every_mapped_model_type_is_a_transformers_model_type(model_type):
    assert transformers.AutoConfig.for_model(model_type).model_type == model_type


@pytest.mark.parametrize("arch", tm.ARCH_NAMES)
def test_every_structure_map_entry_names_a_module_of_the_right_kind(arch):
    models = _models(arch)
    model_type = models[0].config.model_type
    assert model_type == arch and model_type in COMMON_STRUCTURES
    modules: Dict[str, nn.Module] = {}
    for model in models:
        modules.update(model.named_modules())
    unmatched, wrong_kind = [], []
    for original, common in COMMON_STRUCTURES[model_type].items():
        hits = [name for name in modules if _pattern(original).fullmatch(name)]
        if not hits:
            unmatched.append(original)
        leaf = common.rsplit(".", 1)[-1]
        for name in hits:
            if (leaf in LINEAR_LEAVES and not is_linear_like(modules[name])) or \
                    (leaf == "layer_norm" and not is_norm(modules[name])):
                wrong_kind.append(f"{name} ({type(modules[name]).__name__}) as {leaf}")
    assert unmatched == [], f"map entries of {model_type!r} that name no module on " \
                            f"transformers {transformers.__version__}"
    assert wrong_kind == []


def test_gpt2_conv1d_is_recognised_as_a_transposed_linear():
    model = tm.build("gpt2", "lm")
    fused = {name: module for name, module in model.named_modules()
             if name.endswith(("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))}
    assert len(fused) == 4 * tm.LAYERS and all(is_conv1d_transposed(m) for m in fused.values())
    c_attn = fused["transformer.h.0.attn.c_attn"]
    assert tuple(c_attn.weight.shape) == (tm.HIDDEN, 3 * tm.HIDDEN)  # [in, out]
