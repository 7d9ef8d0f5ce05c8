"""Compacter: a sequential adapter whose projections are parameterised hypercomplex
multiplication (PHM) layers.

Mahabadi et al., 2021. A PHM layer with ``n = hypercomplex_division`` builds its weight as a
sum of Kronecker products ``H = sum_i kron(A_i, W_i)`` of small "rule" matrices ``A_i``
(``[n, n]``) and blocks ``W_i`` (``[in / n, out / n]``, optionally a rank-k product
``W_left_i @ W_right_i``), and computes ``y = x @ H + b``. The adapter on a module's output
``h`` is ``h + up(act(down(h)))`` with a bottleneck of ``hidden // reduction_factor``.

``shared_phm_rule`` shares one rule tensor between all PHM layers of one delta model,
``shared_W_phm`` shares the ``W`` blocks between the PHM layers of equal shape (all down
projections share one, all up projections another). A shared tensor is one ``nn.Parameter``
registered in every layer that uses it: it appears under each layer's name in the
``state_dict`` and receives the sum of their gradients.

Parameter names and shapes are those of OpenDelta 0.3.2 (``compactor.down_sampler.phm_rule``,
``W_left``, ``W_right``, ``b``), so its checkpoints load unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..core.base import DeltaBase
from ..core.config import BaseDeltaConfig
from ..core.fields import boolean, integer, number, text, validated
from ..core.registry import registered
from .activations import activation_rule, get_activation
from .bottleneck import ResidualAdapterLayer
from .low_rank_adapter import bottleneck_size, glorot_init_

C_INITS = ("normal", "uniform")
W_INITS = ("glorot-uniform", "glorot-normal", "normal")


@dataclass
class CompacterConfig(BaseDeltaConfig):
    """Args:
        reduction_factor: bottleneck = hidden // reduction_factor (> 0). Default 16.
        non_linearity: activation between the projections. Default ``"gelu_new"``.
        phm_c_init: initialisation of the rule matrices: ``"normal"`` (std 0.01) or
            ``"uniform"`` (in [-0.01, 0.01]). Default ``"normal"``.
        hypercomplex_division: ``n``, the number of Kronecker terms; must divide the hidden
            size and the bottleneck. Default 4.
        learn_phm: train the rule matrices; if False they keep their initial values (no
            gradient reaches them, even after ``freeze_module``). Default True.
        hypercomplex_nonlinearity: initialisation of the ``W`` blocks: ``"glorot-uniform"``,
            ``"glorot-normal"`` or ``"normal"`` (std ``phm_init_range``). Default
            ``"glorot-uniform"``.
        shared_phm_rule: one rule tensor for all PHM layers of this delta model. Default False.
        factorized_phm: each ``W_i`` is ``W_left_i @ W_right_i`` of rank ``phm_rank``.
            Default True.
        shared_W_phm: one set of ``W`` blocks for all PHM layers of the same shape. Default False.
        factorized_phm_rule: each rule ``A_i`` is ``phm_rule_left_i @ phm_rule_right_i``
            (rank 1). Default False.
        phm_rank: rank of the factorised ``W`` blocks (> 0). Default 1.
        phm_init_range: standard deviation of the ``"normal"`` ``W`` initialisation. Default 1e-4.
        kronecker_prod: the original's choice between two kernels computing the same sum
            of Kronecker products; accepted for compatibility, the result does not depend
            on it. Default None.
        use_bias_up_sampler: the up projection has a bias (``[hidden]``). Default True.
        use_bias_down_sampler: the down projection has a bias (``[bottleneck]``). Default True.
    """

    delta_type = "compacter"
    reduction_factor: int = validated(16, integer(minimum=1))
    non_linearity: str = validated("gelu_new", activation_rule())
    phm_c_init: str = validated("normal", text(choices=C_INITS))
    hypercomplex_division: int = validated(4, integer(minimum=1))
    learn_phm: bool = validated(True, boolean())
    hypercomplex_nonlinearity: str = validated("glorot-uniform", text(choices=W_INITS))
    shared_phm_rule: bool = validated(False, boolean())
    factorized_phm: bool = validated(True, boolean())
    shared_W_phm: bool = validated(False, boolean())
    factorized_phm_rule: bool = validated(False, boolean())
    phm_rank: int = validated(1, integer(minimum=1))
    phm_init_range: float = validated(0.0001, number(minimum=0, exclusive_minimum=True))
    kronecker_prod: Optional[bool] = validated(None, boolean(nullable=True))
    use_bias_up_sampler: bool = validated(True, boolean())
    use_bias_down_sampler: bool = validated(True, boolean())


def kronecker_sum(rule: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``sum_i kron(rule[i], blocks[i])``.

    Shapes: ``rule`` ``[n, a, c]``, ``blocks`` ``[n, k, p]`` -> ``[a * k, c * p]``.
    """
    n, a, c = rule.shape
    _, k, p = blocks.shape
    # kron(A, B)[i * k + j, l * p + m] = A[i, l] * B[j, m]; terms are summed last, as the
    # original does, so that the same weights give the same bits.
    return torch.einsum("bil,bjm->bijlm", rule, blocks).reshape(n, a * k, c * p).sum(0)


def _init_rule_(tensor: torch.Tensor, c_init: str) -> None:
    with torch.no_grad():
        if c_init == "uniform":
            tensor.uniform_(-0.01, 0.01)
        else:
            tensor.normal_(mean=0.0, std=0.01)


def _init_w_(tensor: torch.Tensor, w_init: str, init_range: float) -> None:
    """Initialise each of the ``n`` blocks of ``tensor`` (``[n, rows, cols]``)."""
    with torch.no_grad():
        for block in tensor:
            if w_init == "normal":
                block.normal_(mean=0.0, std=init_range)
            else:
                glorot_init_(block, w_init)


def new_phm_rule(n: int, cfg: CompacterConfig, factory: Dict[str, Any]) -> Dict[str, nn.Parameter]:
    """The rule parameters of one PHM layer (or of all, when shared), initialised.

    ``{"phm_rule": [n, n, n]}`` or, factorised, ``{"phm_rule_left": [n, n, 1],
    "phm_rule_right": [n, 1, n]}``.
    """
    shapes = ({"phm_rule_left": (n, n, 1), "phm_rule_right": (n, 1, n)} if cfg.factorized_phm_rule
              else {"phm_rule": (n, n, n)})
    out = {}
    for name, shape in shapes.items():
        param = nn.Parameter(torch.empty(shape, **factory), requires_grad=cfg.learn_phm)
        _init_rule_(param, cfg.phm_c_init)
        out[name] = param
    return out


def new_phm_w(n: int, in_features: int, out_features: int, cfg: CompacterConfig,
              factory: Dict[str, Any]) -> Dict[str, nn.Parameter]:
    """The ``W`` parameters of one PHM layer (or of all of one shape, when shared).

    ``{"W_left": [n, in/n, rank], "W_right": [n, rank, out/n]}`` or ``{"W": [n, in/n, out/n]}``.
    """
    rows, cols = in_features // n, out_features // n
    shapes = ({"W_left": (n, rows, cfg.phm_rank), "W_right": (n, cfg.phm_rank, cols)} if cfg.factorized_phm
              else {"W": (n, rows, cols)})
    out = {}
    for name, shape in shapes.items():
        param = nn.Parameter(torch.empty(shape, **factory))
        _init_w_(param, cfg.hypercomplex_nonlinearity, cfg.phm_init_range)
        out[name] = param
    return out


class PHMLinear(nn.Module):
    """Parameterised hypercomplex multiplication layer: ``y = x @ H + b``,
    ``H = sum_i kron(rule_i, W_i)``.

    Shapes: input ``[..., in_features]`` -> ``[..., out_features]``; ``H`` is
    ``[in_features, out_features]``; see :func:`new_phm_rule` and :func:`new_phm_w` for
    the parameters, ``b`` is ``[out_features]`` (zero at start) when ``bias``.

    Args:
        rule, w: parameters to register (shared ones are passed to several layers).
        learn_phm: if False the rule is used detached, so it never changes in training.
    """

    def __init__(self, in_features: int, out_features: int, rule: Dict[str, nn.Parameter],
                 w: Dict[str, nn.Parameter], bias: bool = True, learn_phm: bool = True,
                 device: Any = None, dtype: Any = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.learn_phm = learn_phm
        for name, param in {**rule, **w}.items():
            self.register_parameter(name, param)
        self.b = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def rule(self) -> torch.Tensor:
        """The ``[n, n, n]`` rule tensor."""
        if "phm_rule" in self._parameters:
            rule = self.phm_rule
        else:
            rule = torch.bmm(self.phm_rule_left, self.phm_rule_right)
        return rule if self.learn_phm else rule.detach()

    def blocks(self) -> torch.Tensor:
        """The ``[n, in/n, out/n]`` blocks ``W_i``."""
        if "W" in self._parameters:
            return self.W
        return torch.bmm(self.W_left, self.W_right)

    def weight(self) -> torch.Tensor:
        """The full ``[in_features, out_features]`` matrix ``H``."""
        return kronecker_sum(self.rule(), self.blocks())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight())
        return y + self.b if self.b is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.b is not None}"


class CompacterLayer(ResidualAdapterLayer):
    """Hypercomplex adapter on a module's output with a residual connection.

    Shapes: host output ``[..., hidden]`` (or a tuple whose first element is) -> same shape.
    Children: ``down_sampler`` (hidden -> bottleneck), ``activation``, ``up_sampler``
    (bottleneck -> hidden), both :class:`PHMLinear`.
    """

    def __init__(self, down_sampler: PHMLinear, up_sampler: PHMLinear, non_linearity: str = "gelu_new"):
        super().__init__(down_sampler, get_activation(non_linearity), up_sampler, layout="sampler")


@registered(aliases=["compactor"])
class CompacterModel(DeltaBase):
    """Compacter layers after the targets (default: attention output projection and
    feed-forward down projection). Hyperparameters: see :class:`CompacterConfig`.

    Raises:
        ValueError: a target's hidden size or the bottleneck is not divisible by
            ``hypercomplex_division`` (or the bottleneck is empty).
    """

    delta_type = "compacter"
    config_class = CompacterConfig
    default_modified_modules = ["attn.proj", "ff.w2"]
    layer_name = "compactor"  # sic: OpenDelta's name, kept so its checkpoints load

    def add_all_deltas(self, targets) -> None:
        # Parameters shared between the layers of this delta model (shared_* options).
        self._shared_rule: Optional[Dict[str, nn.Parameter]] = None
        self._shared_w: Dict[Tuple[int, int], Dict[str, nn.Parameter]] = {}
        super().add_all_deltas(targets)

    def _phm_linear(self, in_features: int, out_features: int, bias: bool, factory: Dict[str, Any]) -> PHMLinear:
        cfg, n = self.config, self.config.hypercomplex_division
        if cfg.shared_phm_rule:
            if self._shared_rule is None:
                self._shared_rule = new_phm_rule(n, cfg, factory)
            rule = self._shared_rule
        else:
            rule = new_phm_rule(n, cfg, factory)
        if cfg.shared_W_phm:
            key = (in_features, out_features)
            if key not in self._shared_w:
                self._shared_w[key] = new_phm_w(n, in_features, out_features, cfg, factory)
            w = self._shared_w[key]
        else:
            w = new_phm_w(n, in_features, out_features, cfg, factory)
        return PHMLinear(in_features, out_features, rule, w, bias=bias, learn_phm=cfg.learn_phm, **factory)

    def add_delta(self, name: str, module: nn.Module) -> None:
        _, hidden = self.module_sizes(name, module)
        cfg, n = self.config, self.config.hypercomplex_division
        bottleneck = bottleneck_size(hidden, cfg.reduction_factor, f"Compacter on {name!r}")
        for what, size in (("hidden size", hidden), (f"bottleneck (hidden {hidden} // reduction_factor "
                                                    f"{cfg.reduction_factor})", bottleneck)):
            if size % n:
                raise ValueError(
                    f"Compacter on {name!r}: the {what} {size} is not divisible by "
                    f"hypercomplex_division={n}; choose a hypercomplex_division that divides it "
                    f"(and a reduction_factor such that hidden // reduction_factor does too)")
        factory = self.factory_kwargs(module)
        down = self._phm_linear(hidden, bottleneck, cfg.use_bias_down_sampler, factory)
        up = self._phm_linear(bottleneck, hidden, cfg.use_bias_up_sampler, factory)
        self.insert_layer(name, CompacterLayer(down, up, cfg.non_linearity))
