"""LowRankAdapter, Compacter, ParallelAdapter and SoftPrompt: generate(), composition, legacy
configs and the behaviours specific to each method (the generic checks are in test_matrix.py)."""
import copy
import io

import pytest
import torch

import tiny_models as tm
from helpers import outputs, perturb
from matrix_cases import METHODS as ALL_METHODS, PROMPT, real_positions
from opendelta import (AutoDeltaConfig, AutoDeltaModel, CompacterModel, LoraModel, LowRankAdapterModel,
                       ParallelAdapterModel, SoftPromptModel)

#: the methods this file is about (the matrix of all methods is in test_matrix.py)
METHODS = {name: ALL_METHODS[name] for name in ("low_rank_adapter", "compacter", "parallel_adapter",
                                                 "soft_prompt")}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["bert", "t5", "llama"])
def test_composes_with_lora(method, arch):
    """LoRA and the method on one backbone: either can be detached, both detached is the backbone."""
    cls, kwargs = METHODS[method]
    model = tm.build(arch, "lm")
    inputs = tm.example_inputs(arch)
    base = outputs(model, inputs)
    lora = LoraModel(model)
    perturb(lora, seed=1)
    only_lora = outputs(model, inputs)
    delta = cls(model, **kwargs)
    perturb(delta, seed=2)
    both = outputs(model, inputs)
    lora.detach()
    only_delta = outputs(model, inputs)
    assert not torch.allclose(real_positions(only_delta, method, arch), base)
    assert not torch.allclose(only_delta, both)
    lora.attach()
    assert torch.equal(outputs(model, inputs), both)
    delta.detach()
    assert torch.equal(outputs(model, inputs), only_lora)
    lora.detach()
    assert torch.equal(outputs(model, inputs), base)


# --------------------------------------------------------------------------- generate
def greedy_by_forward(model, inputs, steps, arch):
    """Greedy decoding by full forward passes without cache, what generate() must reproduce:
    (new tokens [batch, steps], next-token logits [batch, steps, vocab])."""
    step_logits = []
    with torch.no_grad():
        if arch in tm.ENCODER_DECODER:
            batch = inputs["input_ids"].shape[0]
            tokens = torch.full((batch, 1), model.config.decoder_start_token_id)
            for _ in range(steps):
                step_logits.append(model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                         decoder_input_ids=tokens, use_cache=False).logits[:, -1])
                tokens = torch.cat([tokens, step_logits[-1].argmax(-1, keepdim=True)], dim=1)
            return tokens[:, 1:], torch.stack(step_logits, 1)
        tokens = inputs["input_ids"]
        for _ in range(steps):
            step_logits.append(model(input_ids=tokens, attention_mask=torch.ones_like(tokens),
                                     use_cache=False).logits[:, -1])
            tokens = torch.cat([tokens, step_logits[-1].argmax(-1, keepdim=True)], dim=1)
        return tokens[:, inputs["input_ids"].shape[1]:], torch.stack(step_logits, 1)


def generated(model, inputs, steps, arch):
    """Greedy generate() with the KV cache: (new tokens [batch, steps], logits [batch, steps, vocab])."""
    model.generation_config.eos_token_id = None  # always `steps` new tokens
    with torch.no_grad():
        out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             max_new_tokens=steps, do_sample=False, use_cache=True,
                             output_logits=True, return_dict_in_generate=True)
    seq = out.sequences
    tokens = seq[:, 1:] if arch in tm.ENCODER_DECODER else seq[:, inputs["input_ids"].shape[1]:]
    return tokens, torch.stack(out.logits, 1)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "t5", "bart", "llama"])
@pytest.mark.parametrize("method", ["soft_prompt", "parallel_adapter"])
def test_generate_matches_stepwise_greedy(method, arch):
    """generate() with the KV cache gives the tokens and logits of cache-free forward passes."""
    cls, kwargs = METHODS[method]
    model = tm.build(arch, "lm")
    inputs = {k: v for k, v in tm.example_inputs(arch).items() if k != "decoder_input_ids"}
    plain, plain_logits = generated(model, inputs, 5, arch)
    delta = cls(model, **kwargs)
    perturb(delta, std=0.5)
    tokens, logits = generated(model, inputs, 5, arch)
    assert tokens.shape == (2, 5)
    by_forward, forward_logits = greedy_by_forward(model, inputs, 5, arch)
    assert torch.equal(tokens, by_forward)
    assert torch.allclose(logits, forward_logits, atol=1e-4)
    assert not torch.allclose(logits, plain_logits, atol=1e-3)  # the delta is used while generating
    delta.detach()
    tokens, logits = generated(model, inputs, 5, arch)
    assert torch.equal(tokens, plain) and torch.equal(logits, plain_logits)


# --------------------------------------------------------------------------- SoftPrompt
def _greedy_generate(model, arch, **inputs):
    """Greedy generate() with the KV cache: (new tokens [batch, 5], logits [batch, 5, vocab])."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=True, output_logits=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[:, 1:] if arch in tm.ENCODER_DECODER else out.sequences[:, -5:]
    return tokens, torch.stack(out.logits, 1)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama", "t5"])
def test_soft_prompt_generate_padded_and_from_embeddings(arch, implementation):
    """With the KV cache, on both attention implementations (eager always applies the
    mask, so a prompt misplaced in the cache or in the positions shows): a row generates
    what greedy cache-free forwards give, alone or padded in a batch (on the left for
    decoder-only models; T5's encoder, whose relative positions would put the padding
    between prompt and text, is padded on the right as its tokenizer does), and
    generate(inputs_embeds=...) what generate(input_ids=...) does."""
    model = tm.build(arch, "lm")
    model.set_attn_implementation(implementation)
    model.generation_config.eos_token_id = None
    perturb(SoftPromptModel(model, soft_token_num=PROMPT), std=0.5)
    ids = torch.randint(3, tm.VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    real = slice(4) if arch in tm.ENCODER_DECODER else slice(2, None)
    mask[1] = 0
    mask[1, real] = 1
    ids[1][mask[1] == 0] = 0
    batch = _greedy_generate(model, arch, input_ids=ids, attention_mask=mask)
    single = {"input_ids": ids[1:, real], "attention_mask": mask[1:, real]}
    alone = _greedy_generate(model, arch, **single)
    reference = greedy_by_forward(model, single, 5, arch)
    assert torch.equal(alone[0], reference[0])
    assert torch.allclose(alone[1], reference[1], atol=1e-4)
    assert torch.equal(batch[0][1:], alone[0])
    assert torch.allclose(batch[1][1:], alone[1], atol=1e-4)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids[:1])
    from_embeds = _greedy_generate(model, arch, inputs_embeds=embeds, attention_mask=mask[:1])
    assert torch.equal(from_embeds[0], batch[0][:1])
    assert torch.allclose(from_embeds[1], batch[1][:1], atol=1e-4)


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_soft_prompt_defaults(arch):
    """100 soft tokens, initialised from the 96-token vocabulary (cycling)."""
    model = tm.build(arch, "lm")
    delta = SoftPromptModel(model)
    (name, embeds), = delta.named_parameters()
    assert embeds.shape == (100, tm.HIDDEN)
    assert name == ("encoder.soft_prompt_layer.soft_embeds" if arch == "t5" else "soft_prompt_layer.soft_embeds")
    table = model.get_input_embeddings().weight
    assert torch.equal(embeds[:96], table) and torch.equal(embeds[96:], table[:4])
    out = outputs(model, tm.example_inputs(arch))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["gpt2", "bert", "t5"])
def test_soft_prompt_inputs_embeds_equals_input_ids(arch):
    model = tm.build(arch, "lm")
    inputs = tm.example_inputs(arch)
    SoftPromptModel(model, soft_token_num=PROMPT, token_init=False)
    by_ids = outputs(model, inputs)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    by_embeds = outputs(model, {**{k: v for k, v in inputs.items() if k != "input_ids"}, "inputs_embeds": embeds})
    assert torch.allclose(by_ids, by_embeds, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_soft_prompt_labels_are_extended(arch):
    """Token-level labels get -100 for the prompt: the loss is over the caller's tokens only."""
    model = tm.build(arch, "lm")
    inputs = tm.example_inputs(arch)
    SoftPromptModel(model, soft_token_num=PROMPT)
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    logits = out.logits[:, PROMPT:].float()
    if arch == "bert":  # masked LM: position i predicts labels[i]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, tm.VOCAB), labels.reshape(-1))
    else:  # causal LM: position i predicts labels[i + 1]; the last prompt position predicts labels[0]
        full = out.logits[:, PROMPT - 1:-1].float()
        expected = torch.nn.functional.cross_entropy(full.reshape(-1, tm.VOCAB), labels.reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_soft_prompt_padded_batch_rows_match_single_rows(arch):
    """The prompt's mask is joined to each row's padding mask (encoder and cross-attention)."""
    task = "cls" if arch == "bert" else "lm"
    model = tm.build(arch, task)
    inputs = tm.example_inputs(arch, task)
    inputs["attention_mask"][1, 4:] = 0
    inputs["input_ids"][1, 4:] = 0
    SoftPromptModel(model, soft_token_num=PROMPT, token_init=False)
    batch = outputs(model, inputs)
    single = {k: v[1:2, :4] if k in ("input_ids", "attention_mask") else v[1:2] for k, v in inputs.items()}
    assert torch.allclose(batch[1:2], outputs(model, single), atol=1e-5)


def test_soft_prompt_positional_call_and_mask_not_mutated():
    model = tm.build("bert", "lm")
    inputs = tm.example_inputs("bert")
    SoftPromptModel(model, soft_token_num=PROMPT)
    mask = inputs["attention_mask"].clone()
    with torch.no_grad():
        positional = model(inputs["input_ids"], inputs["attention_mask"]).logits
    assert torch.equal(positional, outputs(model, inputs))
    assert torch.equal(inputs["attention_mask"], mask)  # the caller's tensor is left alone


def test_soft_prompt_rejects_modified_modules_and_accepts_legacy_root():
    with pytest.raises(ValueError, match="takes no modified_modules"):
        SoftPromptModel(tm.build("bert", "lm"), modified_modules=["attn"])
    legacy = {"delta_type": "soft_prompt", "modified_modules": ["root"], "soft_token_num": 3,
              "init_range": 0.5, "token_init": True, "exclude_modules": ["lm_head"]}
    delta = AutoDeltaModel.from_config(legacy, tm.build("bert", "lm"))
    assert isinstance(delta, SoftPromptModel) and delta.num_delta_parameters() == 3 * tm.HIDDEN


# --------------------------------------------------------------------------- Compacter
def test_compacter_indivisible_sizes_raise():
    with pytest.raises(ValueError, match=r"bottleneck .* 2 is not divisible by hypercomplex_division=4"):
        CompacterModel(tm.build("bert", "lm"))  # 32 // 16 = 2
    with pytest.raises(ValueError, match="hidden size 32 is not divisible by hypercomplex_division=3"):
        CompacterModel(tm.build("bert", "lm"), hypercomplex_division=3, reduction_factor=8)
    with pytest.raises(ValueError, match="hypercomplex_division must be a positive integer"):
        CompacterModel(tm.build("bert", "lm"), hypercomplex_division=0)


def test_compacter_defaults_on_hidden_64():
    model = tm.build("bert", "lm", hidden_size=64)
    delta = CompacterModel(model)
    shapes = {n.split("compactor.")[1]: tuple(p.shape) for n, p in delta.named_parameters()
              if "layer.0.attention" in n}
    assert shapes == {"down_sampler.phm_rule": (4, 4, 4), "down_sampler.W_left": (4, 16, 1),
                      "down_sampler.W_right": (4, 1, 1), "down_sampler.b": (4,),
                      "up_sampler.phm_rule": (4, 4, 4), "up_sampler.W_left": (4, 1, 1),
                      "up_sampler.W_right": (4, 1, 16), "up_sampler.b": (64,)}


def test_compacter_shared_parameters_are_shared():
    kwargs = dict(reduction_factor=8)
    separate = CompacterModel(tm.build("bert", "lm"), **kwargs).num_delta_parameters()
    model = tm.build("bert", "lm")
    inputs = tm.example_inputs("bert")
    delta = CompacterModel(model, shared_phm_rule=True, shared_W_phm=True, **kwargs)
    layers = [layer for _, layer in delta.delta_layers()]
    assert len(layers) == 4
    samplers = [s for layer in layers for s in (layer.down_sampler, layer.up_sampler)]
    assert len({id(s.phm_rule) for s in samplers}) == 1
    assert len({id(layer.down_sampler.W_left) for layer in layers}) == 1
    assert len({id(layer.up_sampler.W_right) for layer in layers}) == 1
    assert layers[0].down_sampler.W_left is not layers[0].up_sampler.W_left
    # 8 rules of 64 and 4 x 2 W sets become one rule and one W set per direction.
    w_down, w_up = 4 * 8 * 1 + 4 * 1 * 1, 4 * 1 * 1 + 4 * 1 * 8
    assert separate - delta.num_delta_parameters() == 7 * 64 + 3 * (w_down + w_up)
    # One parameter, one gradient: the sum over every layer that uses it.
    delta.freeze_module()
    model(**inputs).logits.pow(2).mean().backward()
    rule = layers[0].down_sampler.phm_rule
    assert rule.grad is not None and rule.grad.abs().sum() > 0
    assert sum(1 for n, _ in model.named_parameters() if n.endswith("phm_rule")) == 1


def test_compacter_learn_phm_false_keeps_rules_fixed():
    model = tm.build("bert", "lm")
    delta = CompacterModel(model, reduction_factor=8, learn_phm=False, factorized_phm_rule=True)
    delta.freeze_module()  # makes every delta parameter require grad ...
    model(**tm.example_inputs("bert")).logits.pow(2).mean().backward()
    rules = [p for n, p in delta.named_parameters() if "phm_rule" in n]
    assert rules and all(p.grad is None for p in rules)  # ... yet no gradient reaches the rules
    assert all(p.grad is not None for n, p in delta.named_parameters() if "phm_rule" not in n)


# --------------------------------------------------------------------------- ParallelAdapter
def test_parallel_adapter_legacy_config_builds_the_same_pairs():
    legacy = {"delta_type": "parallel_adapter", "bottleneck_dim": 24, "non_linearity": "gelu_new",
              "modified_modules": ["attn@", "attn@", "ff@.w1@", "ff@.w2@"], "common_structure": True,
              "exclude_modules": ["lm_head"], "scaled": None, "opendelta_version": "0.3.0"}
    by_config = AutoDeltaModel.from_config(legacy, tm.build("bert", "lm"))
    by_default = ParallelAdapterModel(tm.build("bert", "lm"))
    assert by_config.pairs == by_default.pairs == [
        ("bert.encoder.layer.0.attention", "bert.encoder.layer.0.attention"),
        ("bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense"),
        ("bert.encoder.layer.1.attention", "bert.encoder.layer.1.attention"),
        ("bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.output.dense")]
    assert ({n for n, _ in by_config.named_parameters()} == {n for n, _ in by_default.named_parameters()})
    assert isinstance(AutoDeltaConfig.from_dict({"delta_type": "paralleladapter"}).scaled, float)


def test_parallel_adapter_pair_errors():
    model = tm.build("bert", "lm")
    with pytest.raises(ValueError, match="in pairs"):
        ParallelAdapterModel(model, modified_modules=["attention"])
    with pytest.raises(ValueError, match="matches 2 modules and .dense. 7"):
        ParallelAdapterModel(model, modified_modules=["attention", "dense"])
    with pytest.raises(ValueError, match="comes before input module"):
        ParallelAdapterModel(model, modified_modules=["layer.0.output.dense", "layer.0.intermediate.dense"])
    with pytest.raises(ValueError, match="matches no module"):
        ParallelAdapterModel(model, modified_modules=["attention", "atention"])


def test_copies_and_pickles_keep_working():
    """deepcopy and torch.save of a backbone carrying cross-module deltas."""
    model = tm.build("llama", "lm")
    inputs = tm.example_inputs("llama")
    perturb(ParallelAdapterModel(model), seed=3)
    perturb(SoftPromptModel(model, soft_token_num=PROMPT), seed=4)
    expected = outputs(model, inputs)
    clone = copy.deepcopy(model)
    assert torch.equal(outputs(clone, inputs), expected)
    with torch.no_grad():  # the copy owns its deltas
        next(p for n, p in clone.named_parameters() if "parallel_adapter" in n).add_(1.0)
    assert torch.equal(outputs(model, inputs), expected)
    assert not torch.equal(outputs(clone, inputs), expected)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(outputs(torch.load(buffer, weights_only=False), inputs), expected)


def test_parallel_adapter_under_gradient_checkpointing():
    """The adapter's result crosses modules; recomputation in backward must not mix it up."""
    grads = []
    for checkpointing in (False, True):
        model = tm.build("llama", "lm")
        delta = ParallelAdapterModel(model)
        perturb(delta)
        delta.freeze_module()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(**tm.example_inputs("llama"), use_cache=False).logits.pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in delta.named_parameters()]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("method", ["low_rank_adapter", "compacter", "parallel_adapter", "soft_prompt"])
def test_deltas_are_created_on_meta_device(method):
    cls, kwargs = METHODS[method]
    model = tm.build("gpt2", "lm").to("meta")
    delta = cls(model, **kwargs)
    params = [p for _, p in delta.named_parameters()]
    assert params and all(p.device.type == "meta" for p in params)


def test_registry_spellings():
    for spelling, cls in (("lowrankadapter", LowRankAdapterModel), ("low_rank_adapter", LowRankAdapterModel),
                          ("compacter", CompacterModel), ("paralleladapter", ParallelAdapterModel),
                          ("parallel_adapter", ParallelAdapterModel), ("softprompt", SoftPromptModel),
                          ("soft_prompt", SoftPromptModel)):
        assert type(AutoDeltaConfig.from_dict({"delta_type": spelling})) is cls.config_class
