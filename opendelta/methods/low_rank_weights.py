"""Parameters carrying a low-rank update that is applied where the weight is used.

A parameter delta (:mod:`opendelta.methods.parameter_lora`) cannot hook a module around its
weight: a fused-experts module (Mixtral's ``MixtralExperts``) reads its 3-D parameters
``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` inside its own forward,
expert by expert (``weight[e]`` then ``F.linear``), gathered per token (``weight[ids]`` then
``torch.bmm``) or all at once (``torch.nn.functional.grouped_mm``). So the parameter itself
changes, without editing the model's code, through PyTorch's ``__torch_function__``:

* :class:`ParameterHandle`, an ``nn.Parameter`` subclass, takes the original's place in its
  module's ``_parameters`` (same name, same storage, same values: ``state_dict``, hashes,
  ``.to()`` and optimizers see the same tensor). Outside a forward pass of its module, or
  when no delta is active there, every operation on it is the plain tensor operation.
* While a delta is active (its layer pushed itself with :func:`activate` in the module's
  forward pre-hook, per thread, see :func:`opendelta.core.dispatch.push_call_value`),
  operations see ``W + sum_k s_k L_k R_k`` as a :class:`LowRankWeight`: indexing experts,
  transposing and the matrix products used by the experts implementations compute
  ``x @ W`` plus ``((x @ L) @ R) * s`` for the experts that receive tokens only, never the
  ``[E, out, in]`` update. Any other operation gets the dense ``W + s L R`` (correct, and
  what PEFT's ``target_parameters`` computes on every forward).

Term layout: ``W`` is ``[..., d1, d2]``; ``L`` ``[..., d1, r]``, ``R`` ``[..., r, d2]``, with the
same leading (expert) dimensions as ``W``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.dispatch import peek_call_value, pop_call_value, push_call_value


class Term(NamedTuple):
    """``scaling * left @ right``: ``left`` ``[..., d1, r]``, ``right`` ``[..., r, d2]``."""

    left: torch.Tensor
    right: torch.Tensor
    scaling: float

    def transposed(self) -> "Term":
        return Term(self.right.transpose(-2, -1), self.left.transpose(-2, -1), self.scaling)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.left @ self.right * self.scaling).to(dtype)


def _plain(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn`` with tensor subclasses seen as plain tensors (results are plain tensors)."""
    with torch._C.DisableTorchFunctionSubclass():
        return fn(*args, **kwargs)


def _property_name(func: Any) -> Optional[str]:
    """The name of a tensor property whose getter ``func`` is (``Tensor.dtype.__get__``)."""
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", "") == "__get__" and owner is not None:
        return getattr(owner, "__name__", None)
    return None


_TRANSPOSE_PROPERTIES = {"mT", "T"}
_METADATA = {"dim", "size", "stride", "data_ptr", "is_contiguous", "numel", "element_size", "__len__",
             "get_device", "storage_offset", "is_floating_point", "is_complex", "nelement", "ndimension",
             "untyped_storage", "__repr__", "__format__", "__hash__", "__eq__"}


class LowRankWeight(torch.Tensor):
    """``base + sum_k scaling_k * left_k @ right_k``, never materialised by the matrix
    products it knows (``F.linear``, ``matmul`` / ``@``, ``bmm``, grouped mm, expert indexing,
    transposition). It carries ``base``'s metadata; anything else sees the dense sum."""

    _base_value: torch.Tensor
    _terms: Tuple[Term, ...]

    @staticmethod
    def make(base: torch.Tensor, terms: Sequence[Term]) -> "LowRankWeight":
        out = _plain(torch.Tensor._make_subclass, LowRankWeight, base.detach(), False)
        out._base_value = base
        out._terms = tuple(terms)
        return out

    def dense(self) -> torch.Tensor:
        base = self._base_value
        total = base
        for term in self._terms:
            total = total + term.dense(base.dtype)
        return total

    def index(self, index: Any) -> "LowRankWeight":
        return LowRankWeight.make(_plain(self._base_value.__getitem__, index),
                                  [Term(t.left[index], t.right[index], t.scaling) for t in self._terms])

    def transposed(self) -> "LowRankWeight":
        return LowRankWeight.make(_plain(self._base_value.transpose, -2, -1), [t.transposed() for t in self._terms])

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        return _dispatch(func, list(args), dict(kwargs or {}))


def _is_dim0_index(weight: LowRankWeight, index: Any) -> bool:
    """Whether ``weight[index]`` selects experts (dimension 0 of a stacked weight) only."""
    if weight._base_value.dim() < 3:
        return False
    if isinstance(index, int):
        return True
    return isinstance(index, torch.Tensor) and not index.is_floating_point() and index.dim() <= 1 \
        and index.dtype != torch.bool


def _lora_product(x: torch.Tensor, term: Term, op: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``op(op(x, left), right) * scaling`` computed in the factors' dtype."""
    low = op(x.to(term.left.dtype), term.left)
    return op(low, term.right) * term.scaling


def _right_product(x: torch.Tensor, weight: LowRankWeight, op: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``op(x, W)`` for ``W = base + sum s L R``: ``op(x, base) + sum s op(op(x, L), R)``."""
    out = op(x, weight._base_value)
    for term in weight._terms:
        out = out + _lora_product(x, term, op).to(out.dtype)
    return out


def _left_product(weight: LowRankWeight, x: torch.Tensor, op: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``op(W, x)``: ``op(base, x) + sum s op(L, op(R, x))``."""
    out = op(weight._base_value, x)
    for term in weight._terms:
        low = op(term.right, x.to(term.right.dtype))
        out = out + (op(term.left, low) * term.scaling).to(out.dtype)
    return out


def _grouped_term(func: Any, x: torch.Tensor, term: Term, offs: torch.Tensor) -> torch.Tensor:
    """``x @ L[g] @ R[g] * s`` for the rows of each group ``g``: two grouped products through
    the same function (``[G, d1, r]`` then ``[G, r, d2]``); where it refuses the factors'
    dtype or shape, a loop over the groups."""
    x = x.to(term.left.dtype)
    try:
        low = _plain(func, x, term.left, offs=offs)
        return _plain(func, low, term.right, offs=offs) * term.scaling
    except (RuntimeError, NotImplementedError, TypeError):
        out = x.new_zeros(x.shape[0], term.right.shape[-1])
        start = 0
        for group, end in enumerate(offs.tolist()):
            if end > start:
                out[start:end] = x[start:end] @ term.left[group] @ term.right[group] * term.scaling
            start = end
        return out


def _grouped(func: Any, args: List[Any], kwargs: Dict[str, Any]) -> Any:
    """A grouped mm ``out[rows of group g] = x[rows] @ W[g]`` with ``W`` a :class:`LowRankWeight`
    ``[G, d1, d2]``: the base through ``func`` itself, each term as two grouped products of
    rank ``r`` (no ``[G, d1, d2]`` tensor, nothing per row)."""
    x, weight = args[0], args[1]
    offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
    base_args = [weight._base_value if a is weight else a for a in args]
    out = _plain(func, *base_args, **kwargs)
    for term in weight._terms:
        out = out + _grouped_term(func, x, term, offs).to(out.dtype)
    return out


def _dispatch(func: Any, args: List[Any], kwargs: Dict[str, Any]) -> Any:
    weights = [a for a in (*args, *kwargs.values()) if isinstance(a, LowRankWeight)]
    if not weights:
        return _plain(func, *args, **kwargs)
    weight = weights[0]
    name = _property_name(func) or getattr(func, "__name__", "")
    if _property_name(func) is not None:
        if name in _TRANSPOSE_PROPERTIES and weight._base_value.dim() >= 2 and args[0] is weight:
            return weight.transposed()
        return _plain(func, *args, **kwargs)  # metadata (dtype, shape, device, ...) of the base
    if name in _METADATA:
        return _plain(func, *args, **kwargs)
    if func is torch.Tensor.__getitem__ and args[0] is weight and _is_dim0_index(weight, args[1]):
        return weight.index(args[1])
    if name == "transpose" and args[0] is weight and len(args) == 3:
        dims = {d % weight.dim() for d in args[1:3]}
        if dims == {weight.dim() - 1, weight.dim() - 2}:
            return weight.transposed()
    if name == "t" and args[0] is weight and weight.dim() == 2:
        return weight.transposed()
    if func is F.linear and len(args) >= 2 and args[1] is weight and args[0] is not weight:
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        out = F.linear(args[0], weight._base_value, bias)
        for term in weight._terms:  # x @ (L R)^T = (x @ R^T) @ L^T
            low = F.linear(args[0].to(term.right.dtype), term.right)
            out = out + (F.linear(low, term.left) * term.scaling).to(out.dtype)
        return out
    if name in ("matmul", "__matmul__", "bmm", "mm") and len(args) == 2 and not kwargs:
        op = {"bmm": torch.bmm, "mm": torch.mm}.get(name, torch.matmul)
        if args[1] is weight and not isinstance(args[0], LowRankWeight):
            return _right_product(args[0], weight, op)
        if args[0] is weight and not isinstance(args[1], LowRankWeight):
            return _left_product(weight, args[1], op)
    if name == "__rmatmul__" and args[0] is weight and not isinstance(args[1], LowRankWeight):
        return _right_product(args[1], weight, torch.matmul)
    if "grouped_mm" in name and len(args) >= 2 and args[1] is weight and weight.dim() == 3 \
            and not isinstance(args[0], LowRankWeight):
        return _grouped(func, args, kwargs)
    # Anything else: the dense weight (correct; what a parametrization would compute).
    dense = [w.dense() if isinstance(w, LowRankWeight) else w for w in args]
    dense_kwargs = {k: v.dense() if isinstance(v, LowRankWeight) else v for k, v in kwargs.items()}
    return func(*dense, **dense_kwargs)


# --------------------------------------------------------------------------- the handle
class ParameterHandle(nn.Parameter):
    """A module's parameter that parameter deltas can act on (see the module docstring).

    Shares storage with the parameter it replaced (``original``, kept to be put back on
    removal). Its low-rank terms are those pushed by :func:`activate` in the current
    forward pass of its module.
    """

    def __new__(cls, data: torch.Tensor, requires_grad: bool = False) -> "ParameterHandle":
        return torch.Tensor._make_subclass(cls, data, requires_grad)

    @staticmethod
    def wrap(param: nn.Parameter) -> "ParameterHandle":
        handle = ParameterHandle(_plain(lambda p: p.data, param), param.requires_grad)
        handle.__dict__["original"] = param
        return handle

    def unwrap(self) -> nn.Parameter:
        """The plain parameter to put back (the original object, holding the current data)."""
        original = self.__dict__.get("original")
        data = _plain(lambda p: p.data, self)
        if original is None:
            return nn.Parameter(data, requires_grad=self.requires_grad)
        _plain(setattr, original, "data", data)
        original.requires_grad_(self.requires_grad)
        return original

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (_rebuild_handle, (_plain(lambda p: p.data, self), self.requires_grad))

    def __deepcopy__(self, memo: Dict[int, Any]) -> "ParameterHandle":
        if id(self) in memo:
            return memo[id(self)]
        result = ParameterHandle(_plain(lambda p: p.data.clone(memory_format=torch.preserve_format), self),
                                 self.requires_grad)
        memo[id(self)] = result
        return result

    def __repr__(self) -> str:
        return "ParameterHandle containing:\n" + _plain(torch.Tensor.__repr__, self)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        handles = [a for a in (*args, *kwargs.values()) if isinstance(a, ParameterHandle)]
        terms = active_terms(handles[0]) if handles else ()
        if not terms:
            return _plain(func, *args, **kwargs)
        view = _plain(torch.Tensor.as_subclass, handles[0], torch.Tensor)
        weight = LowRankWeight.make(view, [term() for term in terms])
        args = [weight if a is handles[0] else a for a in args]
        kwargs = {k: weight if v is handles[0] else v for k, v in kwargs.items()}
        return _dispatch(func, args, kwargs)


def _rebuild_handle(data: torch.Tensor, requires_grad: bool) -> ParameterHandle:
    return ParameterHandle(data, requires_grad)


# The values pushed for a handle hold the handle itself: while a value exists (even one left
# behind by a forward pass that raised), no other tensor can get the handle's id.
def active_terms(handle: ParameterHandle) -> Tuple[Callable[[], Term], ...]:
    """The term factories active on ``handle`` in this thread's forward pass of its module."""
    value = peek_call_value(handle, None)
    return value[1:] if value is not None and value[0] is handle else ()


def activate(handle: ParameterHandle, term: Callable[[], Term]) -> None:
    """Make ``term()`` part of ``handle``'s weight until :func:`deactivate` (per forward pass)."""
    push_call_value(handle, (handle, *active_terms(handle), term))


def deactivate(handle: ParameterHandle) -> None:
    pop_call_value(handle, None)


def clear(handle: ParameterHandle) -> None:
    """Drop every term left on ``handle`` in this thread (after a forward pass that raised)."""
    while pop_call_value(handle, None) is not None:
        pass


__all__ = ["Term", "LowRankWeight", "ParameterHandle", "activate", "deactivate", "active_terms", "clear"]
