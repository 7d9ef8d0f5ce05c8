"""transformers attention modules, as prefix tuning sees them.

* :data:`ATTENTION_KINDS`: the attention classes prefix tuning supports and where their
  projections and sizes are;
* :func:`attention_roles`: the hidden-state, attention-mask, cache, cache-position and
  cross-attention arguments of an attention class, found by role (:mod:`.roles`);
* :class:`PrefixedCache`: the cache view that puts the prefixes in front of the keys and
  values an attention reads;
* :func:`extend_mask`: the attention mask with the prefix columns in front.

Nothing here imports transformers: classes are recognised by name and signature, caches by
duck typing (``update`` / ``get_seq_length``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .roles import Argument, find_argument, require_argument


# --------------------------------------------------------------------------- supported classes
@dataclass(frozen=True)
class AttentionKind:
    """How prefixes reach one family of attention classes.

    Attributes:
        inner: the module holding the projections (the host itself or a child).
        kv_dim: the key width (``kv_heads * head_dim``) of ``inner``.
        head_dim: the size of one head of ``inner``.
        cross_when_passed: a call that passes the cross-attention states (``cross`` role,
            e.g. ``key_value_states``) is cross-attention.
        always_cross: every call is cross-attention (T5's ``EncDecAttention`` layer).
        placeholder: DistilBERT's cache-less path: the names of the key and value
            projections that write the prefixes over placeholder positions.
    """

    inner: Callable[[nn.Module], nn.Module]
    kv_dim: Callable[[nn.Module], int]
    head_dim: Callable[[nn.Module], int]
    cross_when_passed: bool = False
    always_cross: bool = False
    placeholder: Optional[Tuple[str, str]] = None


def _itself(module: nn.Module) -> nn.Module:
    return module


BERT = AttentionKind(inner=attrgetter("self"), kv_dim=attrgetter("key.out_features"),
                     head_dim=attrgetter("attention_head_size"))
GPT2 = AttentionKind(inner=_itself, kv_dim=attrgetter("embed_dim"), head_dim=attrgetter("head_dim"))
_PROJ = AttentionKind(inner=_itself, kv_dim=attrgetter("k_proj.out_features"), head_dim=attrgetter("head_dim"))
_BART = AttentionKind(inner=_itself, kv_dim=attrgetter("k_proj.out_features"), head_dim=attrgetter("head_dim"),
                      cross_when_passed=True)
_T5_SELF = AttentionKind(inner=attrgetter("SelfAttention"), kv_dim=attrgetter("inner_dim"),
                         head_dim=attrgetter("key_value_proj_dim"))
_T5_CROSS = AttentionKind(inner=attrgetter("EncDecAttention"), kv_dim=attrgetter("inner_dim"),
                          head_dim=attrgetter("key_value_proj_dim"), always_cross=True)
_T5_ATTN = AttentionKind(inner=_itself, kv_dim=attrgetter("inner_dim"), head_dim=attrgetter("key_value_proj_dim"),
                         cross_when_passed=True)


def _fused_kv_dim(module: nn.Module) -> int:
    """Key width of an attention with one fused ``qkv_proj`` (Phi-3): kv heads x head size."""
    return int(module.config.num_key_value_heads) * int(module.head_dim)


# Phi-3 projects q, k and v with one Linear, so the key width comes from the config.
_FUSED = AttentionKind(inner=_itself, kv_dim=_fused_kv_dim, head_dim=attrgetter("head_dim"))
_DISTILBERT = AttentionKind(inner=_itself, kv_dim=attrgetter("k_lin.out_features"),
                            head_dim=attrgetter("attention_head_size"), placeholder=("k_lin", "v_lin"))

#: attention class name -> how to insert prefixes. Classes of one family share an entry.
ATTENTION_KINDS: Dict[str, AttentionKind] = {
    "BertAttention": BERT, "RobertaAttention": BERT, "XLMRobertaAttention": BERT,
    "DistilBertSelfAttention": _DISTILBERT,
    "GPT2Attention": GPT2,
    "OPTAttention": _PROJ,
    "T5LayerSelfAttention": _T5_SELF, "MT5LayerSelfAttention": _T5_SELF,
    "T5LayerCrossAttention": _T5_CROSS, "MT5LayerCrossAttention": _T5_CROSS,
    "T5Attention": _T5_ATTN, "MT5Attention": _T5_ATTN,
    "BartAttention": _BART,
    "LlamaAttention": _PROJ, "Qwen2Attention": _PROJ, "MistralAttention": _PROJ,
    "Qwen3Attention": _PROJ, "Gemma3Attention": _PROJ, "Phi3Attention": _FUSED,
    # Whisper's encoder, decoder and cross-attention share BART's class layout.
    "WhisperAttention": _BART,
}
#: T5 layers whose position bias is shared along a stack.
T5_LAYERS = ("T5LayerSelfAttention", "T5LayerCrossAttention", "MT5LayerSelfAttention", "MT5LayerCrossAttention")
SUPPORTED_ARCHITECTURES = ("BERT", "RoBERTa", "DistilBERT", "GPT-2", "OPT", "T5", "BART", "Llama",
                           "Qwen2", "Mistral", "Qwen3", "Gemma 3", "Phi-3", "Whisper")
SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa")


# --------------------------------------------------------------------------- roles
@dataclass(frozen=True)
class AttentionRoles:
    """The arguments of one attention class, by role (see :mod:`.roles`).

    ``cache`` is ``None`` only for classes that take no cache (DistilBERT);
    ``cache_position`` (transformers < 5.24) and ``cross`` are ``None`` when absent.
    """

    hidden: Argument
    mask: Argument
    cache: Optional[Argument]
    cache_position: Optional[Argument]
    cross: Optional[Argument]


@functools.lru_cache(maxsize=None)
def attention_roles(cls: type, needs_cache: bool = True, user: str = "PrefixModel") -> AttentionRoles:
    """The roles of ``cls.forward``'s arguments, read once per class.

    Raises:
        UnsupportedSignatureError: no hidden-state or attention-mask argument, or no cache
            argument although ``needs_cache`` (the message names ``cls``, the installed
            transformers version and the tested range).
    """
    hidden = require_argument(cls, "hidden", user)
    mask = require_argument(cls, "mask", user)
    cache = require_argument(cls, "cache", user) if needs_cache else find_argument(cls, "cache")
    return AttentionRoles(hidden, mask, cache, find_argument(cls, "cache_position"), find_argument(cls, "cross"))


def is_causal(inner: nn.Module) -> bool:
    """Whether the attention ``inner`` masks future positions: its ``is_causal`` attribute;
    else ``is_decoder`` (T5 before 5.x had no ``is_causal``); else causal, as transformers'
    SDPA integration assumes."""
    for attribute in ("is_causal", "is_decoder"):
        value = getattr(inner, attribute, None)
        if isinstance(value, bool):
            return value
    return True


# --------------------------------------------------------------------------- cache view
class PrefixedCache:
    """A view of a transformers ``Cache`` (or of none) with prefix keys/values in front.

    Given to one attention call as its cache argument. ``update`` stores the real
    keys/values in ``inner`` and returns ``[prefix; cached + new]`` along the sequence axis;
    ``get_seq_length`` counts the ``P`` prefix positions. Positions seen through the view
    are shifted by ``P`` (the caller shifts ``cache_position``); ``update`` shifts a
    ``cache_position`` it is given back before the inner cache sees it.

    Args:
        inner: the caller's cache layer collection (a ``DynamicCache``, the self-attention
            part of an ``EncoderDecoderCache``, another view), or ``None``.
        key, value: ``[batch, kv_heads, P, head_dim]``.
        expected_length: if given, the real key length the attention mask was built for; a
            cache returning another length (a static cache) raises instead of misaligning.
    """

    def __init__(self, inner: Any, key: torch.Tensor, value: torch.Tensor,
                 expected_length: Optional[int] = None):
        self.inner, self.key, self.value = inner, key, value
        self.expected_length = expected_length

    @property
    def num_prefixes(self) -> int:
        return self.key.shape[-2]

    def __bool__(self) -> bool:
        """Truth as the cache it wraps (a view of no cache is false, like an empty
        ``DynamicCache``): Whisper's cross-attention in transformers 5.0 tests ``if cache``
        before reading a flag it only sets for an ``EncoderDecoderCache``."""
        return bool(self.inner) if self.inner is not None else False

    def _unshift(self, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("cache_position"), torch.Tensor):
            return {**value, "cache_position": value["cache_position"] - self.num_prefixes}
        return value

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.inner is not None:
            args = tuple(self._unshift(a) for a in args)
            kwargs = {k: self._unshift(v) for k, v in kwargs.items()}
            key_states, value_states = self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.expected_length is not None and key_states.shape[-2] != self.expected_length:
            raise NotImplementedError(
                f"prefix tuning needs a cache that returns exactly the tokens seen so far "
                f"(got {key_states.shape[-2]} positions, expected {self.expected_length}); static "
                "or sliding caches are not supported: use the default dynamic cache")
        key = torch.cat([self.key.to(key_states.dtype), key_states], dim=-2)
        value = torch.cat([self.value.to(value_states.dtype), value_states], dim=-2)
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Length of the viewed sequence: the ``P`` prefix positions plus what is cached.

        T5 reads this to place queries when computing relative position biases, so its
        prefixes sit at positions ``-P .. -1`` and real tokens keep their true distances.
        """
        past = self.inner.get_seq_length(layer_idx) if self.inner is not None else 0
        return self.num_prefixes + past


def inner_cache(cache: Any) -> Any:
    """The self-attention part of an ``EncoderDecoderCache``; any other cache as it is."""
    return getattr(cache, "self_attention_cache", cache)


# --------------------------------------------------------------------------- mask
def extend_mask(mask: Optional[torch.Tensor], num: int, causal: bool, query_length: int,
                key_length: int, past_length: int, dtype: torch.dtype, device: torch.device,
                rows: bool = False) -> Optional[torch.Tensor]:
    """The attention mask with ``num`` always-visible key columns in front.

    ``mask`` is a 4-D ``[batch | 1, heads | 1, query, key]`` mask, boolean (``True`` =
    visible) or additive float, or ``None``. ``None`` stays ``None`` for bidirectional
    attention and single-query steps; for causal attention over several queries an explicit
    additive mask ``[1, 1, query, num + key]`` is built (query ``i`` sees real key ``j`` iff
    ``j <= past_length + i``). ``rows`` also prepends ``num`` all-visible query rows
    (DistilBERT's placeholder positions).
    """
    if mask is None:
        if not causal or query_length == 1:
            return None
        keys = torch.arange(key_length, device=device)
        queries = torch.arange(query_length, device=device) + past_length
        visible = torch.cat([torch.ones(query_length, num, dtype=torch.bool, device=device),
                             keys[None, :] <= queries[:, None]], dim=1)
        mask = torch.zeros(visible.shape, dtype=dtype, device=device)
        return mask.masked_fill(~visible, torch.finfo(dtype).min)[None, None]
    if mask.dim() != 4:
        raise NotImplementedError(
            f"prefix tuning expects a 4-D attention mask inside the attention layer, got shape "
            f"{tuple(mask.shape)}; use attn_implementation='eager' or 'sdpa'")
    fill = True if mask.dtype == torch.bool else 0
    mask = torch.cat([mask.new_full((*mask.shape[:-1], num), fill), mask], dim=-1)
    if rows and mask.shape[-2] != 1:
        mask = torch.cat([mask.new_full((*mask.shape[:-2], num, mask.shape[-1]), fill), mask], dim=-2)
    return mask
