"""Sizes of modules, read from the modules themselves (no forward pass).

Linear, GPT-2's ``Conv1D`` (weight stored as ``[in, out]``), Embedding, convolutions and
normalisation layers (LayerNorm, RMSNorm, T5LayerNorm, ...) state their sizes. For a
composite module (an attention block, a feed-forward block) the input size is that of its
first sized leaf and the output size that of its last, in registration order. Where that
is not enough, :func:`probe_sizes` runs one dummy forward and reports failures clearly.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import nn

Sizes = Tuple[int, int]  # (input features, output features)


def is_conv1d_transposed(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is ``[in, out]``."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor)
            and weight.dim() == 2)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and look-alikes (``T5LayerNorm``, ``LlamaRMSNorm``, ...)."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
        return True
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        return True
    weight = getattr(module, "weight", None)
    name = type(module).__name__
    return (name.endswith("Norm") and isinstance(weight, torch.Tensor) and weight.dim() == 1)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d_transposed(module)


def leaf_sizes(module: nn.Module) -> Optional[Sizes]:
    """``(in, out)`` of a module that states its own sizes, else ``None``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d_transposed(module):
        weight: Any = module.weight
        return int(weight.shape[0]), int(weight.shape[1])
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.LayerNorm) and module.normalized_shape:
        return module.normalized_shape[-1], module.normalized_shape[-1]
    if is_norm(module):
        norm_weight = getattr(module, "weight", None)
        if isinstance(norm_weight, torch.Tensor) and norm_weight.dim() == 1:
            return norm_weight.shape[0], norm_weight.shape[0]
        num = getattr(module, "num_features", None) or getattr(module, "num_channels", None)
        if num:
            return num, num
    return None


def static_sizes(module: nn.Module) -> Optional[Sizes]:
    """``(in, out)`` of ``module`` from its own or its leaves' declared sizes."""
    own = leaf_sizes(module)
    if own is not None:
        return own
    from .layers import DeltaLayer

    sized = [(m, s) for m in module.modules() if not isinstance(m, DeltaLayer)
             and not isinstance(m, nn.Embedding) and (s := leaf_sizes(m)) is not None]
    if not sized:
        return None
    width = sized[0][1][0]
    # A block that maps back to its input width (attention, feed-forward) has a projection
    # that does so; registration order may put norms (q/k norms) or a fused qkv last.
    back = [s for m, s in sized if is_linear_like(m) and s[1] == width]
    return width, (back[-1] if back else sized[-1][1])[1]


def dummy_inputs_of(backbone: nn.Module) -> Tuple[Tuple[Any, ...], Dict[str, Any], str]:
    """``(args, kwargs, source)`` of the pseudo input used to probe ``backbone``'s sizes.

    A ``dummy_inputs`` attribute of the backbone wins (as in OpenDelta, FAQ 3:
    ``backbone.dummy_inputs = {"input_ids": ...}``; transformers models define one): a dict
    is passed as keyword arguments, a tuple or list as positional ones, anything else (a
    tensor) as the single argument. Otherwise four token ids (and decoder ids for
    encoder-decoder models). Tensors are moved to the device of the backbone's first
    parameter; ``source`` says where the input came from, for error messages.
    """
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        given = getattr(backbone, "dummy_inputs", None)
    except Exception:  # a property that cannot build its input: use ours
        given = None
    if given is not None:
        moved = _to_device(given, device)
        source = f"{type(backbone).__name__}.dummy_inputs"
        if isinstance(moved, dict):
            return (), moved, source
        if isinstance(moved, (tuple, list)):
            return tuple(moved), {}, source
        return (moved,), {}, source
    ids = torch.tensor([[3, 4, 5, 6]], device=device)
    inputs = {"input_ids": ids}
    if getattr(getattr(backbone, "config", None), "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return (), inputs, "token ids (input_ids=[[3, 4, 5, 6]])"


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def probe_sizes(backbone: nn.Module, names: Iterable[str]) -> Dict[str, Sizes]:
    """Sizes of the named submodules, measured by one dummy forward of ``backbone``.

    The input is :func:`dummy_inputs_of` the backbone: its ``dummy_inputs`` attribute when
    it has one, else four token ids (and decoder ids for encoder-decoder models).

    Raises:
        RuntimeError: the dummy forward failed or never reached a named module; the
            message names the modules, the input used and the original error.
    """
    from .layers import primary_input, primary_tensor

    names = list(names)
    modules = dict(backbone.named_modules())
    found: Dict[str, Sizes] = {}
    handles = []

    def make_hook(name):
        def hook(module, args, kwargs, output):
            found[name] = (primary_input(args, kwargs).shape[-1], primary_tensor(output).shape[-1])
        return hook

    for name in names:
        handles.append(modules[name].register_forward_hook(make_hook(name), with_kwargs=True))
    source = "no input"
    try:
        args, kwargs, source = dummy_inputs_of(backbone)
        with torch.no_grad():
            backbone(*args, **kwargs)
    except Exception as error:  # re-raised with context; never swallowed
        raise RuntimeError(
            f"could not infer the sizes of {names} from the modules themselves, and the dummy "
            f"forward of {type(backbone).__name__} with {source} used as a fallback failed: {error}. "
            "Target modules that declare their sizes (Linear, Conv1D, LayerNorm, ...), or set "
            "backbone_model.dummy_inputs to an input the model accepts (a dict of keyword "
            "arguments, a tuple of positional ones, or a tensor) before building the delta.") from error
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in found]
    if missing:
        raise RuntimeError(f"the dummy forward ({source}) never reached {missing}; cannot infer their "
                           "sizes; set backbone_model.dummy_inputs to an input that runs through them")
    return found


def tensor_options(module: nn.Module, delta_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """``device`` and ``dtype`` for new delta tensors on ``module``, read from the module itself,
    quantized layers included (nothing is dequantized).

    ``device``: that of its first parameter or buffer of any dtype (a 4-bit weight is uint8,
    an 8-bit one int8: they still tell the device). ``dtype``: ``delta_dtype`` when given,
    else that of its first unquantized floating parameter, else the dtype its quantized
    weight was made from (bitsandbytes 4-bit, torchao), else none (torch's default).
    """
    from .quantized_merge import weight_codec

    device: Optional[torch.device] = None
    floating: Optional[torch.dtype] = None
    recorded: Optional[torch.dtype] = None
    for sub in module.modules():
        codec = weight_codec(sub)
        if codec is not None and recorded is None:
            recorded = codec.original_dtype(sub)
        for name, tensor in [*sub._parameters.items(), *sub._buffers.items()]:
            if tensor is None:
                continue
            device = device or tensor.device
            quantized = codec is not None and name == "weight"
            if floating is None and not quantized and tensor.is_floating_point():
                floating = tensor.dtype
    out: Dict[str, Any] = {"device": device} if device is not None else {}
    dtype = delta_dtype or floating or recorded
    if dtype is not None:
        out["dtype"] = dtype
    return out
