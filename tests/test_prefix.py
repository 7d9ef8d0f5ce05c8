"""PrefixModel: prefixes through transformers' Cache API, masks, generate(), export."""
import copy
import io

import pytest
import torch

import tiny_models as tm
from helpers import UNROUTED, outputs, perturb, serve_interleaved_distilbert, trainable_names
from opendelta import AutoDeltaConfig, AutoDeltaModel, LoraModel, PrefixModel
from opendelta.methods.prefix import PrefixLayer, PrefixReparameterization

SUPPORTED = [a for a in tm.ARCH_NAMES if a != "deberta-v2"]
SMALL = dict(prefix_token_num=3, embed_dim=16, mid_dim=16)


def _attention_count(arch):
    # self-attention of every block, plus the decoder's cross-attention
    return tm.LAYERS * 3 if arch in tm.ENCODER_DECODER else tm.LAYERS


@pytest.mark.parametrize("arch", SUPPORTED)
def test_one_prefix_per_attention_and_one_mlp(arch):
    """Self-attention of every block plus the decoder's cross-attention get prefixes, all from
    one reparameterisation MLP under OpenDelta's names (generic checks: test_matrix.py)."""
    delta = PrefixModel(tm.build(arch, "lm"), **SMALL)
    assert len(delta.prefix_layers()) == _attention_count(arch)
    names = {n for n, _ in delta.named_parameters()}
    assert names and all(".reparams." in n for n in names)
    assert len({n.split(".reparams.")[0] for n in names}) == 1


def test_documented_defaults():
    model = tm.build("gpt2", "lm")
    delta = PrefixModel(model)
    cfg = delta.config
    assert (cfg.prefix_token_num, cfg.reparameterize, cfg.embed_dim, cfg.mid_dim) == (6, True, 512, 512)
    shapes = {n: tuple(p.shape) for n, p in delta.named_parameters()}
    # 2 layers x (key + value) x hidden 32 outputs per prefix position.
    assert shapes == {
        "transformer.h.0.attn.reparams.wte.weight": (6, 512),
        "transformer.h.0.attn.reparams.control_trans.0.weight": (512, 512),
        "transformer.h.0.attn.reparams.control_trans.0.bias": (512,),
        "transformer.h.0.attn.reparams.control_trans.2.weight": (2 * 2 * tm.HIDDEN, 512),
        "transformer.h.0.attn.reparams.control_trans.2.bias": (2 * 2 * tm.HIDDEN,),
    }
    inputs = tm.example_inputs("gpt2")
    model(**inputs).logits.sum().backward()
    assert all(p.grad is not None for _, p in delta.named_parameters())


def test_reparameterization_layout_matches_opendelta():
    """Per prefix position, the MLP's outputs are layer 0's key, layer 0's value, layer 1's
    key, ... (OpenDelta's view(P, 2 * layers, dim)); each layer computes its own slice."""
    model = tm.build("bert", "lm")
    delta = PrefixModel(model, **SMALL)
    reparams = next(l for _, l in delta.delta_layers() if isinstance(l, PrefixReparameterization))
    with torch.no_grad():
        full = reparams.control_trans(reparams.wte(torch.arange(3)))  # [P, 2 * layers * hidden]
        by_layer = full.view(3, 2 * tm.LAYERS, tm.HIDDEN).permute(1, 0, 2)
        for i, (_, layer) in enumerate(delta.prefix_layers()):
            key, value = layer.key_value()
            torch.testing.assert_close(key, by_layer[2 * i], rtol=0, atol=1e-6)
            torch.testing.assert_close(value, by_layer[2 * i + 1], rtol=0, atol=1e-6)


def test_attention_by_hand_gpt2():
    """One GPT-2 attention with learnt prefixes equals softmax(q [Pk; k]^T / sqrt(d)) [Pv; v]."""
    model = tm.build("gpt2", "lm")
    model.set_attn_implementation("eager")
    delta = PrefixModel(model, prefix_token_num=2, reparameterize=False)
    attn = model.transformer.h[0].attn
    seen = {}
    attn.register_forward_hook(lambda m, a, k, o: seen.update(x=a[0] if a else k["hidden_states"], y=o[0]),
                               with_kwargs=True)
    ids = tm.example_inputs("gpt2", batch=1, length=4)["input_ids"]
    with torch.no_grad():
        model(input_ids=ids)
        x = seen["x"][0]  # [4, 32]
        q, k, v = (x @ attn.c_attn.weight + attn.c_attn.bias).split(tm.HIDDEN, dim=-1)
        layer = delta.prefix_layers()[0][1]
        k = torch.cat([layer.past_key, k])
        v = torch.cat([layer.past_value, v])
        d = tm.HIDDEN // tm.HEADS
        heads = []
        for h in range(tm.HEADS):
            sl = slice(h * d, (h + 1) * d)
            scores = q[:, sl] @ k[:, sl].T / d ** 0.5  # [4, 2 + 4]
            causal = torch.ones(4, 4).tril().bool()
            visible = torch.cat([torch.ones(4, 2, dtype=torch.bool), causal], dim=1)
            heads.append(scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v[:, sl])
        expected = torch.cat(heads, -1) @ attn.c_proj.weight + attn.c_proj.bias
    torch.testing.assert_close(seen["y"][0], expected, rtol=0, atol=1e-5)


#: special tokens kept out of generated sequences (tiny random BART would emit only 2).
SUPPRESS = [0, 1, 2]


def _next_token(logits):
    logits = logits[:, -1].clone()
    logits[:, SUPPRESS] = float("-inf")
    return logits.argmax(-1, keepdim=True)


def _greedy(model, arch, inputs, steps, with_logits=False):
    """Greedy decoding by full forwards without a cache: the sequences, and with
    ``with_logits`` also the raw next-token logits of every step ``[batch, steps, vocab]``."""
    step_logits = []
    if arch in tm.ENCODER_DECODER:
        ids = torch.full((inputs["input_ids"].shape[0], 1), model.config.decoder_start_token_id)
        for _ in range(steps):
            logits = model(**inputs, decoder_input_ids=ids, use_cache=False).logits
            step_logits.append(logits[:, -1])
            ids = torch.cat([ids, _next_token(logits)], 1)
    else:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            step_logits.append(logits[:, -1])
            ids = torch.cat([ids, _next_token(logits)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return (ids, torch.stack(step_logits, 1)) if with_logits else ids


@pytest.mark.parametrize("arch", ["gpt2", "opt", "t5", "bart", "llama"])
def test_generate_with_cache_equals_greedy_forward(arch):
    """Tokens exactly and logits within 1e-4, on both attention implementations."""
    model = tm.build(arch, "lm")
    delta = PrefixModel(model, **SMALL)
    perturb(delta, std=0.5)
    inputs = tm.example_inputs(arch)
    inputs.pop("decoder_input_ids", None)
    model.generation_config.eos_token_id = None
    model.generation_config.forced_eos_token_id = None
    steps = 6
    greedy = dict(max_new_tokens=steps, do_sample=False, use_cache=True, pad_token_id=0, suppress_tokens=SUPPRESS)
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            out = model.generate(**inputs, **greedy, output_logits=True, return_dict_in_generate=True)
            expected, expected_logits = _greedy(model, arch, inputs, steps, with_logits=True)
        assert torch.equal(out.sequences, expected)
        assert torch.allclose(torch.stack(out.logits, 1), expected_logits, atol=1e-4)
    delta.detach()
    with torch.no_grad():
        plain = model.generate(**inputs, **greedy)
    assert not torch.equal(out.sequences, plain)  # the prefixes steer generation


def _padded(arch, pad):
    """A batch of two rows, the second padded by ``pad`` positions (left for decoder-only
    models, right otherwise), and a function giving its logits restricted to real tokens."""
    inputs = tm.example_inputs(arch, batch=2, length=7, seed=3)
    mask = inputs["attention_mask"]
    if arch in tm.DECODER_ONLY:
        mask[1, :pad] = 0
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        alone = {"input_ids": inputs["input_ids"][1:, pad:], "attention_mask": mask[1:, pad:]}
        alone["position_ids"] = (alone["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        real = slice(pad, None)
    else:
        mask[1, 7 - pad:] = 0
        alone = {"input_ids": inputs["input_ids"][1:, :7 - pad], "attention_mask": mask[1:, :7 - pad]}
        real = slice(None) if arch in tm.ENCODER_DECODER else slice(0, 7 - pad)
        if arch in tm.ENCODER_DECODER:
            alone["decoder_input_ids"] = inputs["decoder_input_ids"][1:]
    return inputs, alone, real


@pytest.mark.parametrize("arch", SUPPORTED)
def test_padded_batch_rows_equal_rows_alone(arch):
    model = tm.build(arch, "lm")
    delta = PrefixModel(model, **SMALL)
    perturb(delta, std=0.5)
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        inputs, alone, real = _padded(arch, pad=3)
        batch = outputs(model, inputs)[1, real]
        single = outputs(model, alone)[0]
        torch.testing.assert_close(batch, single, rtol=0, atol=1e-5)
        # and the padded row differs from the same row without prefixes
        delta.detach()
        assert not torch.allclose(outputs(model, alone)[0], single, atol=1e-3)
        delta.attach()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_generate_equals_rows_alone(arch):
    model = tm.build(arch, "lm")
    perturb(PrefixModel(model, **SMALL), std=0.5)
    model.generation_config.eos_token_id = None
    inputs, alone, _ = _padded(arch, pad=2)
    inputs.pop("position_ids"), alone.pop("position_ids")
    with torch.no_grad():
        both = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
        single = model.generate(**alone, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(both[1, 2:], single[0])


@pytest.mark.parametrize("arch", ["bert", "distilbert", "t5", "llama"])
def test_exported_prefixes_give_identical_outputs(arch):
    model = tm.build(arch, "lm")
    delta = PrefixModel(model, **SMALL)
    delta.freeze_module()
    perturb(delta)
    inputs = tm.example_inputs(arch)
    before = outputs(model, inputs)
    prefixes = delta.prefixes()

    delta.export_prefixes()
    assert torch.equal(outputs(model, inputs), before)
    assert delta.config.reparameterize is False
    names = {n for n, _ in delta.named_parameters()}
    assert len(names) == 2 * len(prefixes)
    assert all(n.endswith((".prefix.past_key", ".prefix.past_value")) for n in names)
    assert trainable_names(model) == names
    for host, (key, value) in delta.prefixes().items():
        assert torch.equal(key, prefixes[host][0]) and torch.equal(value, prefixes[host][1])

    # A fresh backbone with reparameterize=False loads exactly those parameters.
    state = {n: p.detach().clone() for n, p in delta.named_parameters()}
    other = tm.build(arch, "lm")
    fresh = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(delta.config.to_dict()), other)
    assert {n for n, _ in fresh.named_parameters()} == names
    result = other.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert torch.equal(outputs(other, inputs), before)

    delta.detach()
    assert not any("prefix" in n for n, _ in model.named_parameters())
    delta.attach()
    assert torch.equal(outputs(model, inputs), before)


def test_unsupported_architecture_raises():
    model = tm.build("deberta-v2", "lm")
    with pytest.raises(NotImplementedError, match=r"DebertaV2Attention.*deberta-v2.*BERT, RoBERTa"):
        PrefixModel(model)
    with pytest.raises(NotImplementedError, match="Linear"):
        PrefixModel(tm.build("bert", "lm"), modified_modules=["attention.self.query"])


def test_unsupported_attention_implementation_raises():
    model = tm.build("llama", "lm")
    PrefixModel(model, **SMALL)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(NotImplementedError, match="attn_implementation"):
        model(**tm.example_inputs("llama"))


def test_t5_stack_must_be_targeted_whole():
    with pytest.raises(ValueError, match="all of them or none"):
        PrefixModel(tm.build("t5", "lm"), modified_modules=["encoder.block.0.layer.0"])


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="prefix_token_num"):
        PrefixModel(tm.build("gpt2", "lm"), prefix_token_num=0)
    with pytest.raises(ValueError, match="mid_dim"):
        PrefixModel(tm.build("gpt2", "lm"), mid_dim=-3)


def test_copy_pickle_and_composition():
    model = tm.build("llama", "lm")
    inputs = tm.example_inputs("llama")
    prefix = PrefixModel(model, **SMALL)
    lora = LoraModel(model)
    perturb(prefix), perturb(lora)
    tuned = outputs(model, inputs)

    twin = copy.deepcopy(model)
    assert torch.equal(outputs(twin, inputs), tuned)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(outputs(torch.load(buffer, weights_only=False), inputs), tuned)
    # The copy has its own MLP: changing it leaves the original alone.
    twin_reparams = [m for m in twin.modules() if isinstance(m, PrefixReparameterization)][0]
    with torch.no_grad():
        twin_reparams.wte.weight.add_(1.0)
    assert torch.equal(outputs(model, inputs), tuned)
    assert not torch.equal(outputs(twin, inputs), tuned)

    prefix.detach()
    lora_only = outputs(model, inputs)
    prefix.attach()
    lora.detach()
    prefix.detach()
    base = outputs(model, inputs)
    lora.attach()
    assert torch.equal(outputs(model, inputs), lora_only)
    prefix.attach()
    assert torch.equal(outputs(model, inputs), tuned)
    assert not torch.equal(base, tuned)


def test_two_prefix_deltas_stack():
    """Two prefix deltas on one attention: the second's positions come first in the key
    sequence and both are visible; generation still matches the uncached forward."""
    model = tm.build("gpt2", "lm")
    first = PrefixModel(model, **SMALL)
    second = PrefixModel(model, name="prefix_b", prefix_token_num=2, reparameterize=False)
    perturb(first), perturb(second)
    layers = [l for l in model.transformer.h[0].attn.children() if isinstance(l, PrefixLayer)]
    assert len(layers) == 2
    inputs = tm.example_inputs("gpt2")
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                   suppress_tokens=SUPPRESS)
    assert torch.equal(generated, _greedy(model, "gpt2", inputs, 4))


def test_training_lowers_the_loss():
    model = tm.build("gpt2", "lm")
    delta = PrefixModel(model, **SMALL)
    delta.freeze_module()
    model.train()
    inputs = tm.example_inputs("gpt2")
    optimizer = torch.optim.AdamW([p for _, p in delta.named_parameters()], lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.98 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_failed_construction_leaves_backbone_untouched():
    model = tm.build("t5", "lm")
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError):
        PrefixModel(model, modified_modules=["encoder.block.0.layer.0", "decoder.block.0.layer.0",
                                             "decoder.block.1.layer.0"])
    assert [n for n, _ in model.named_modules()] == names
    assert not model.encoder.block[0].layer[0]._forward_pre_hooks


def _t5_bias(attention, query_length, key_length, first_query):
    """T5's relative position bias ``[1, heads, query, key]`` for queries at positions
    ``first_query ..`` and keys at ``0 ..`` (computed by hand: compute_bias's signature
    differs between transformers releases)."""
    context = torch.arange(query_length)[:, None] + first_query
    memory = torch.arange(key_length)[None, :]
    bucket = attention._relative_position_bucket(
        memory - context, bidirectional=not attention.is_decoder,
        num_buckets=attention.relative_attention_num_buckets, max_distance=attention.relative_attention_max_distance)
    return attention.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)


def test_t5_relative_positions_of_real_tokens_are_unchanged():
    """T5 sees the prefixes at positions -P .. -1: the bias between real tokens is the
    backbone's own, the prefix columns get the bias of those earlier positions."""
    model = tm.build("t5", "lm")
    PrefixModel(model, **SMALL)
    seen = {}
    for side in ("encoder", "decoder"):
        layer = getattr(model, side).block[0].layer[0]
        layer.register_forward_hook(lambda m, a, o, side=side: seen.update({side: o[1]}))
    inputs = tm.example_inputs("t5")  # encoder length 7, decoder length 5
    outputs(model, inputs)
    for side, length in (("encoder", 7), ("decoder", 5)):
        attention = getattr(model, side).block[0].layer[0].SelfAttention
        with torch.no_grad():
            own = _t5_bias(attention, length, length, 0)
            shifted = _t5_bias(attention, length, 3 + length, 3)
        bias = seen[side]
        assert bias.shape[-1] == 3 + length
        # transformers < 5.24 add the attention mask to the bias: compare the visible entries,
        # which are all the prefix columns and (causal decoder) real keys up to the query.
        visible = (bias > torch.finfo(bias.dtype).min / 2)[0, 0]
        required = torch.ones(length, 3 + length, dtype=torch.bool)
        if side == "decoder":
            required[:, 3:] = torch.ones(length, length).tril().bool()
        assert visible[required].all()
        for row in bias:  # [heads, query, P + key], one per batch row (< 5.24) or shared
            assert torch.equal(row[:, visible], shifted[0][:, visible])
            assert torch.equal(row[:, :, 3:][:, visible[:, 3:]], own[0][:, visible[:, 3:]])


def test_distilbert_concurrent_forwards_are_isolated():
    """Two threads run one DistilBERT with a prefix delta (no routing), each on its own inputs,
    forced to interleave inside the first attention: both have passed its pre-hook and the key
    projection, then the first thread finishes the attention before the second reaches the
    value projection. The prefixes travel per thread from the attention's pre-hook to the
    projections, so each thread gets its single-threaded result."""
    model = tm.build("distilbert", "lm")
    perturb(PrefixModel(model, **SMALL), std=0.5)
    jobs = {"first": tm.example_inputs("distilbert", seed=1),
            "second": tm.example_inputs("distilbert", batch=3, length=5, seed=2)}
    expected = {name: outputs(model, inputs) for name, inputs in jobs.items()}
    results = serve_interleaved_distilbert(model, {name: (UNROUTED, inputs) for name, inputs in jobs.items()})
    for name in jobs:
        assert torch.equal(results[name], expected[name]), name
