"""Prefix tuning: trainable key/value vectors prepended in every targeted attention layer.

Li & Liang, 2021. Each targeted attention attends over ``P = prefix_token_num`` extra
key/value positions before the real ones. The prefixes go in through transformers' public
``Cache`` API: for the duration of one attention call the host receives a *cache view*
(:class:`~opendelta.integrations.transformers.attention.PrefixedCache`) whose
``update(key, value, layer_idx)`` stores the real keys and values in the caller's cache (if
any) and returns them with the prefix prepended. So

* the cache only ever holds real tokens: ``generate()`` and position ids are unchanged;
* prefixes are never rotated (RoPE is applied to the real keys before ``update``), so a
  cached and an uncached forward see the same prefix at every step;
* the attention mask gets ``P`` always-visible columns in front (padded batches work);
  where the model passed no mask (SDPA's fast path) but attention is causal, an explicit
  causal mask is built, since SDPA's implicit one would be misaligned by ``P`` columns.

The attention's hidden-state, mask and cache arguments are found by role, not by name
(:mod:`opendelta.integrations.transformers.roles`): transformers 5.24 renamed
``past_key_values`` to ``cache``. An attention signature without them raises an error
naming the class, the installed transformers version and the tested range.

With ``reparameterize=True`` (the default, as in OpenDelta) the prefixes of all layers are
produced by one MLP, ``wte [P, embed_dim] -> Linear(embed_dim, mid_dim) -> Tanh ->
Linear(mid_dim, sum of 2 * kv_dim)``, held by the first targeted attention as child
``reparams`` (the names OpenDelta 0.3.2 used, so its checkpoints load). Each layer
computes its own slice of the MLP's output on every forward: nothing is cached between
calls, gradients are exact, and a forward through only part of the model (a decoder step)
needs no state from elsewhere. :meth:`PrefixModel.export_prefixes` replaces the MLP by the
key/value tensors it computes, for inference.

Supported: BERT, RoBERTa (XLM-R), DistilBERT, GPT-2, OPT, T5 (MT5), BART, Llama, Qwen2 and
Mistral, with the ``eager`` and ``sdpa`` attention implementations. DistilBERT's attention
has no cache argument: there ``P`` placeholder positions are prepended to the attention's
input, the key/value projections write the prefixes into them and the outputs at those
positions are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.base import DeltaBase
from ..core.config import BaseDeltaConfig
from ..core.fields import boolean, integer, validated
from ..core.dispatch import peek_call_value, pop_call_value, push_call_value
from ..core.layers import DeltaLayer
from ..core.registry import registered
from ..core.structure import TowerStructureMap
from ..integrations.transformers.attention import (ATTENTION_KINDS, BERT, GPT2, SUPPORTED_ARCHITECTURES,
                                                   SUPPORTED_IMPLEMENTATIONS, T5_LAYERS, AttentionKind,
                                                   PrefixedCache, attention_roles, extend_mask, inner_cache,
                                                   is_causal)
from ..integrations.transformers.roles import cache_length

__all__ = ["PrefixConfig", "PrefixLayer", "PrefixModel", "PrefixReparameterization", "PrefixSlot",
           "PrefixedCache", "SUPPORTED_ARCHITECTURES"]


@dataclass
class PrefixConfig(BaseDeltaConfig):
    """Args:
        prefix_token_num: number ``P`` of prefix positions per attention layer (> 0). Default 6.
        reparameterize: produce the prefixes with an MLP shared by all layers (trains more
            stably); ``False`` learns them directly. Default ``True``.
        embed_dim: width of the MLP's input embedding (> 0). Default 512.
        mid_dim: width of the MLP's hidden layer (> 0). Default 512.
    """

    delta_type = "prefix"
    prefix_token_num: int = validated(6, integer(minimum=1))
    reparameterize: bool = validated(True, boolean())
    embed_dim: int = validated(512, integer(minimum=1))
    mid_dim: int = validated(512, integer(minimum=1))


# --------------------------------------------------------------------------- layers
class PrefixReparameterization(DeltaLayer):
    """The MLP producing every layer's prefixes (OpenDelta's ``reparams``).

    ``wte`` ``[P, embed_dim]`` -> ``control_trans`` = ``Linear(embed_dim, mid_dim)``, Tanh,
    ``Linear(mid_dim, out_dim)``; per prefix position the ``out_dim`` outputs are, layer
    after layer, that layer's key (``kv_dim``) then value (``kv_dim``). It runs no hook of its
    own: each :class:`PrefixLayer` asks for its slice.
    """

    uses_post_hook = False
    supports_routing = False

    def __init__(self, prefix_token_num: int, embed_dim: int, mid_dim: int, out_dim: int,
                 device: Any = None, dtype: Any = None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.wte = nn.Embedding(prefix_token_num, embed_dim, **factory)
        self.control_trans = nn.Sequential(nn.Linear(embed_dim, mid_dim, **factory), nn.Tanh(),
                                           nn.Linear(mid_dim, out_dim, **factory))

    def key_value(self, offset: int, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Key and value ``[P, dim]`` of the layer whose outputs start at ``offset``.

        Only the ``2 * dim`` rows of the last Linear that this layer uses are computed.
        """
        hidden = self.control_trans[1](self.control_trans[0](self.wte.weight))
        last = self.control_trans[2]
        bias = last.bias[offset:offset + 2 * dim] if last.bias is not None else None
        out = F.linear(hidden, last.weight[offset:offset + 2 * dim], bias)
        return out[:, :dim], out[:, dim:]


class PrefixLayer(DeltaLayer):
    """Prefixes of one attention module (its host).

    Holds ``past_key`` / ``past_value`` ``[P, kv_dim]`` when not reparameterised; otherwise
    reads its slice of a shared :class:`PrefixReparameterization` (kept outside this
    module's children, so its parameters have one name). Shapes given to the attention:
    ``[batch, kv_dim // head_dim, P, head_dim]``.
    """

    uses_pre_hook = True
    uses_post_hook = False
    #: prefixes change the key sequence of all rows; per-example routing cannot slice them
    supports_routing = False

    def __init__(self, host: nn.Module, prefix_token_num: int, kv_dim: int, head_dim: int,
                 learn_directly: bool, device: Any = None, dtype: Any = None):
        super().__init__()
        # The attention class name, not the table entry: layers stay picklable.
        self.host_class = type(host).__name__
        self.prefix_token_num, self.kv_dim, self.head_dim = prefix_token_num, kv_dim, head_dim
        # DistilBERT drops its placeholder outputs after the host ran.
        self.uses_post_hook = self.kind.placeholder is not None
        self.reparams_offset = 0
        self.__dict__["reparams"] = None  # a reference, not a child
        if learn_directly:
            self.past_key = nn.Parameter(torch.randn(prefix_token_num, kv_dim, device=device, dtype=dtype))
            self.past_value = nn.Parameter(torch.randn(prefix_token_num, kv_dim, device=device, dtype=dtype))
        else:
            self.register_parameter("past_key", None)
            self.register_parameter("past_value", None)

    @property
    def kind(self) -> AttentionKind:
        return ATTENTION_KINDS[self.host_class]

    def set_reparameterization(self, reparams: Optional[PrefixReparameterization], offset: int = 0) -> None:
        self.__dict__["reparams"] = reparams
        self.reparams_offset = offset

    def key_value(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """This layer's key and value prefixes, ``[P, kv_dim]`` each."""
        reparams = self.__dict__["reparams"]
        if reparams is not None:
            return reparams.key_value(self.reparams_offset, self.kv_dim)
        if self.past_key is None:
            raise RuntimeError("this prefix layer has lost its reparameterization network")
        return self.past_key, self.past_value

    def _heads(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        # [P, kv_dim] -> [batch, kv_heads, P, head_dim] (OpenDelta's split into heads).
        x = x.reshape(self.prefix_token_num, -1, self.head_dim).transpose(0, 1)
        return x.unsqueeze(0).expand(batch, *x.shape)

    def pre_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
        kind = self.kind
        roles = attention_roles(type(host), needs_cache=kind.placeholder is None)
        call_args, call_kwargs = list(args), dict(kwargs)
        hidden = roles.hidden.get(call_args, call_kwargs)
        batch, query_length = hidden.shape[0], hidden.shape[1]
        inner = kind.inner(host)
        implementation = getattr(getattr(inner, "config", None), "_attn_implementation", None) or "eager"
        if implementation not in SUPPORTED_IMPLEMENTATIONS:
            raise NotImplementedError(
                f"prefix tuning supports attn_implementation {SUPPORTED_IMPLEMENTATIONS}, this model "
                f"uses {implementation!r}; load it with attn_implementation='sdpa'")
        key, value = self.key_value()
        num = self.prefix_token_num
        mask = roles.mask.get(call_args, call_kwargs)
        # A mask built from scratch is additive, in the hidden dtype (right for eager and SDPA).
        mask_dtype = hidden.dtype if hidden.is_floating_point() else key.dtype
        if kind.placeholder is not None:
            placeholders = hidden.new_zeros(batch, num, hidden.shape[-1])
            roles.hidden.set(call_args, call_kwargs, torch.cat([placeholders, hidden], 1))
            roles.mask.set(call_args, call_kwargs, extend_mask(mask, num, False, query_length, query_length, 0,
                                                               mask_dtype, hidden.device, rows=True))
            # Read by the PrefixSlots of the key/value projections, popped by post_forward.
            push_call_value(self, (key, value))
            return tuple(call_args), call_kwargs

        assert roles.cache is not None  # attention_roles requires it without a placeholder
        cross_states = roles.cross.get(call_args, call_kwargs) if roles.cross is not None else None
        cross = kind.always_cross or (kind.cross_when_passed and cross_states is not None)
        if cross:
            if cross_states is None:
                raise ValueError(f"{type(host).__name__} was called without the states to attend to")
            # Cross-attention keys are recomputed from the encoder states at every call,
            # never stored: the caller's cross-attention cache would append them again.
            cache, past, key_length = None, 0, cross_states.shape[1]
        else:
            cache = inner_cache(roles.cache.get(call_args, call_kwargs))
            past = cache_length(cache, getattr(inner, "layer_idx", None) or 0)
            key_length = past + query_length
            # transformers < 5.24 also place queries by cache_position (T5's position bias):
            # through the view they sit P positions further (the view shifts it back for the cache).
            cache_position = roles.cache_position
            position = cache_position.get(call_args, call_kwargs) if cache_position is not None else None
            if cache_position is not None and isinstance(position, torch.Tensor):
                cache_position.set(call_args, call_kwargs, position + num)
        causal = is_causal(inner) and not cross
        new_mask = extend_mask(mask, num, causal, query_length, key_length, past, mask_dtype, hidden.device)
        built = mask is None and new_mask is not None
        roles.mask.set(call_args, call_kwargs, new_mask)
        roles.cache.set(call_args, call_kwargs, PrefixedCache(
            cache, self._heads(key, batch), self._heads(value, batch), expected_length=key_length if built else None))
        return tuple(call_args), call_kwargs

    # DistilBERT: the placeholder rows are dropped from the attention's output.
    def post_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> Any:
        pop_call_value(self, None)
        num = self.prefix_token_num
        attn_output, *rest = output
        weights = rest[0] if rest else None
        if isinstance(weights, torch.Tensor):
            rest[0] = weights[:, :, num:]
        return (attn_output[:, num:], *rest)

    def extra_repr(self) -> str:
        return f"prefix_token_num={self.prefix_token_num}, kv_dim={self.kv_dim}, head_dim={self.head_dim}"


class PrefixSlot(DeltaLayer):
    """DistilBERT only: writes a :class:`PrefixLayer`'s key or value prefix over the
    placeholder positions of its host projection's output ``[batch, P + seq, kv_dim]``.

    The prefixes come from the owner's pre-hook of the same forward pass, through
    :func:`~opendelta.core.dispatch.peek_call_value` (per thread: concurrent forwards of one
    model do not see each other's)."""

    supports_routing = False

    def __init__(self, owner: PrefixLayer, which: int):
        super().__init__()
        self.__dict__["owner"] = owner
        self.which = which  # 0: key, 1: value

    def post_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                     output: torch.Tensor) -> torch.Tensor:
        active = peek_call_value(self.__dict__["owner"])
        if active is None:  # the projection was called outside its attention module
            return output
        prefix = active[self.which].to(output.dtype)
        num = prefix.shape[0]
        return torch.cat([prefix.unsqueeze(0).expand(output.shape[0], *prefix.shape), output[:, num:]], dim=1)


# --------------------------------------------------------------------------- delta model
def _unsupported(name: str, module: nn.Module, model: nn.Module) -> NotImplementedError:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = f" ({model_type})" if model_type else ""
    return NotImplementedError(
        f"PrefixModel cannot insert prefixes into {name!r}, a {type(module).__name__}{arch}: prefix "
        f"tuning is implemented for the attention modules of {', '.join(SUPPORTED_ARCHITECTURES)} "
        f"(classes {', '.join(sorted(ATTENTION_KINDS))}). Target the attention blocks of one of those, or use "
        "another delta method (LoRA, Adapter, SoftPrompt) for this architecture.")


@registered(aliases=["prefix_tuning"])
class PrefixModel(DeltaBase):
    """Prefix tuning on the attention modules of supported transformers models.

    Default targets: the self-attention of every block (``attn``) and, in encoder-decoder
    models, the decoder's cross-attention (``crossattn``), as in Li & Liang. Hyperparameters:
    see :class:`PrefixConfig`. Beyond :class:`DeltaBase`: :meth:`prefix_layers`,
    :meth:`prefixes` (the key/value tensors each attention sees) and :meth:`export_prefixes`.

    Cost note: a modified cross-attention recomputes its encoder keys/values at every
    decoding step instead of reading them from the cache (the cache keeps no prefixes).

    Raises:
        NotImplementedError: a target is an attention module of an unsupported architecture
            (the message names it and lists the supported ones).
        ValueError: a T5 stack would get prefixes on some but not all of its attention
            layers of one kind (they share one relative position bias).
    """

    delta_type = "prefix"
    config_class = PrefixConfig
    default_modified_modules = ["attn", "crossattn"]
    layer_name = "prefix"

    def add_all_deltas(self, targets: Sequence[str]) -> None:
        modules = dict(self.backbone_model.named_modules())
        # Validate every target before touching the backbone: an error leaves it unmodified.
        kinds = []
        for name in targets:
            module = modules[name]
            kind = ATTENTION_KINDS.get(type(module).__name__)
            if kind is None or (getattr(module, "is_cross_attention", False) and kind in (BERT, GPT2)):
                raise _unsupported(name, module, self.backbone_model)
            attention_roles(type(module), needs_cache=kind.placeholder is None)
            kinds.append(kind)
        self._check_t5_stacks(targets, modules)

        cfg = self.config
        layers: List[PrefixLayer] = []
        groups: Dict[Optional[str], List[int]] = {}  # tower -> positions: one MLP per tower
        for name, kind in zip(targets, kinds):
            module = modules[name]
            inner = kind.inner(module)
            layer = PrefixLayer(module, cfg.prefix_token_num, kind.kv_dim(inner), kind.head_dim(inner),
                                learn_directly=not cfg.reparameterize, **self.factory_kwargs(module))
            self.insert_layer(name, layer)
            if kind.placeholder is not None:
                for which, proj in enumerate(kind.placeholder):
                    self.insert_layer(f"{name}.{proj}", PrefixSlot(layer, which))
            groups.setdefault(self._tower_of(name), []).append(len(layers))
            layers.append(layer)
        if cfg.reparameterize:
            for positions in groups.values():
                self._add_reparameterization(targets[positions[0]], [layers[i] for i in positions])

    def _tower_of(self, name: str) -> Optional[str]:
        """The known backbone holding ``name`` in a user model of several (``None``: one model)."""
        mapping = self.structure_mapping
        return mapping.tower_of(name) if isinstance(mapping, TowerStructureMap) else None

    def _add_reparameterization(self, first_target: str, layers: List[PrefixLayer]) -> None:
        host = self.backbone_model.get_submodule(first_target)
        cfg = self.config
        offsets = [0]
        for layer in layers:
            offsets.append(offsets[-1] + 2 * layer.kv_dim)
        reparams = PrefixReparameterization(cfg.prefix_token_num, cfg.embed_dim, cfg.mid_dim, offsets[-1],
                                            **self.factory_kwargs(host))
        for layer, offset in zip(layers, offsets):
            layer.set_reparameterization(reparams, offset)
        name, i = "reparams", 0
        while name in host._modules:
            i += 1
            name = f"reparams_{i}"
        self.insert_layer(first_target, reparams, child_name=name)

    @staticmethod
    def _check_t5_stacks(targets: Sequence[str], modules: Dict[str, nn.Module]) -> None:
        """T5 passes one position bias from the first layer of a stack to the others, so all
        attention layers of one kind in a stack must have the same number of positions."""
        groups: Dict[Tuple[str, str], List[str]] = {}
        for name, module in modules.items():
            if type(module).__name__ in T5_LAYERS:
                stack = name.rsplit(".block.", 1)[0]
                groups.setdefault((stack, type(module).__name__), []).append(name)
        chosen = set(targets)
        for names in groups.values():
            hit = [n for n in names if n in chosen]
            if hit and len(hit) != len(names):
                missing = [n for n in names if n not in chosen]
                raise ValueError(
                    f"T5 attention layers of one stack share one position bias, so prefixes must go "
                    f"into all of them or none; also target {missing}")

    # ------------------------------------------------------------------ prefixes
    def prefix_layers(self) -> List[Tuple[str, PrefixLayer]]:
        """``(host module name, layer)`` of every attention this delta modifies."""
        return [(e.host_name, e.layer) for e in self.layer_entries() if isinstance(e.layer, PrefixLayer)]

    @torch.no_grad()
    def prefixes(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Host module name -> ``(key, value)``, each ``[P, kv_dim]``: what the attention sees."""
        return {host: tuple(t.detach().clone() for t in layer.key_value())
                for host, layer in self.prefix_layers()}

    @torch.no_grad()
    def export_prefixes(self) -> None:
        """Replace the reparameterisation MLP by the prefixes it computes.

        Afterwards every modified attention holds ``prefix.past_key`` / ``prefix.past_value``
        (trainable if the MLP was), ``config.reparameterize`` is ``False`` and outputs are
        unchanged. A no-op when the prefixes are already learnt directly.
        """
        reparams = [e for e in self.layer_entries() if isinstance(e.layer, PrefixReparameterization)]
        if not reparams:
            return
        trainable = any(p.requires_grad for e in reparams for p in e.layer.parameters())
        for _, layer in self.prefix_layers():
            key, value = layer.key_value()
            layer.past_key = nn.Parameter(key.detach().clone(), requires_grad=trainable)
            layer.past_value = nn.Parameter(value.detach().clone(), requires_grad=trainable)
            layer.set_reparameterization(None)
        for entry in reparams:
            self.remove_layer(entry)
        self.config = self.config.copy(reparameterize=False)
