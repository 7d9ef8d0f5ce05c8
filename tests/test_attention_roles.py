"""Argument discovery by role (opendelta.integrations.transformers.roles / .attention).

Toy attention modules spell, order and pass their arguments in the ways transformers
releases have (``cache=`` since 5.24, ``past_key_values=`` before, ``past_key_value=`` and
``layer_past=`` in older code), by keyword and by position. A pre-hook that replaces the
mask and the cache through the discovered roles must reach the right parameters however
the module is called; a signature without a mask fails with a message a user can act on.
"""
from __future__ import annotations

import importlib.metadata
from typing import Optional

import pytest
import torch
from torch import nn

from opendelta import PrefixModel
from opendelta.integrations.transformers.attention import attention_roles
from opendelta.integrations.transformers.roles import (TESTED_TRANSFORMERS, UnsupportedSignatureError,
                                                       find_argument)

HIDDEN = torch.zeros(1, 2, 4)


class DynamicCache:  # a stand-in, recognised by its annotation only
    pass


class CacheKeyword(nn.Module):  # transformers >= 5.24
    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        return {"hidden": hidden_states, "mask": attention_mask, "cache": cache}


class PastKeyValues(nn.Module):  # transformers 5.0 - 5.23 (GPT-2, OPT, BART order)
    def forward(self, hidden_states, past_key_values=None, attention_mask=None, output_attentions=False):
        return {"hidden": hidden_states, "mask": attention_mask, "cache": past_key_values}


class PastKeyValue(nn.Module):  # transformers 4.x
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_value=None):
        return {"hidden": hidden_states, "mask": attention_mask, "cache": past_key_value}


class LayerPast(nn.Module):  # GPT-2 of old; hidden states found by position, mask spelled "mask"
    def forward(self, states, layer_past=None, mask=None):
        return {"hidden": states, "mask": mask, "cache": layer_past}


class Reordered(nn.Module):
    def forward(self, cache, attention_mask, hidden_states):
        return {"hidden": hidden_states, "mask": attention_mask, "cache": cache}


class KeywordOnly(nn.Module):
    def forward(self, hidden_states, *, attn_mask=None, kv_cache=None):
        return {"hidden": hidden_states, "mask": attn_mask, "cache": kv_cache}


class PositionalOnly(nn.Module):
    def forward(self, hidden_states, attention_mask=None, past_key_values=None, /):
        return {"hidden": hidden_states, "mask": attention_mask, "cache": past_key_values}


class AnnotatedCache(nn.Module):  # a cache renamed to a spelling nobody knows, still typed
    def forward(self, hidden_states, attention_mask=None, kv_store: Optional[DynamicCache] = None):
        return {"hidden": hidden_states, "mask": attention_mask, "cache": kv_store}


class DeprecatedAlias(nn.Module):  # accepts the old spelling through **kwargs, as deprecate_kwarg does
    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        return {"hidden": hidden_states, "mask": attention_mask, "cache": cache}


class NoMask(nn.Module):
    def forward(self, hidden_states, cache=None):
        return hidden_states


class NoCache(nn.Module):
    def forward(self, hidden_states, attention_mask=None):
        return hidden_states


#: class -> (hidden, mask, cache) parameter names and positions
EXPECTED = {
    CacheKeyword: (("hidden_states", 0), ("attention_mask", 1), ("cache", 2)),
    PastKeyValues: (("hidden_states", 0), ("attention_mask", 2), ("past_key_values", 1)),
    PastKeyValue: (("hidden_states", 0), ("attention_mask", 2), ("past_key_value", 3)),
    LayerPast: (("states", 0), ("mask", 2), ("layer_past", 1)),
    Reordered: (("hidden_states", 2), ("attention_mask", 1), ("cache", 0)),
    KeywordOnly: (("hidden_states", 0), ("attn_mask", None), ("kv_cache", None)),
    PositionalOnly: (("hidden_states", 0), ("attention_mask", 1), ("past_key_values", 2)),
    AnnotatedCache: (("hidden_states", 0), ("attention_mask", 1), ("kv_store", 2)),
}


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_roles_are_found(cls):
    roles = attention_roles(cls)
    found = tuple((a.name, a.position) for a in (roles.hidden, roles.mask, roles.cache))
    assert found == EXPECTED[cls]


def _replacing_hook(module, args, kwargs):
    """What PrefixModel does: read the hidden states, replace the mask and the cache."""
    roles = attention_roles(type(module))
    args, kwargs = list(args), dict(kwargs)
    hidden = roles.hidden.get(args, kwargs)
    assert hidden is HIDDEN
    assert roles.mask.get(args, kwargs) in (None, "old mask")
    assert roles.cache.get(args, kwargs) in (None, "old cache")
    roles.mask.set(args, kwargs, "new mask")
    roles.cache.set(args, kwargs, "new cache")
    return tuple(args), kwargs


def _calls(cls):
    """Every way of calling ``cls``: all by keyword, hidden states only, and (where the
    signature allows) all by position and hidden states alone by position."""
    (hidden, hidden_at), (mask, mask_at), (cache, cache_at) = EXPECTED[cls]
    calls = [((), {hidden: HIDDEN, mask: "old mask", cache: "old cache"}), ((), {hidden: HIDDEN})]
    if None not in (hidden_at, mask_at, cache_at):
        args = [None] * (max(hidden_at, mask_at, cache_at) + 1)  # other parameters: None
        args[hidden_at], args[mask_at], args[cache_at] = HIDDEN, "old mask", "old cache"
        calls.append((tuple(args), {}))
    if hidden_at == 0:  # the rest left to their defaults
        calls.append(((HIDDEN,), {}))
    if cls is PositionalOnly:  # cannot be called by keyword
        calls = [call for call in calls if not call[1]]
    return calls


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_hook_replaces_mask_and_cache_however_called(cls):
    module = cls()
    module.register_forward_pre_hook(_replacing_hook, with_kwargs=True)
    for args, kwargs in _calls(cls):
        seen = module(*args, **kwargs)
        assert seen["hidden"] is HIDDEN
        assert (seen["mask"], seen["cache"]) == ("new mask", "new cache"), (args, kwargs)


def test_a_deprecated_spelling_passed_by_keyword_is_found_and_replaced():
    module = DeprecatedAlias()
    module.register_forward_pre_hook(_replacing_hook, with_kwargs=True)
    seen = module(HIDDEN, past_key_values="old cache", attention_mask="old mask")
    assert (seen["mask"], seen["cache"]) == ("new mask", "new cache")


def test_cross_and_cache_position_roles():
    class T5Like(nn.Module):
        def forward(self, hidden_states, key_value_states, attention_mask=None, position_bias=None,
                    past_key_values=None, use_cache=False, cache_position=None):
            return hidden_states

    roles = attention_roles(T5Like)
    assert (roles.cross.name, roles.cross.position) == ("key_value_states", 1)
    assert (roles.cache_position.name, roles.cache_position.position) == ("cache_position", 6)
    assert attention_roles(CacheKeyword).cross is None and attention_roles(CacheKeyword).cache_position is None
    assert find_argument(NoCache, "cache") is None


def _installed():
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@pytest.mark.parametrize("cls,role", [(NoMask, "mask"), (NoCache, "cache")], ids=["no-mask", "no-cache"])
def test_unmappable_signature_names_class_version_and_tested_range(cls, role):
    with pytest.raises(UnsupportedSignatureError) as caught:
        attention_roles(cls)
    message = str(caught.value)
    assert isinstance(caught.value, NotImplementedError)
    assert f"{cls.__name__}.forward(self, hidden_states" in message
    assert f"has no {role} argument" in message
    assert f"Installed transformers: {_installed()}" in message
    assert f"tested with transformers {TESTED_TRANSFORMERS[0]} - {TESTED_TRANSFORMERS[1]}" in message
    assert TESTED_TRANSFORMERS == ("5.0.0", "5.24.0")


def test_cache_less_attention_needs_no_cache():
    roles = attention_roles(NoCache, needs_cache=False)
    assert roles.cache is None and roles.mask.name == "attention_mask"


def test_prefix_model_refuses_an_unmappable_attention():
    """A supported attention class (by name) whose forward has no mask: PrefixModel fails
    at construction, naming the class, instead of inserting prefixes that do nothing."""
    LlamaAttention = type("LlamaAttention", (NoMask,), {})  # the name the kind table knows

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = LlamaAttention()
            self.self_attn.k_proj = nn.Linear(4, 4)
            self.self_attn.head_dim = 2

        def forward(self, x):
            return self.self_attn(x)

    model = Toy()
    with pytest.raises(UnsupportedSignatureError, match=r"LlamaAttention\.forward.*no mask argument"):
        PrefixModel(model, modified_modules=["self_attn"])
    assert not model.self_attn._forward_pre_hooks
    assert not any("prefix" in name for name, _ in model.named_modules())


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "gpt2", "opt", "t5", "bart", "llama", "qwen2",
                                  "mistral"])
def test_installed_transformers_attention_classes_are_mapped(arch):
    """Every attention class prefix tuning supports maps on the installed release. At the
    ends of the tested range the spellings are known: 5.24 passes ``cache`` and no
    ``cache_position``, 5.0 ``past_key_values`` and ``cache_position`` (DistilBERT: none)."""
    import tiny_models as tm
    from opendelta.integrations.transformers.attention import ATTENTION_KINDS

    spellings = {"5.24.0": ("cache", False), "5.0.0": ("past_key_values", True)}.get(_installed())
    classes = {type(m) for m in tm.build(arch, "lm").modules() if type(m).__name__ in ATTENTION_KINDS}
    assert classes
    for cls in classes:
        needs_cache = ATTENTION_KINDS[cls.__name__].placeholder is None
        roles = attention_roles(cls, needs_cache=needs_cache)
        assert roles.hidden.name == "hidden_states" and roles.hidden.position == 0
        assert roles.mask.name in ("attention_mask", "mask")
        if needs_cache and spellings is not None:
            assert roles.cache.name == spellings[0]
            assert (roles.cache_position is not None) == spellings[1]
