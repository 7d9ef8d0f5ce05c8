"""Transactional checkpoint directories (opendelta.io.transaction): fault injection at every
file-system step of a save, recovery of leftovers, the one-format rule, user files.

A *kill* is simulated in a forked child that calls ``os._exit`` at the k-th step (no clean-up
code runs, as with SIGKILL or a power cut); a *failure* raises ``OSError`` at the k-th step
in-process. Three ways to switch are exercised: the atomic exchange, two renames (where the
file system cannot exchange) and in place (a directory that cannot be renamed, e.g. a mount
point). The steps are every ``os.replace``, ``os.fsync`` and ``os.link``, the atomic
exchange, and the weights write (which leaves a half-written file). After each kill or
failure the directory loads either the old checkpoint exactly or the new one exactly;
after a failure that raised, the directory and its parent are unchanged.
"""
import os
import sys
import time

import pytest
import safetensors.torch
import torch

import tiny_models as tm
from helpers import outputs, perturb
from invariants import directory_state
from opendelta import CheckpointError, LoraModel, save_peft_lora
from opendelta.io import transaction
from opendelta.io.transaction import leftovers, recover_directory, write_files_atomically
from opendelta.io.transaction_inplace import inner_leftovers

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux",
                                reason="kills are simulated with fork on Linux")

INPUTS = tm.example_inputs("bert")
README = b"user notes: never lost"


class Injected(OSError):
    pass


class Faults:
    """Counts the file-system steps of a save and acts at step ``at`` (0: never)."""

    def __init__(self, at, kill):
        self.at, self.kill, self.count, self.hit = at, kill, 0, None

    def _act(self, name):
        self.hit = name
        if self.kill:
            os._exit(86)
        raise Injected(5, f"Input/output error injected at {name}")

    def wrap(self, name, real):
        def step(*args, **kwargs):
            self.count += 1
            if self.count != self.at:
                return real(*args, **kwargs)
            if name == "write weights":  # half a file, then the fault
                real(*args, **kwargs)
                target = args[1] if len(args) > 1 else kwargs["filename"]
                with open(target, "r+b") as f:
                    f.truncate(os.path.getsize(target) // 2)
            return self._act(name)
        return step

    def install(self, monkeypatch=None, mode="exchange"):
        """Patch every step; ``mode``: ``"exchange"`` (atomic exchange), ``"renames"`` (no
        exchange: two renames) or ``"in-place"`` (a directory that cannot be renamed)."""
        targets = [(os, "replace", "os.replace"), (os, "fsync", "os.fsync"), (os, "link", "os.link"),
                   (safetensors.torch, "save_file", "write weights")]
        real_exchange = transaction._exchange
        patches = [(obj, attr, self.wrap(name, getattr(obj, attr))) for obj, attr, name in targets]
        patches.append((transaction, "_exchange",
                        self.wrap("exchange", real_exchange if mode == "exchange" else (lambda a, b: False))))
        if mode == "in-place":
            patches.append((transaction, "_needs_in_place", lambda directory: os.path.isdir(directory)))
        for obj, attr, value in patches:
            if monkeypatch is not None:
                monkeypatch.setattr(obj, attr, value)
            else:
                setattr(obj, attr, value)


def _delta(seed):
    model = tm.build("bert", "lm")
    delta = LoraModel(model, modified_modules=["query", "value"])
    perturb(delta, std=0.3, seed=seed)
    return model, delta


@pytest.fixture(scope="module")
def pair():
    """(old model, old delta), (new model, new delta): clearly different outputs."""
    old, new = _delta(1), _delta(2)
    assert not torch.equal(outputs(old[0], INPUTS), outputs(new[0], INPUTS))
    return old, new


def _old_checkpoint(pair, tmp_path):
    (_, old_delta), _ = pair
    path = old_delta.save_finetuned(tmp_path / "ckpt")
    with open(os.path.join(path, "README.md"), "wb") as f:
        f.write(README)
    return path


def _loads_as(path, pair):
    """"old" or "new": which checkpoint ``path`` loads, exactly (outputs and tensors)."""
    fresh = tm.build("bert", "lm")
    loaded = LoraModel.from_finetuned(path, fresh)
    got = outputs(fresh, INPUTS)
    for label, (model, delta) in zip(("old", "new"), pair):
        if torch.equal(got, outputs(model, INPUTS)):
            state = delta.state_dict()
            assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
            return label
    raise AssertionError(f"{path} loads neither the old nor the new checkpoint")


def _count_steps(pair, tmp_path, mode):
    path = _old_checkpoint(pair, tmp_path / "dry")
    faults = Faults(at=0, kill=False)
    mp = pytest.MonkeyPatch()
    try:
        faults.install(mp, mode=mode)
        pair[1][1].save_finetuned(path)
    finally:
        mp.undo()
    return faults.count


def _kill_child_at(step, save, mode):
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no clean-up; exits at the step or after the save
        code = 0
        try:
            torch.set_num_threads(1)
            Faults(at=step, kill=True).install(mode=mode)
            save()
        except BaseException:  # noqa: BLE001 - reported through the exit code
            code = 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError(f"the saving child hung at step {step}")
        time.sleep(0.01)


MODES = ["exchange", "renames", "in-place"]


@pytest.mark.parametrize("mode", MODES)
def test_a_save_killed_at_every_step_leaves_the_old_or_the_new_checkpoint(pair, tmp_path, mode):
    steps = _count_steps(pair, tmp_path, mode)
    assert steps >= 8  # write, fsyncs, commit rename, parent fsync, switch or moves, clean-up
    seen = set()
    for step in range(1, steps + 1):
        path = _old_checkpoint(pair, tmp_path / f"kill{step}")
        code = _kill_child_at(step, lambda path=path: pair[1][1].save_finetuned(path), mode)
        assert code == 86, f"step {step}: the child was not killed (exit code {code})"
        seen.add(_loads_as(path, pair))  # the load recovers the leftovers first
        assert leftovers(path) == [] and inner_leftovers(path) == []
        with open(os.path.join(path, "README.md"), "rb") as f:
            assert f.read() == README
        assert sorted(os.listdir(path)) == ["README.md", "config.json", "model.safetensors"]
    assert seen == {"old", "new"}  # kills before the switch keep the old, after it the new


@pytest.mark.parametrize("mode", MODES)
def test_a_save_failing_at_every_step_changes_nothing_or_completes(pair, tmp_path, monkeypatch, mode):
    steps = _count_steps(pair, tmp_path, mode)
    outcomes = []
    for step in range(1, steps + 1):
        path = _old_checkpoint(pair, tmp_path / f"fail{step}")
        before = directory_state(path)
        faults = Faults(at=step, kill=False)
        with monkeypatch.context() as mp:
            faults.install(mp, mode=mode)
            try:
                pair[1][1].save_finetuned(path)
            except Injected as err:
                outcome = "raised"
                assert "injected" in str(err)
            else:
                outcome = "completed"
        if outcome == "raised":  # nothing changed: files, README, no sibling left behind
            assert directory_state(path) == before, f"step {step} ({faults.hit})"
            assert _loads_as(path, pair) == "old"
        else:  # the fault hit a clean-up step after the switch: logged, recovered later
            assert _loads_as(path, pair) == "new"
            assert leftovers(path) == [] and inner_leftovers(path) == []
        outcomes.append(outcome)
    assert "raised" in outcomes and "completed" in outcomes


def test_a_first_save_killed_at_every_step_leaves_nothing_or_the_checkpoint(pair, tmp_path):
    steps = _count_steps(pair, tmp_path, "exchange")
    for step in range(1, steps + 1):
        path = str(tmp_path / f"first{step}" / "ckpt")
        os.makedirs(os.path.dirname(path))
        _kill_child_at(step, lambda path=path: pair[1][1].save_finetuned(path), "exchange")
        recover_directory(path)
        if os.path.exists(path):
            assert _loads_as(path, pair) == "new"
        assert leftovers(path) == []
        assert os.listdir(os.path.dirname(path)) in ([], ["ckpt"])


def test_recovery_rolls_a_complete_new_checkpoint_forward_when_the_directory_is_missing(pair, tmp_path):
    path = _old_checkpoint(pair, tmp_path)
    parent = os.path.dirname(path)
    # As left by a process that died between the two renames of the fallback switch.
    os.replace(path, os.path.join(parent, ".ckpt.opendelta-old-0000000000000001-1-a"))
    new = pair[1][1].save_finetuned(tmp_path / "elsewhere")
    os.replace(new, os.path.join(parent, ".ckpt.opendelta-new-0000000000000001-1-a"))
    os.mkdir(os.path.join(parent, ".ckpt.opendelta-tmp-0000000000000002-1-b"))  # an incomplete one
    assert _loads_as(path, pair) == "new"
    assert sorted(os.listdir(parent)) == ["ckpt"]


def test_leftovers_of_a_save_in_progress_are_left_alone(pair, tmp_path):
    path = _old_checkpoint(pair, tmp_path)
    busy = os.path.join(os.path.dirname(path), ".ckpt.opendelta-tmp-0000000000000003-1-c")
    os.mkdir(busy)
    holder = transaction._lock(busy)  # as a running save holds it
    try:
        assert _loads_as(path, pair) == "old"
        assert os.path.isdir(busy)
    finally:
        transaction._release(holder)
    recover_directory(path)
    assert not os.path.exists(busy)


def test_only_checkpoint_files_are_replaced(pair, tmp_path):
    path = _old_checkpoint(pair, tmp_path)
    os.makedirs(os.path.join(path, "runs", "1"))
    with open(os.path.join(path, "runs", "1", "log.txt"), "w") as f:
        f.write("epoch 1")
    os.symlink("README.md", os.path.join(path, "LATEST"))
    with open(os.path.join(path, ".config.json.tmp-x1"), "w") as f:  # an earlier per-file save's leftover
        f.write("{")
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:  # a stale checkpoint of another format
        f.write(b"stale")
    pair[1][1].save_finetuned(path)
    assert sorted(os.listdir(path)) == ["LATEST", "README.md", "config.json", "model.safetensors", "runs"]
    assert os.readlink(os.path.join(path, "LATEST")) == "README.md"
    with open(os.path.join(path, "runs", "1", "log.txt")) as f:
        assert f.read() == "epoch 1"
    assert _loads_as(path, pair) == "new"
    save_peft_lora(pair[0][1], path)
    assert sorted(os.listdir(path)) == ["LATEST", "README.md", "adapter_config.json",
                                        "adapter_model.safetensors", "runs"]


def test_a_save_into_a_file_or_an_unwritable_parent_is_refused(pair, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(CheckpointError, match="it is a file; pass a directory"):
        pair[0][1].save_finetuned(target)
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        with pytest.raises(CheckpointError, match="its parent .* is not writable"):
            write_files_atomically(locked / "ckpt", {"config.json": lambda p: open(p, "w").close()})
    finally:
        os.chmod(locked, 0o700)


def test_directories_that_cannot_be_renamed_are_saved_in_place(tmp_path):
    assert transaction._needs_in_place("/")  # a mount point
    assert not transaction._needs_in_place(str(tmp_path))
    assert not transaction._needs_in_place(str(tmp_path / "absent"))
