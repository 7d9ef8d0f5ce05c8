"""SoftPrompt: trainable embeddings prepended to the input embeddings (prompt tuning).

Lester et al., 2021. ``soft_token_num`` vectors are put in front of the input embeddings of
the model (of its encoder, for encoder-decoder models), through a forward pre-hook on the
backbone (on its encoder). The model sees ``n = soft_token_num`` extra leading positions:

* ``input_ids`` become ``inputs_embeds`` (the caller may pass ``inputs_embeds`` directly);
* every tensor named in ``other_expand_ids`` that covers the input sequence is extended at
  the front with its value (``attention_mask`` with 1, ``token_type_ids`` with 0);
  ``position_ids`` and ``cache_position`` (transformers < 5.24), if given, become
  ``0 .. n-1`` followed by the given ones shifted by ``n``;
* token-level ``labels`` (decoder-only and masked language models) get ``n`` leading ``-100``,
  so the loss is unchanged; the outputs (logits, hidden states) keep the ``n`` prompt
  positions at the front, as in OpenDelta;
* for encoder-decoder models a parameterless layer on the model extends the
  ``attention_mask`` seen by the decoder's cross-attention;
* ``generate()`` with a KV cache: only the first step (empty cache) gets the prompt; later
  steps get the attention mask extended and the positions shifted, consistently with the
  cached prompt. The cache argument is found by role (``cache`` since transformers 5.24,
  ``past_key_values`` before; :mod:`opendelta.integrations.transformers.roles`).

Decoder-only sequence classifiers (``GPT2ForSequenceClassification``, ...) cannot find the
last real token in ``inputs_embeds`` and pool the last position: pad such batches on the left.
A missing ``attention_mask`` stays missing (every position is attended), unlike OpenDelta
which inferred one from token id 0. Only 2-D attention masks can be extended (the default
dynamic cache; not static caches, whose masks ``generate`` builds in 4-D).

The parameter is ``soft_prompt_layer.soft_embeds`` ``[n, hidden]`` on the model (or its
encoder), as saved by OpenDelta 0.3.2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.base import DeltaBase
from ..core.config import BaseDeltaConfig
from ..core.fields import boolean, integer, mapping, number, validated
from ..core.layers import DeltaLayer, call_as_kwargs
from ..core.registry import registered
from ..core.structure import find_towers
from ..integrations.transformers.roles import cache_length, passed_key

IGNORE_INDEX = -100


def default_expand_ids() -> Dict[str, int]:
    return {"attention_mask": 1, "token_type_ids": 0}


@dataclass
class SoftPromptConfig(BaseDeltaConfig):
    """Args:
        soft_token_num: number of soft tokens ``n`` (> 0). Default 100.
        init_range: with ``token_init=False``, soft tokens start uniform in
            ``[-init_range, init_range]``. Default 0.5.
        token_init: soft token ``i`` starts as the embedding of token id ``i`` (cycling
            through the vocabulary if it has fewer than ``n`` tokens). Default True.
        other_expand_ids: inputs extended along with the sequence, and the value of their
            ``n`` new leading entries. Default ``{"attention_mask": 1, "token_type_ids": 0}``.
    """

    delta_type = "soft_prompt"
    soft_token_num: int = validated(100, integer(minimum=1))
    init_range: float = validated(0.5, number(minimum=0))
    token_init: bool = validated(True, boolean())
    other_expand_ids: Dict[str, Any] = validated(default_factory=default_expand_ids,
                                                 rule=mapping(number(allow_bool=True)))


# --------------------------------------------------------------------------- helpers
def _shift_positions(positions: torch.Tensor, n: int, first_step: bool) -> torch.Tensor:
    """Positions (``[..., length]``) of a call seen after ``n`` prompt positions: shifted
    by ``n``, preceded by the prompt's own ``0 .. n-1`` on the step that adds the prompt."""
    if not first_step:
        return positions + n
    front = torch.arange(n, dtype=positions.dtype, device=positions.device).expand(*positions.shape[:-1], n)
    return torch.cat([front, positions + n], dim=-1)


def _prepend(tensor: torch.Tensor, n: int, value: Any, name: str) -> torch.Tensor:
    """``tensor`` (``[batch, length]``) with ``n`` leading columns of ``value``."""
    if tensor.dim() != 2:
        raise ValueError(f"SoftPrompt can only extend 2-D {name} ([batch, length]); got shape "
                         f"{tuple(tensor.shape)}. With generate(), use the default dynamic cache.")
    front = torch.full((tensor.shape[0], n), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([front, tensor], dim=1)


def input_embedding(module: nn.Module) -> nn.Module:
    """The input embedding module of ``module`` (``get_input_embeddings()``)."""
    try:
        embedding = module.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    if not isinstance(embedding, nn.Module):
        raise ValueError(f"SoftPrompt needs the input embedding of {type(module).__name__}, which has no "
                         "working get_input_embeddings(); SoftPrompt applies to transformers models")
    return embedding


# --------------------------------------------------------------------------- layers
class SoftPromptLayer(DeltaLayer):
    """Prepends ``soft_embeds`` (``[n, hidden]``) to the input embeddings of its host
    (the model, or its encoder): ``inputs_embeds`` ``[batch, length, hidden]`` ->
    ``[batch, n + length, hidden]``; see the module documentation for the other inputs."""

    uses_pre_hook = True
    uses_post_hook = False

    def __init__(self, soft_embeds: torch.Tensor, other_expand_ids: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.soft_embeds = nn.Parameter(soft_embeds)
        self.other_expand_ids = dict(default_expand_ids() if other_expand_ids is None else other_expand_ids)

    @property
    def num_tokens(self) -> int:
        return self.soft_embeds.shape[0]

    def pre_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]
                    ) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        kwargs = call_as_kwargs(host, args, kwargs)
        n = self.num_tokens
        # The cache by role: transformers 5.24 renamed the model's past_key_values to cache.
        cache_key = passed_key(type(host), "cache", kwargs)
        past = cache_length(kwargs[cache_key]) if cache_key is not None else 0
        embeds, ids = kwargs.get("inputs_embeds"), kwargs.get("input_ids")
        if embeds is None and ids is None:
            raise ValueError("SoftPrompt needs input_ids or inputs_embeds in the model call")
        first_step = past == 0
        if first_step:
            if embeds is None:
                embeds = input_embedding(host)(ids)
            prompt = self.soft_embeds.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
            kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
            kwargs["input_ids"] = None
            # Inputs covering the whole sequence without the prompt get the prompt's part.
            full_length = embeds.shape[1]
        else:  # the cache already holds the prompt
            full_length = past + (embeds if embeds is not None else ids).shape[1] - n
        for key, value in self.other_expand_ids.items():
            tensor = kwargs.get(key)
            if isinstance(tensor, torch.Tensor) and tensor.shape[-1] == full_length:
                kwargs[key] = _prepend(tensor, n, value, key)
        # Positions the caller counted without the prompt: position_ids and (transformers
        # < 5.24, where the masks are sized by it) cache_position.
        for role in ("position_ids", "cache_position"):
            position_key = passed_key(type(host), role, kwargs)
            if position_key is not None and isinstance(kwargs[position_key], torch.Tensor):
                kwargs[position_key] = _shift_positions(kwargs[position_key], n, first_step)
        labels = kwargs.get("labels")
        if (first_step and isinstance(labels, torch.Tensor) and labels.dim() == 2
                and not labels.is_floating_point() and labels.shape[1] == full_length):
            kwargs["labels"] = _prepend(labels, n, IGNORE_INDEX, "labels")
        return (), kwargs

    def extra_repr(self) -> str:
        return f"soft_token_num={self.num_tokens}, other_expand_ids={self.other_expand_ids}"


class SoftPromptMaskLayer(DeltaLayer):
    """On an encoder-decoder model: extends the ``attention_mask`` that the decoder's
    cross-attention reads by the ``n`` prompt positions the encoder added (the encoder's own
    :class:`SoftPromptLayer` leaves an already extended mask as it is)."""

    uses_pre_hook = True
    uses_post_hook = False

    def __init__(self, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens

    def pre_forward(self, host: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]
                    ) -> Optional[Tuple[Tuple[Any, ...], Dict[str, Any]]]:
        kwargs = call_as_kwargs(host, args, kwargs)
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor):
            return None
        n = self.num_tokens
        encoder_outputs = kwargs.get("encoder_outputs")
        if encoder_outputs is not None:  # generate() ran the encoder already, prompt included
            length = encoder_outputs[0].shape[1] - n
        else:
            source = kwargs.get("inputs_embeds")
            source = kwargs.get("input_ids") if source is None else source
            if source is None:
                return None
            length = source.shape[1]
        if mask.shape[-1] == length:
            kwargs["attention_mask"] = _prepend(mask, n, 1, "attention_mask")
        return (), kwargs

    def extra_repr(self) -> str:
        return f"soft_token_num={self.num_tokens}"


# --------------------------------------------------------------------------- model
@registered(aliases=["softprompt", "soft_prompt", "prompt_tuning"])
class SoftPromptModel(DeltaBase):
    """Prompt tuning: ``soft_token_num`` trainable embeddings in front of the input.
    It takes no ``modified_modules`` (OpenDelta's ``["root"]`` is accepted).
    Hyperparameters: see :class:`SoftPromptConfig`.

    Raises:
        ValueError: ``modified_modules`` other than ``None`` / ``["root"]``; the backbone
            has no input embedding.
    """

    delta_type = "soft_prompt"
    config_class = SoftPromptConfig
    default_modified_modules: List[str] = []
    layer_name = "soft_prompt_layer"

    @staticmethod
    def _encoder_name(model: nn.Module) -> Optional[str]:
        """Name of the encoder of an encoder-decoder ``model`` (``None`` for other models)."""
        if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            return None
        encoder = model.get_encoder()
        for name, module in model.named_modules():
            if module is encoder:
                return name
        raise ValueError(f"cannot find the encoder of {type(model).__name__} among its modules")

    def _prompted_models(self) -> List[str]:
        """Paths of the models that get a prompt: the backbone itself, or, for a user model
        holding known backbones (a two-tower retriever), each of those towers."""
        backbone = self.backbone_model
        try:
            input_embedding(backbone)
            return [""]
        except ValueError as own_error:
            towers = sorted(find_towers(backbone, skip=(DeltaLayer,)))
            if not towers:
                raise own_error
            return towers

    def _tower_keys(self, keys: Sequence[str]) -> Dict[str, str]:
        return {}  # tower names select towers here, see resolve_targets

    def resolve_targets(self, keys: Sequence[str], uses_defaults: bool = False) -> List[str]:
        """The models to prompt (``""``: the backbone): all of them, or the towers named."""
        models = self._prompted_models()
        if uses_defaults or list(keys) in ([], ["root"]):
            return models
        unknown = [k for k in keys if k not in models or k == ""]
        if unknown:
            raise ValueError(f"SoftPrompt modifies a model's input embeddings and takes no modified_modules "
                             f"(got {list(keys)}); leave modified_modules as None"
                             + (f", or name some of the towers {models}" if models != [""] else ""))
        return [m for m in models if m in keys]

    def add_all_deltas(self, targets: Sequence[str]) -> None:
        for path in targets:
            model = self.backbone_model.get_submodule(path) if path else self.backbone_model
            encoder = self._encoder_name(model)
            host_name = ".".join(p for p in (path, encoder) if p)
            host = model if encoder is None else model.get_submodule(encoder)
            layer = SoftPromptLayer(self._initial_embeds(input_embedding(host)), self.config.other_expand_ids)
            self.insert_layer(host_name, layer)
            if encoder is not None:
                self.insert_layer(path, SoftPromptMaskLayer(layer.num_tokens), f"{self.layer_attr}_mask")

    def _initial_embeds(self, embedding: nn.Module) -> torch.Tensor:
        """``[n, hidden]`` start values, on the embedding's device, in ``delta_dtype`` if
        given, else the embedding's dtype (the prompt is cast to the embeddings' dtype when
        it is prepended)."""
        cfg, n = self.config, self.config.soft_token_num
        weight = getattr(embedding, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"SoftPrompt cannot read the size of the input embedding "
                             f"{type(embedding).__name__} (no 2-D weight)")
        dtype = self.delta_dtype or weight.dtype
        with torch.no_grad():
            if cfg.token_init:
                ids = torch.arange(n, device=weight.device) % weight.shape[0]
                # Through the module, so scaled embeddings (BART's) start at the scale they are used at.
                return embedding(ids).detach().to(dtype, copy=True)
            return torch.empty(n, weight.shape[1], device=weight.device,
                               dtype=dtype).uniform_(-cfg.init_range, cfg.init_range)
