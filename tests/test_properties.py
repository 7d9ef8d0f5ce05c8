"""Property-based tests (hypothesis): generated configs (valid and invalid), call orders and
checkpoint corruptions.

Invariants: a config value is accepted exactly when an independent oracle says it is valid,
and refused with a ConfigFieldError (CheckpointError from a file) naming the field; every
call either succeeds or fails cleanly with everything unchanged (backbone, delta, files);
the outputs always equal those of a fresh reference carrying the same deltas unmerged, and
after detaching everything those of the bare backbone.

Fixed seed (``derandomize=True``) and bounded examples: the file runs in about 20 s on two
cores. Models are a tiny plain ``nn.Module`` (torch only), so every step is cheap. To hunt
for bugs locally, raise the number of call orders and corruptions tried with
``OPENDELTA_PROPERTY_EXAMPLES=1000``.
"""
import copy
import json
import math
import os
import shutil

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from invariants import assert_same, delta_state, directory_state, model_state  # noqa: E402
from opendelta import (AdapterModel, BitFitModel, CheckpointError, LoraModel, get_delta_class,  # noqa: E402
                       known_delta_types)
from opendelta.core.fields import ConfigFieldError, rules_of  # noqa: E402
from opendelta.methods.activations import _ACTIVATIONS  # noqa: E402

SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ============================================================================ configs
def positive_int(v):
    return type(v) is int and v >= 1


def finite(v):
    return type(v) in (int, float) and math.isfinite(v)


def names(v):
    return v is None or (type(v) in (list, tuple) and all(type(x) is str for x in v))


def optional(check):
    return lambda v: v is None or check(v)


def one_of(*options, fold=False):
    return lambda v: type(v) is str and (v.lower() if fold else v) in options


def boolean(v):
    return type(v) is bool


ACTIVATION = one_of(*_ACTIVATIONS, fold=True)
#: An oracle per field, written independently of the declared rules.
ORACLES = {
    "base": {"modified_modules": names, "exclude_modules": names, "unfrozen_modules": names,
             "common_structure": optional(boolean), "backbone_class": optional(lambda v: type(v) is str),
             "backbone_checkpoint_name": optional(lambda v: type(v) is str),
             "backbone_hash": optional(lambda v: type(v) is str)},
    "lora": {"lora_r": positive_int, "lora_alpha": finite, "lora_dropout": lambda v: finite(v) and 0 <= v < 1},
    "adapter": {"bottleneck_dim": positive_int, "non_linearity": ACTIVATION},
    "low_rank_adapter": {"reduction_factor": positive_int, "non_linearity": ACTIVATION, "low_rank_rank": positive_int,
                         "low_rank_w_init": one_of("glorot-uniform", "glorot-normal")},
    "compacter": {"reduction_factor": positive_int, "hypercomplex_division": positive_int, "phm_rank": positive_int,
                  "non_linearity": ACTIVATION, "phm_c_init": one_of("normal", "uniform"),
                  "hypercomplex_nonlinearity": one_of("glorot-uniform", "glorot-normal", "normal"),
                  "phm_init_range": lambda v: finite(v) and v > 0, "kronecker_prod": optional(boolean),
                  **{f: boolean for f in ("learn_phm", "shared_phm_rule", "factorized_phm", "shared_W_phm",
                                          "factorized_phm_rule", "use_bias_up_sampler", "use_bias_down_sampler")}},
    "parallel_adapter": {"bottleneck_dim": positive_int, "non_linearity": ACTIVATION, "scaled": optional(finite)},
    "prefix": {"prefix_token_num": positive_int, "embed_dim": positive_int, "mid_dim": positive_int,
               "reparameterize": boolean},
    "soft_prompt": {"soft_token_num": positive_int, "init_range": lambda v: finite(v) and v >= 0,
                    "token_init": boolean,
                    "other_expand_ids": lambda v: type(v) is dict and all(
                        type(k) is str and (type(x) is bool or finite(x)) for k, x in v.items())},
    "bitfit": {},
}
CASES = [(t, f) for t in ORACLES if t != "base" for f in ORACLES[t]] + \
        [("lora", f) for f in ORACLES["base"]] + [("bitfit", f) for f in ORACLES["base"]]

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 300),
                    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1),
                    st.text(max_size=8), st.sampled_from(sorted(_ACTIVATIONS) + ["GELU", "glorot-normal", "uniform"]))
VALUES = st.one_of(SCALARS, st.lists(st.one_of(st.text(max_size=4), st.integers(0, 3), st.none()), max_size=3),
                   st.tuples(st.text(max_size=4)),
                   st.dictionaries(st.one_of(st.text(max_size=4), st.integers(0, 2)),
                                   st.one_of(st.integers(-2, 2), st.floats(allow_nan=True), st.booleans(),
                                             st.text(max_size=2)), max_size=2))


def test_every_field_of_every_registered_config_declares_a_rule():
    for delta_type in known_delta_types():
        config_class = get_delta_class(delta_type).config_class
        assert set(config_class.field_names()) <= set(rules_of(config_class)), config_class.__name__


@settings(max_examples=600, **SETTINGS)
@given(case=st.sampled_from(CASES), value=VALUES)
def test_a_config_field_is_accepted_exactly_when_valid(case, value):
    delta_type, field = case
    oracle = {**ORACLES["base"], **ORACLES[delta_type]}[field]
    config_class = get_delta_class(delta_type).config_class
    if oracle(value):
        config = config_class(**{field: value})
        again = config_class.from_dict(json.loads(config.to_json_string()))
        assert again == config or field == "other_expand_ids"  # JSON turns int keys to str
    else:
        with pytest.raises(ConfigFieldError) as caught:
            config_class(**{field: value})
        err = caught.value
        assert err.field.split("[")[0].split(" ")[0] == field and err.owner == config_class.__name__
        assert str(err).startswith((f"{config_class.__name__}.{field}", f"unknown {field}"))


# ============================================================================ a tiny backbone
class Tiny(nn.Module):
    """Linear -> tanh -> Linear -> LayerNorm: hosts for LoRA, BitFit and an adapter."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.inp, self.act, self.out, self.norm = nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.LayerNorm(8)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)

    def forward(self, x):
        return self.norm(self.out(self.act(self.inp(x))))


X = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
SPECS = [  # name, class, arguments (creation order = run order on shared hosts)
    ("a", LoraModel, {"modified_modules": ["inp", "out"], "lora_r": 2}),
    ("b", BitFitModel, {"modified_modules": ["inp", "out", "norm"]}),
    ("c", AdapterModel, {"modified_modules": ["norm"], "bottleneck_dim": 3}),
]


def _build(model, only=None):
    deltas = {}
    for name, cls, kwargs in SPECS:
        if only is None or name in only:
            deltas[name] = cls(model, name=name, **kwargs)
    return deltas


def _perturb(delta, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3)


def _reference(deltas):
    """A fresh backbone carrying the attached deltas, unmerged, with their current values."""
    model = Tiny()
    attached = {n: d for n, d in deltas.items() if d.is_attached}
    for name, fresh in _build(model, only=attached).items():
        fresh.load_state_dict(deltas[name].state_dict())
    with torch.no_grad():
        return model(X)


def _out(model):
    with torch.no_grad():
        return model(X)


# ============================================================================ call orders
OPS = st.lists(st.tuples(st.sampled_from(["attach", "detach", "merge", "merge_keep", "merge_safe", "unmerge",
                                          "save", "load", "write", "freeze", "freeze_typo", "bad_load",
                                          "merge_and_detach"]),
                         st.sampled_from([n for n, _, _ in SPECS]), st.integers(0, 50)),
               min_size=1, max_size=10)


@settings(max_examples=int(os.environ.get("OPENDELTA_PROPERTY_EXAMPLES", 200)), **SETTINGS)
@given(ops=OPS)
def test_random_call_orders_keep_outputs_right_and_failures_clean(tmp_path_factory, ops):
    model = Tiny()
    base, original = _out(model), {n: p.detach().clone() for n, p in model.named_parameters()}
    deltas = _build(model)
    for i, delta in enumerate(deltas.values()):
        _perturb(delta, seed=i)
    saved = {}
    folder = tmp_path_factory.mktemp("orders")
    merged_away = set()
    for op, name, seed in ops:
        delta = deltas[name]
        before_model, before_deltas = model_state(model), {n: delta_state(d) for n, d in deltas.items()}
        try:
            if op == "attach":
                delta.attach()
            elif op == "detach":
                delta.detach()
            elif op.startswith("merge") and op != "merge_and_detach":
                delta.merge(keep_copy=op == "merge_keep", safe=op == "merge_safe")
            elif op == "unmerge":
                delta.unmerge()
            elif op == "save":
                saved[name] = delta.save_finetuned(folder / name)
            elif op == "load":
                delta.load_checkpoint(saved.get(name, folder / "never-saved"))
            elif op == "write":  # an optimizer-like step; a merged delta is brought up to date by merge()
                _perturb(delta, seed)
                if delta.is_merged:
                    delta.merge()
            elif op == "freeze":
                delta.freeze_module(exclude=["deltas", "norm"])
            elif op == "freeze_typo":
                delta.freeze_module(exclude=["deltas", "nrom"])
            elif op == "bad_load":
                delta.load_state_dict({k: v[..., :1] for k, v in delta.state_dict().items()})
            elif op == "merge_and_detach":
                delta.merge_and_detach()
                merged_away.add(name)
        except (ValueError, TypeError, RuntimeError, CheckpointError) as err:
            assert_same(before_model, model_state(model), f"backbone after failed {op}({name}): {err}")
            for n, d in deltas.items():
                assert_same(before_deltas[n], delta_state(d), f"delta {n} after failed {op}({name}): {err}")
            continue
        if merged_away:
            return  # the backbone itself changed for good: the reference no longer applies
        assert (_out(model) - _reference(deltas)).abs().max() <= 1e-5, f"after {op}({name})"
    for delta in deltas.values():
        delta.detach()
    assert (_out(model) - base).abs().max() <= 1e-5
    for n, p in model.named_parameters():
        assert (p - original[n]).abs().max() <= 1e-5 * max(1.0, original[n].abs().max().item())


# ============================================================================ corruptions
CORRUPTIONS = st.one_of(
    st.tuples(st.just("truncate"), st.sampled_from(["model.safetensors", "config.json"]), st.floats(0, 0.99)),
    st.tuples(st.just("flip"), st.sampled_from(["model.safetensors", "config.json"]), st.integers(0, 10 ** 6)),
    st.tuples(st.just("delete"), st.sampled_from(["model.safetensors", "config.json"]), st.just(0)),
    st.tuples(st.just("config"), st.sampled_from(sorted(ORACLES["base"]) + sorted(ORACLES["lora"])
                                                 + ["delta_type", "opendelta_save_id", "extra"]), VALUES),
    st.tuples(st.just("tensors"), st.sampled_from(["drop", "extra", "reshape", "dtype"]), st.integers(0, 5)),
    st.tuples(st.just("foreign"), st.sampled_from(["pytorch_model.bin", "adapter_config.json", "leftover"]),
              st.just(0)),
)


def _corrupt(path, kind, what, detail):
    import safetensors.torch as st_torch

    target = os.path.join(path, what) if kind in ("truncate", "flip", "delete") else None
    if kind == "truncate":
        with open(target, "r+b") as f:
            f.truncate(int(os.path.getsize(target) * detail))
    elif kind == "flip":
        with open(target, "r+b") as f:
            data = bytearray(f.read())
            data[detail % len(data)] ^= 0xFF
            f.seek(0)
            f.write(data)
    elif kind == "delete":
        os.remove(target)
    elif kind == "config":
        file = os.path.join(path, "config.json")
        with open(file) as f:
            data = json.load(f)
        data[what] = detail
        with open(file, "w") as f:
            json.dump(data, f)
    elif kind == "tensors":
        file = os.path.join(path, "model.safetensors")
        tensors, metadata = st_torch.load_file(file), None
        from safetensors import safe_open

        with safe_open(file, "pt") as f:
            metadata = f.metadata()
        key = sorted(tensors)[detail % len(tensors)]
        if what == "drop":
            del tensors[key]
        elif what == "extra":
            tensors["inp.lora.unexpected"] = torch.zeros(2)
        elif what == "reshape":
            tensors[key] = tensors[key].reshape(-1)[:-1].clone() if tensors[key].numel() > 1 else torch.zeros(3)
        else:
            tensors[key] = tensors[key].double()
        st_torch.save_file(tensors, file, metadata=metadata)
    else:  # a file of another checkpoint format, or a sibling left by an interrupted save
        if what == "leftover":
            shutil.copytree(path, os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.opendelta-new-0-1-x"))
        else:
            with open(os.path.join(path, what), "w") as f:
                f.write("{}")


@settings(max_examples=int(os.environ.get("OPENDELTA_PROPERTY_EXAMPLES", 250)), **SETTINGS)
@given(corruption=CORRUPTIONS)
def test_a_corrupted_checkpoint_loads_exactly_or_fails_cleanly(tmp_path_factory, corruption):
    model = Tiny()
    delta = LoraModel(model, modified_modules=["inp", "out"], lora_r=2)
    _perturb(delta, seed=3)
    folder = tmp_path_factory.mktemp("corrupt")
    path = delta.save_finetuned(folder / "ckpt")
    _corrupt(path, *corruption)
    fresh = Tiny()
    before, files = model_state(fresh), directory_state(path)
    try:
        loaded = LoraModel.from_finetuned(path, fresh)
    except CheckpointError:
        assert_same(before, model_state(fresh), f"backbone after {corruption}")
        leftover = corruption[0] == "foreign" and corruption[1] == "leftover"
        assert leftover or directory_state(path) == files  # a leftover sibling is cleaned up
        return
    # Loaded: the delta's values are those in the file; detach restores the backbone exactly.
    assert torch.equal(_out(fresh), _reference_of(loaded))
    loaded.detach()
    assert_same(before, model_state(fresh), "backbone after detach")


def _reference_of(delta):
    model = Tiny().eval()  # as from_finetuned leaves the backbone (dropout off)
    cfg = delta.config
    fresh = LoraModel(model, modified_modules=cfg.modified_modules, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout)
    fresh.load_state_dict(copy.deepcopy(delta.state_dict()))
    return _out(model)
