"""Delta models under torch.distributed on CPU (gloo, 2 processes): DDP and FSDP2.

Each multi-process test spawns two workers that train on their half of a global batch
and send their results to this process, which trains the same model on the whole batch
in one process and compares. Losses are means over equally sized halves, so averaged
gradients equal single-process ones up to float32 summation order: compared with
``atol=1e-6, rtol=1e-5``.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tiny_models
from helpers import perturb
from matrix_cases import TABLE, build
from opendelta import AdapterModel, LoraModel
from opendelta.integrations.distributed import (gather_delta_state_dict, has_sharded_parameters,
                                         is_main_process, save_finetuned_distributed,
                                         unwrap_model)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
STEPS = 3
LR = 0.5
ATOL, RTOL = 1e-6, 1e-5


# --------------------------------------------------------------------------- shared set-up
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args, timeout: float = 240.0) -> None:
    """Run ``fn(rank, *args)`` in WORLD processes; fail (not hang) after ``timeout``."""
    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {timeout}s")


def _init(rank: int, store: str) -> None:
    """Join the gloo group through a file store (no TCP port that another job could take)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)


#: every row of the case table trains under DDP
DDP_METHODS = list(TABLE)


def _ddp_model(method: str):
    model = tiny_models.build("bert", "cls")  # eval: no dropout, so runs are comparable
    delta = build(method, model)
    perturb(delta, std=0.05)  # non-zero LoRA B: every delta tensor gets a gradient
    delta.freeze_module(exclude=["deltas", "classifier"])
    return model, delta


def _cls_batch():
    inputs = tiny_models.example_inputs("bert", "cls", batch=2 * WORLD, length=6, seed=3)
    inputs["labels"] = torch.tensor([0, 1, 2, 1])
    return inputs


def _shard(inputs, rank):
    n = next(iter(inputs.values())).shape[0] // WORLD
    return {k: v[rank * n:(rank + 1) * n] for k, v in inputs.items()}


def _train(model, inputs, steps=STEPS):
    """``steps`` SGD steps; returns the trainable gradients of the first step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    first = None
    for _ in range(steps):
        opt.zero_grad()
        model(**inputs).loss.backward()
        if first is None:
            first = {n: full(p.grad).clone() for n, p in unwrap_model(model).named_parameters()
                     if p.requires_grad}
        opt.step()
    return first


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _assert_close(actual, expected, what):
    assert actual.keys() == expected.keys(), what
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=ATOL, rtol=RTOL,
                                   msg=lambda m, name=name: f"{what} {name}: {m}")


# --------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, store: str, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, store)
    results = {}
    for method in DDP_METHODS:
        model, _ = _ddp_model(method)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        ddp = DDP(model)  # find_unused_parameters=False: the default
        info = ddp._get_ddp_logging_data()
        grads = _train(ddp, _shard(_cls_batch(), rank))
        params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results[method] = dict(grads=grads, params=params, trainable=trainable,
                               reducer_tensors=info.get("num_parameter_tensors"),
                               find_unused=info.get("find_unused_parameters"))
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_gradients_and_training_equal_single_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    _spawn(_ddp_worker, str(tmp_path / "store"), out)
    results = torch.load(out, weights_only=False)
    for method in DDP_METHODS:
        got = results[method]
        model, delta = _ddp_model(method)
        grads = _train(model, _cls_batch())
        expected = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        # Only delta tensors and the unfrozen head are in the reducer.
        delta_names = {n for n, _ in delta.named_parameters()}
        assert set(got["trainable"]) == delta_names | {"classifier.weight", "classifier.bias"}
        assert got["reducer_tensors"] == len(got["trainable"])
        assert not got["find_unused"]
        _assert_close(got["grads"], grads, f"{method} DDP gradient")
        _assert_close(got["params"], expected, f"{method} DDP parameters after {STEPS} steps")


# --------------------------------------------------------------------------- FSDP2
def _fsdp_model():
    """Tiny Llama with LoRA on q/v (pre-existing Linear, parallel branch) and adapters
    after o_proj / down_proj (post hooks), both inside the blocks that get sharded."""
    model = tiny_models.build("llama", "lm")
    lora = LoraModel(model, modified_modules=["q_proj", "v_proj"], lora_r=4)
    adapter = AdapterModel(model, modified_modules=["o_proj", "down_proj"], bottleneck_dim=8)
    perturb(lora, std=0.05)
    perturb(adapter, std=0.05, seed=1)
    lora.freeze_module(exclude=["deltas"])
    return model, lora, adapter


def _lm_batch():
    inputs = tiny_models.example_inputs("llama", "lm", batch=2 * WORLD, length=6, seed=4)
    inputs["labels"] = inputs["input_ids"]
    return inputs


def _probe_inputs():
    return tiny_models.example_inputs("llama", "lm", batch=2, length=5, seed=9)


def _fsdp_worker(rank: int, store: str, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    _init(rank, store)
    model, lora, adapter = _fsdp_model()
    for block in model.model.layers:  # per-block sharding, then the root
        fully_shard(block)
    fully_shard(model)
    sharded = has_sharded_parameters(model)
    grads = _train(model, _shard(_lm_batch(), rank))
    model.eval()
    with torch.no_grad():
        logits = model(**_probe_inputs()).logits
    gathered = gather_delta_state_dict(lora)
    lora_dir = save_finetuned_distributed(lora, os.path.join(out_dir, "lora"))
    adapter_dir = adapter.save_finetuned(os.path.join(out_dir, "adapter"))  # delegates: sharded
    if rank == 0:
        torch.save(dict(grads=grads, logits=logits, sharded=sharded, gathered=gathered,
                        dirs=(lora_dir, adapter_dir), main=is_main_process()),
                   os.path.join(out_dir, "result.pt"))
    else:
        assert lora_dir is None and adapter_dir is None
    dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp2_gradients_and_checkpoint_round_trip(tmp_path):
    _spawn(_fsdp_worker, str(tmp_path / "store"), str(tmp_path))
    got = torch.load(tmp_path / "result.pt", weights_only=False)
    assert got["sharded"] and got["main"]
    model, lora, adapter = _fsdp_model()
    grads = _train(model, _lm_batch())
    _assert_close(got["grads"], grads, "FSDP2 gradient")
    assert set(grads) == {n for n, _ in lora.named_parameters()} | {n for n, _ in adapter.named_parameters()}

    # Only delta tensors were gathered and written, full-sized.
    ckpt = got["gathered"]
    assert set(ckpt) == {n for n, _ in lora.named_parameters()}
    assert all(ckpt[n].shape == p.shape for n, p in lora.named_parameters())
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "lora" / "model.safetensors"))
    assert len(saved) == len(ckpt) and all(k.endswith(("lora_A", "lora_B")) for k in saved)

    # The checkpoint loads onto a plain, unsharded backbone and reproduces the sharded model.
    fresh = tiny_models.build("llama", "lm")
    LoraModel.from_finetuned(str(tmp_path / "lora"), fresh)
    AdapterModel.from_finetuned(str(tmp_path / "adapter"), fresh)
    with torch.no_grad():
        logits = fresh(**_probe_inputs()).logits
    torch.testing.assert_close(logits, got["logits"], atol=1e-6, rtol=1e-6)
    # ... and the single-process model trained on the whole batch.
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**_probe_inputs()).logits, logits, atol=1e-5, rtol=1e-5)


def test_gather_and_save_in_one_process(tmp_path):
    """Without torch.distributed the helpers are the plain single-process operations."""
    model, lora, adapter = _fsdp_model()
    assert not has_sharded_parameters(model) and is_main_process()
    state = gather_delta_state_dict(lora)
    assert set(state) == {n for n, _ in lora.named_parameters()}
    path = save_finetuned_distributed(lora, tmp_path / "lora")
    fresh = tiny_models.build("llama", "lm")
    LoraModel.from_finetuned(path, fresh)
    adapter.detach()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**_probe_inputs()).logits, model(**_probe_inputs()).logits,
                                   atol=0, rtol=0)
    with pytest.raises(TypeError, match="gathers the state dict itself"):
        save_finetuned_distributed(lora, tmp_path / "x", state_dict=state)


def test_unwrap_model():
    model = tiny_models.build("bert", "cls")
    assert unwrap_model(torch.nn.DataParallel(model)) is model
    assert unwrap_model(model) is model


# --------------------------------------------------------------------------- examples
def _run_example(command, tmp_path, timeout=240):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "delta"
    proc = subprocess.run([*command, "--steps", "4", "--output-dir", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"delta saved to {out}" in proc.stdout
    return out


def _torchrun(script):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
            "--master_port", str(_free_port()), script]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("script,arch,head", [
    ("examples/ddp_lora.py", "bert", {"classifier.weight", "classifier.bias"}),
    ("examples/fsdp2_lora.py", "llama", {"score.weight"})])
def test_torchrun_examples(tmp_path, script, arch, head):
    out = _run_example(_torchrun(script), tmp_path)
    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        import _tiny
    finally:
        sys.path.pop(0)
    fresh = _tiny.build_classifier(arch=arch)
    delta = LoraModel.from_finetuned(str(out), fresh)
    assert delta.num_delta_parameters() > 0
    from safetensors.torch import load_file
    keys = set(load_file(str(out / "model.safetensors")))
    assert keys == {n for n, _ in delta.named_parameters()} | head  # delta + unfrozen head only


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_launch_example(tmp_path):
    pytest.importorskip("accelerate")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
              str(WORLD), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "examples/accelerate_lora.py"]
    out = _run_example(launch, tmp_path)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_deepspeed_zero2_example(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed here")
    if not torch.cuda.is_available():
        pytest.skip("DeepSpeed ZeRO needs CUDA GPUs")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "2",
              "--num_processes", str(WORLD), "--main_process_port", str(_free_port()),
              "examples/accelerate_lora.py"]
    out = _run_example(launch, tmp_path)
    assert (out / "model.safetensors").is_file()
