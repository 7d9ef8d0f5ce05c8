"""The backbone fingerprint (opendelta.io.hashing.gen_model_hash): what it detects, and the
remembered per-tensor digests that make repeated hashing cheap without going stale."""
import copy
import pickle

import pytest
import torch

import opendelta.io.hashing as hashing
import tiny_models as tm
from opendelta import LoraModel
from opendelta.io.hashing import gen_model_hash


@pytest.fixture
def digests(monkeypatch):
    """Counts the tensors whose bytes are read (SHA-256 over all of them)."""
    calls = []
    real = hashing.tensor_digest

    def counting(tensor):
        calls.append(tuple(tensor.shape))
        return real(tensor)
    monkeypatch.setattr(hashing, "tensor_digest", counting)
    return calls


def _reference_hash(model):
    """The same recipe from scratch: a deep copy carries no remembered digests."""
    return gen_model_hash(copy.deepcopy(model))


def test_detects_a_changed_parameter_a_changed_shape_and_another_architecture():
    model = tm.build("bert", "lm")
    h = gen_model_hash(model)
    assert gen_model_hash(tm.build("bert", "lm")) == h  # the same backbone built again

    changed = tm.build("bert", "lm")
    with torch.no_grad():
        changed.bert.encoder.layer[1].attention.self.query.weight[3, 5] += 1e-3  # one element
    assert gen_model_hash(changed) != h

    bias = tm.build("bert", "lm")
    with torch.no_grad():
        bias.bert.encoder.layer[0].output.dense.bias[0] = 0.5
    assert gen_model_hash(bias) != h

    reshaped = tm.build("bert", "lm")
    reshaped.bert.encoder.layer[0].intermediate.dense = torch.nn.Linear(32, 48)
    reshaped.bert.encoder.layer[0].output.dense = torch.nn.Linear(48, 32)
    assert gen_model_hash(reshaped) != h
    assert gen_model_hash(reshaped, with_parameters=False) != gen_model_hash(model, with_parameters=False)

    for other in (tm.build("roberta", "lm"), tm.build("bert", "lm", num_hidden_layers=3), tm.build("bert", "cls")):
        assert gen_model_hash(other) != h
        assert gen_model_hash(other, with_parameters=False) != gen_model_hash(model, with_parameters=False)


def test_repeated_hashes_read_each_tensor_once(digests):
    model = tm.build("bert", "lm")
    first = gen_model_hash(model)
    read = len(digests)
    assert read == len(list(model.parameters()))
    LoraModel(model)  # deltas are not part of the backbone's hash
    assert gen_model_hash(model) == first
    assert gen_model_hash(model, skip_parameters=["cls.predictions.bias"]) != first
    assert len(digests) == read  # nothing read again


@pytest.mark.parametrize("write", ["no_grad", "load_state_dict", "data", "data_one_element_sampled",
                                   "fused_adamw", "foreach_adamw", "to_double"])
def test_remembered_digests_follow_every_kind_of_write(write, digests):
    model = tm.build("bert", "lm")
    before = gen_model_hash(model)
    weight = model.bert.encoder.layer[0].attention.self.value.weight  # [32, 32], 4 KiB
    if write == "no_grad":
        with torch.no_grad():
            weight.mul_(1.5)
    elif write == "load_state_dict":
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["bert.encoder.layer.0.attention.self.value.weight"].add_(0.01)
        model.load_state_dict(state)
    elif write == "data":
        weight.data.add_(0.01)  # bypasses the version counter: the samples see it
    elif write == "data_one_element_sampled":
        weight.data.view(-1)[-1] += 1.0  # the last bytes are always sampled
    elif write in ("fused_adamw", "foreach_adamw"):  # fused steps do not move version counters
        weight.grad = torch.ones_like(weight)
        option = {"fused": True} if write == "fused_adamw" else {"foreach": True}
        torch.optim.AdamW([weight], lr=0.1, **option).step()
    else:
        model.double()
    after = gen_model_hash(model)
    assert after != before
    assert after == _reference_hash(model)


def test_what_the_remembered_digest_cannot_see_is_documented():
    """An in-place write through ``.data`` between the samples of a tensor hashed before
    in this process is not seen (the documented limit); a fresh hash sees it."""
    model = tm.build("bert", "lm")
    weight = model.bert.embeddings.word_embeddings.weight  # [96, 32], 12 KiB
    before = gen_model_hash(model)
    weight.data[1, 3] += 1.0  # bytes 140-143: before the second sample (at ~816)
    assert gen_model_hash(model) == before
    assert _reference_hash(model) != before
    weight.__dict__.pop(hashing._DIGEST_ATTR)  # forgetting the digest reads the bytes again
    assert gen_model_hash(model) == _reference_hash(model)


def test_the_documented_full_hash_is_unchanged():
    """``opendelta.utils.model_md5.gen_model_hash(model, with_parameters=True)``: every
    parameter value counts; the remembered digests only spare reading them again."""
    from opendelta.utils.model_md5 import gen_model_hash as documented

    model = tm.build("bert", "lm")
    assert documented is gen_model_hash
    cold = documented(model, with_parameters=True)
    assert documented(model, with_parameters=True) == cold == _reference_hash(model)
    assert documented(model, with_parameters=False) != cold


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_and_pickles_do_not_inherit_stale_digests(how):
    model = tm.build("bert", "lm")
    h = gen_model_hash(model)
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert gen_model_hash(clone) == h
    with torch.no_grad():
        for p in clone.parameters():
            p.data.view(-1)[1] += 0.5  # no version bump, between samples of the large tensors
    assert gen_model_hash(clone) != h  # the copy's bytes were read: nothing remembered
    assert gen_model_hash(model) == h
