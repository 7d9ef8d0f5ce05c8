"""Infer the common structure of a model that has no map, from its module types and names.

:func:`infer_structure` finds the stacks of repeated blocks (a ``ModuleList`` or
``Sequential`` of numbered layers of one class), and inside every block

* the attention module(s): a submodule whose class or name says attention (``attn``,
  ``attention``), or that holds query/key/value projections; a second one, or one named
  like cross-attention (``cross``, ``encoder_attn``, ``enc_dec``), is ``crossattn``;
* their projections ``q``, ``k``, ``v`` (separate) or ``qkv`` (fused), and ``proj`` (output),
  by name (``query``, ``to_k``, ``Wqkv``, ``c_attn``, ``out_proj``, ``dense`` under
  ``output``, ...), else by shape and registration order;
* the feed-forward projections ``w1`` (up, or gate), ``w3`` (up next to a gate) and
  ``w2`` (down), by name (``up``, ``fc1``, ``wi``, ``gate``, ``down``, ``fc2``, ``wo``,
  ...), else by shape (widening: up; narrowing back to the hidden size: down), and their
  container(s), ``ff``;
* norms: inside an attention module or named for it (``attn``, ``input``, ``before``,
  ``1``) ``attn.layer_norm``, for the feed-forward block (``ff``, ``mlp``, ``post``,
  ``after``, ``2``) ``ff.layer_norm``;

and outside the blocks the token embedding (``embeddings``) and a head projecting back to
the vocabulary (``lm_head.proj``). A single stack is a ``decoder`` when its path, the
model's class or config, or its attention (``is_causal``) says so, else an ``encoder``;
two stacks named encoder/decoder are those; other stacks (towers) are ``encoder``s named
after the top-level module holding each (``text_model.encoder.block.{i}``).

The result, :class:`InferredStructureMap`, is a :class:`~opendelta.core.structure.
CommonStructureMap` built from the inferred rules (same ``transform(name)``), with
:meth:`~InferredStructureMap.summary`, one table for logs. What cannot be found raises
:class:`StructureInferenceError` naming it: no block stack, a block without attention, an
attention whose query/key/value projections cannot be told apart.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

from .layers import DeltaLayer
from .shapes import is_linear_like, is_norm, leaf_sizes
from .structure import CommonStructureMap

_INDEX = "{i}"
_CROSS = ("cross", "encoder_attn", "enc_dec", "encdec", "src_attn", "memory")
_QKV_FUSED = ("qkv", "c_attn", "in_proj", "query_key_value")


class StructureInferenceError(ValueError):
    """The common structure of a model without a map could not be inferred; the message
    names what is missing and what was found instead."""


@dataclass(frozen=True)
class InferredRole:
    """One row of the inferred structure: a module (``{i}`` for the block index when every
    block agrees) and its common name."""

    module: str
    common: str
    type_name: str


def _tokens(name: str) -> List[str]:
    """The words of a name: ``"attention.output.dense"`` -> ``attention, output, dense``;
    ``"toQuery"`` -> ``to, query``; ``"fc1"`` -> ``fc1, fc, 1`` (with and without digits)."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    words = [t for t in re.split(r"[._\-]+", spaced.lower()) if t]
    split = [p for w in words for p in re.split(r"(?<=[a-z])(?=[0-9])", w) if p != w]
    return words + split


def _children(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, c) for n, c in module._modules.items() if c is not None and not isinstance(c, DeltaLayer)]


def _walk(module: nn.Module, prefix: str = "") -> List[Tuple[str, nn.Module]]:
    """``(relative name, module)`` of every submodule below ``module`` (delta layers skipped)."""
    out = []
    for name, child in _children(module):
        full = f"{prefix}.{name}" if prefix else name
        out.append((full, child))
        out.extend(_walk(child, full))
    return out


def _linears(module: nn.Module, prefix: str = "") -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in _walk(module, prefix) if is_linear_like(m)]


def find_stacks(model: nn.Module) -> List[Tuple[str, List[str]]]:
    """``(path, [index names])`` of every stack of repeated blocks: a container whose
    children are named ``0, 1, ...``, share one class and hold Linear-like layers
    (outermost stacks only)."""
    stacks: List[Tuple[str, List[str]]] = []
    pending = [("", model)]
    while pending:
        path, module = pending.pop(0)
        children = _children(module)
        names = [n for n, _ in children]
        if (children and all(n.isdigit() for n in names) and len({type(c) for _, c in children}) == 1
                and _linears(children[0][1])):
            stacks.append((path, names))
            continue
        pending.extend((f"{path}.{n}" if path else n, c) for n, c in children)
    return stacks


# --------------------------------------------------------------------------- one block
def _named_attention(name: str, module: nn.Module) -> bool:
    """The class or the name says attention (``BertAttention``, ``self_attn``, ``mixAttn``)."""
    words = _tokens(name.rsplit(".", 1)[-1]) + _tokens(type(module).__name__)
    return any(w.startswith(("attn", "attention")) or w.endswith(("attn", "attention")) for w in words)


def _holds_qkv(module: nn.Module) -> bool:
    roles = {_projection_role(n) for n, _ in _linears(module)}
    return {"q", "k", "v"} <= roles or "qkv" in roles


def _attention_modules(block: nn.Module) -> List[str]:
    """The outermost submodules named as attention; else the innermost ones holding
    query/key/value projections."""
    modules = [(n, m) for n, m in _walk(block) if _linears(m)]
    named: List[str] = []
    for name, module in modules:
        if not any(name.startswith(a + ".") for a in named) and _named_attention(name, module):
            named.append(name)
    if named:
        return named
    holders = [n for n, m in modules if _holds_qkv(m)]
    return [n for n in holders if not any(other.startswith(n + ".") for other in holders)]


def _projection_role(name: str) -> Optional[str]:
    words = _tokens(name)
    last = name.rsplit(".", 1)[-1].lower()
    if any(f in last for f in _QKV_FUSED):
        return "qkv"
    for role, keys in (("q", ("q", "query", "wq")), ("k", ("k", "key", "wk")), ("v", ("v", "value", "val", "wv"))):
        if any(w in keys for w in words[-2:]):
            return role
    if any(w in ("o", "out", "output", "wo", "dense", "proj", "c") for w in words):
        return "proj"
    return None


def _attention_roles(attention: nn.Module, where: str) -> Dict[str, str]:
    """Relative linear name -> q / k / v / qkv / proj inside one attention module."""
    linears = _linears(attention)
    roles = {n: _projection_role(n) for n, _ in linears}
    found = {r for r in roles.values() if r}
    if not ({"q", "k", "v"} <= found or "qkv" in found):
        # By shape and order: three projections from the hidden size, then the output.
        unnamed = [(n, m) for n, m in linears if roles[n] in (None, "proj")]
        hidden = Counter(leaf_sizes(m)[0] for _, m in linears).most_common(1)[0][0]  # type: ignore[index]
        fused = [n for n, m in unnamed if leaf_sizes(m)[1] == 3 * hidden]  # type: ignore[index]
        if fused:
            roles[fused[0]] = "qkv"
        elif len(unnamed) >= 3:
            for (n, _), role in zip(unnamed[:3], ("q", "k", "v")):
                roles[n] = role
            if len(unnamed) == 4:
                roles[unnamed[3][0]] = "proj"
        else:
            raise StructureInferenceError(
                f"cannot tell the query, key and value projections of the attention {where!r} apart: "
                f"its Linear layers are {[n for n, _ in linears] or 'none'}; name them q/k/v (or query/"
                "key/value, qkv for a fused one), or pass modified_modules with module names")
    left = [n for n, _ in linears if not roles[n]]
    if "proj" not in roles.values() and len(left) == 1 and left[0] == linears[-1][0]:
        roles[left[0]] = "proj"  # the one other Linear, registered last: the output projection
    projections = [n for n, r in roles.items() if r == "proj"]
    if len(projections) > 1:  # keep the last one (the output projection), drop the rest
        for n in projections[:-1]:
            roles[n] = None
    return {n: r for n, r in roles.items() if r}


def _ff_roles(linears: Sequence[Tuple[str, nn.Module]], hidden: int) -> Dict[str, str]:
    """Relative linear name -> w1 / w3 / w2 for the feed-forward layers of a block."""
    named: Dict[str, str] = {}
    for n, _ in linears:
        words = _tokens(n)
        if "gate" in words:
            named[n] = "gate"
        elif any(w in ("down", "fc2", "wo", "w2", "lin2", "output", "out") for w in words):
            named[n] = "down"
        elif any(w in ("up", "fc1", "fc", "wi", "w1", "w3", "lin1", "intermediate", "in") for w in words):
            named[n] = "up"
    for n, m in linears:  # by shape: widening is up, narrowing back to the hidden size is down
        if n not in named:
            sizes = leaf_sizes(m)
            if sizes and sizes[0] == hidden and sizes[1] != hidden:
                named[n] = "up"
            elif sizes and sizes[1] == hidden and sizes[0] != hidden:
                named[n] = "down"
    ups = [n for n, _ in linears if named.get(n) == "up"]
    out = {n: "w2" for n, _ in linears if named.get(n) == "down"}
    gates = [n for n, _ in linears if named.get(n) == "gate"]
    if gates:
        out.update({gates[0]: "w1", **{n: "w3" for n in ups[:1]}})
    else:
        out.update({n: ("w1" if i == 0 else "w3") for i, n in enumerate(ups[:2])})
    return out


def _norm_role(name: str) -> Optional[str]:
    words = _tokens(name)
    joined = "_".join(words)
    if any(c in joined for c in _CROSS):
        return "crossattn"
    if any(w in ("ff", "ffn", "mlp", "feedforward", "after", "post", "final", "output", "2")
           or w.startswith(("ff", "mlp")) for w in words):
        return "ff"
    if any(w in ("attn", "attention", "input", "before", "pre", "1", "sa") or "attn" in w for w in words):
        return "attn"
    return None


def infer_block(block: nn.Module, where: str, decoder: bool) -> Dict[str, str]:
    """Relative module name -> common name (``attn.q``, ``ff.w2``, ...) inside one block.

    Raises:
        StructureInferenceError: the block has no attention module, or its projections
            cannot be told apart.
    """
    modules = _walk(block)
    attentions = _attention_modules(block)
    if not attentions:
        raise StructureInferenceError(
            f"block {where!r} ({type(block).__name__}) has no attention module: no submodule whose class or "
            f"name says attention (attn, attention) or that holds query/key/value projections; its "
            f"submodules are {[n for n, _ in _children(block)]}")
    out: Dict[str, str] = {}
    kinds = []
    for position, name in enumerate(attentions):
        words = "_".join(_tokens(name) + _tokens(type(block.get_submodule(name)).__name__))
        cross = any(c in words for c in _CROSS) or (position > 0 and decoder)
        kind = "crossattn" if cross else "attn"
        if kind in kinds:
            continue  # a third attention, or two of one kind: left without a common name
        kinds.append(kind)
        out[name] = kind
        attention = block.get_submodule(name)
        for rel, role in _attention_roles(attention, f"{where}.{name}").items():
            out[f"{name}.{rel}"] = f"{kind}.{role}"
        for rel, module in _walk(attention):
            if is_norm(module) and not re.search(r"(^|[._])(q|k|query|key)[._]?norm", rel.lower()):
                out[f"{name}.{rel}"] = f"{kind}.layer_norm"
    inside = tuple(a + "." for a in attentions)
    hidden = Counter(leaf_sizes(m)[0] for n, m in _linears(block)  # type: ignore[index]
                     if n.startswith(inside)).most_common(1)[0][0]
    ff_linears = [(n, m) for n, m in _linears(block) if not n.startswith(inside)]
    for rel, role in _ff_roles(ff_linears, hidden).items():
        out[rel] = f"ff.{role}"
        parent = rel.rpartition(".")[0]
        if parent:
            out.setdefault(parent, "ff")
    containers = tuple(n + "." for n, c in out.items() if c == "ff")
    norms: List[Tuple[str, Optional[str]]] = []
    for name, module in modules:
        if is_norm(module) and name not in out and not name.startswith(inside):
            parent = name.rpartition(".")[0]
            # Inside a feed-forward container, or next to one (T5's layer.1.layer_norm).
            beside = bool(parent) and any(c.startswith(parent + ".") for c in containers)
            norms.append((name, "ff" if name.startswith(containers) or beside else _norm_role(name)))
    # A norm named "pre" + feed-forward (Gemma's pre_feedforward_layernorm) is the one in front
    # of the feed-forward block, before any "post_attention" norm.
    norms.sort(key=lambda item: not (item[1] == "ff" and "pre" in _tokens(item[0])))
    for name, norm_role in norms:
        if norm_role is not None and f"{norm_role}.layer_norm" not in out.values():
            out[name] = f"{norm_role}.layer_norm"
    order = {name: i for i, (name, _) in enumerate(modules)}
    return dict(sorted(out.items(), key=lambda item: order[item[0]]))


# --------------------------------------------------------------------------- the model
def _is_decoder_model(model: nn.Module, path: str, block: nn.Module) -> bool:
    words = _tokens(path)
    if any(w.startswith("dec") for w in words):
        return True
    if any(w.startswith("enc") for w in words):
        return False
    config = getattr(model, "config", None)
    if getattr(config, "is_decoder", False):
        return True
    if re.search(r"CausalLM|LMHead|Decoder|GPT", type(model).__name__):
        return True
    return any(getattr(m, "is_causal", False) is True for m in block.modules())


def _stack_names(model: nn.Module, stacks: List[Tuple[str, List[str]]]) -> Dict[str, str]:
    """Stack path -> common prefix of its blocks (``encoder.block``, ``text_model.encoder.block``)."""
    if len(stacks) == 1:
        path, names = stacks[0]
        block = model.get_submodule(f"{path}.{names[0]}" if path else names[0])
        return {path: "decoder.block" if _is_decoder_model(model, path, block) else "encoder.block"}
    sides = {path: next((w[:3] for w in _tokens(path) if w.startswith(("enc", "dec"))), None) for path, _ in stacks}
    if sorted(str(s) for s in sides.values()) == ["dec", "enc"]:
        return {path: ("decoder" if side == "dec" else "encoder") + ".block" for path, side in sides.items()}
    # Towers: each is an encoder named after the top-level module that holds it.
    out = {}
    for path, _ in stacks:
        tower = path.split(".")[0] if "." in path else path
        out[path] = f"{tower}.encoder.block"
    return out


class InferredStructureMap(CommonStructureMap):
    """A :class:`CommonStructureMap` built from inferred rules (``transform(name)`` as for a
    known architecture; ``model_type`` is ``None``).

    Attributes:
        rules: module name (``{i}`` for the block index) -> common name, in model order.
        roles: the rows of :meth:`summary`.
    """

    def __init__(self, model: nn.Module, rules: Dict[str, str]):
        super().__init__(model, mapping=rules)
        self.rules = rules
        self.model_class = type(model).__name__
        modules = dict(model.named_modules())
        self.roles = [InferredRole(name, common, self._type(modules, name)) for name, common in rules.items()]

    @staticmethod
    def _type(modules: Dict[str, nn.Module], name: str) -> str:
        concrete = re.sub(r"\{i\}", lambda _: "0", name)
        module = modules.get(concrete)
        return type(module).__name__ if module is not None else "?"

    def summary(self) -> str:
        """The inferred structure as one table: common name, module name, class."""
        width = max([len("common name")] + [len(r.common) for r in self.roles])
        mwidth = max([len("module")] + [len(r.module) for r in self.roles])
        lines = [f"common structure inferred for {self.model_class} (no map for it; check the table, or pass "
                 "modified_modules with module names):",
                 f"  {'common name':<{width}}  {'module':<{mwidth}}  class"]
        lines += [f"  {r.common:<{width}}  {r.module:<{mwidth}}  {r.type_name}" for r in self.roles]
        return "\n".join(lines)


def infer_structure(model: nn.Module) -> InferredStructureMap:
    """The common structure of ``model`` inferred from module types and names (see the
    module documentation).

    Raises:
        StructureInferenceError: no stack of repeated blocks, a block without attention, or
            an attention whose projections cannot be told apart; the message names them.
    """
    stacks = find_stacks(model)
    if not stacks:
        raise StructureInferenceError(
            f"cannot infer the common structure of {type(model).__name__}: it has no stack of repeated "
            "blocks (a ModuleList or Sequential whose children 0, 1, ... are layers of one class holding "
            "Linear layers); pass modified_modules with the model's own module names")
    rules: Dict[str, str] = {}
    blocks: List[str] = []
    for path, common in _stack_names(model, stacks).items():
        names = dict(stacks)[path]
        decoder = common.startswith("decoder")
        per_block = []
        for index in names:
            full = f"{path}.{index}" if path else index
            blocks.append(full)
            per_block.append(infer_block(model.get_submodule(full), full, decoder))
        stack = f"{path}.{_INDEX}" if path else _INDEX
        rules[stack] = f"{common}.{_INDEX}"
        if all(roles == per_block[0] for roles in per_block):
            rules.update({f"{stack}.{rel}": f"{common}.{_INDEX}.{c}" for rel, c in per_block[0].items()})
        else:  # blocks differ (e.g. the first has no norm): one rule per block
            for index, roles in zip(names, per_block):
                prefix = f"{path}.{index}" if path else index
                rules.update({f"{prefix}.{rel}": f"{common}.{index}.{c}" for rel, c in roles.items()})
    inside = tuple(b + "." for b in blocks)
    outside = [(n, m) for n, m in _walk(model) if not n.startswith(inside) and n not in blocks]
    embeddings = [(n, m) for n, m in outside if isinstance(m, nn.Embedding)]
    if embeddings:
        name, embedding = max(embeddings, key=lambda nm: nm[1].num_embeddings)
        rules[name] = "embeddings"
        for n, m in outside:
            if is_linear_like(m) and leaf_sizes(m)[1] == embedding.num_embeddings:  # type: ignore[index]
                rules[n] = "lm_head.proj"
    return InferredStructureMap(model, rules)


__all__ = ["InferredRole", "InferredStructureMap", "StructureInferenceError", "find_stacks", "infer_block",
           "infer_structure"]
