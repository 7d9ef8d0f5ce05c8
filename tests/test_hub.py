"""Sharing through the Hugging Face Hub, offline: resolution from a pre-populated hub cache,
and the upload with huggingface_hub's HTTP transport replaced (no network exists here)."""
import base64
import json
import os
import shutil

import pytest
import torch

import tiny_models as tm
from helpers import outputs, perturb
from opendelta import AutoDeltaConfig, AutoDeltaModel, LoraModel
from opendelta.io.files import CheckpointError

huggingface_hub = pytest.importorskip("huggingface_hub")
httpx2 = pytest.importorskip("httpx2")  # huggingface_hub's HTTP client library

REPO = "opendelta-tests/tiny-bert-lora"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def tuned_bert():
    model = tm.build("bert")
    delta = LoraModel(model)
    delta.freeze_module()
    perturb(delta)
    return model, delta


def populate_cache(cache_dir, checkpoint_dir, repo_id=REPO, commit=COMMIT):
    """Lay a checkpoint out as huggingface_hub's cache does: refs/main -> snapshots/<commit>."""
    storage = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(storage, "snapshots", commit)
    os.makedirs(snapshot)
    os.makedirs(os.path.join(storage, "refs"))
    with open(os.path.join(storage, "refs", "main"), "w") as f:
        f.write(commit)
    for name in os.listdir(checkpoint_dir):
        shutil.copy(os.path.join(checkpoint_dir, name), snapshot)
    return snapshot


@pytest.fixture
def no_network(monkeypatch):
    """Every HTTP request huggingface_hub makes fails as if the machine were offline."""
    requests = []

    def refuse(request):
        requests.append(request)
        raise httpx2.ConnectError("no network in tests", request=request)

    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(refuse)))
    yield requests
    huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)


@pytest.mark.parametrize("mode", ["local_files_only", "HF_HUB_OFFLINE"])
def test_from_finetuned_resolves_a_repo_id_from_the_hub_cache(tmp_path, tuned_bert, monkeypatch, no_network, mode):
    model, delta = tuned_bert
    inputs = tm.example_inputs("bert")
    expected = outputs(model, inputs)
    populate_cache(tmp_path / "cache", delta.save_finetuned(tmp_path / "ckpt"))

    kwargs = {"local_files_only": True} if mode == "local_files_only" else {}
    if mode == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fresh = tm.build("bert")
    AutoDeltaModel.from_finetuned(REPO, fresh, cache_dir=tmp_path / "cache", **kwargs)
    assert torch.equal(outputs(fresh, inputs), expected)
    other = tm.build("bert")
    LoraModel.from_finetuned(REPO, other, cache_dir=tmp_path / "cache", **kwargs)
    assert torch.equal(outputs(other, inputs), expected)
    assert AutoDeltaConfig.from_finetuned(REPO, cache_dir=tmp_path / "cache", **kwargs).lora_r == 8
    assert no_network == []  # offline: not a single request was attempted


def test_unreachable_hub_falls_back_to_the_cache(tmp_path, tuned_bert, no_network):
    model, delta = tuned_bert
    inputs = tm.example_inputs("bert")
    populate_cache(tmp_path / "cache", delta.save_finetuned(tmp_path / "ckpt"))
    fresh = tm.build("bert")
    AutoDeltaModel.from_finetuned(REPO, fresh, cache_dir=tmp_path / "cache")
    assert torch.equal(outputs(fresh, inputs), outputs(model, inputs))
    assert len(no_network) >= 1  # it did try the Hub first


def test_repo_missing_from_the_cache_offline(tmp_path, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = tm.build("bert")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    message = r"not a local directory, and the Hub repo 'org/absent' is not in .*offline"
    with pytest.raises(CheckpointError, match=message):
        AutoDeltaModel.from_finetuned("org/absent", backbone, cache_dir=tmp_path / "cache")
    after = backbone.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_force_download_and_revision_reach_snapshot_download(tmp_path, tuned_bert, monkeypatch):
    _, delta = tuned_bert
    snapshot = populate_cache(tmp_path / "cache", delta.save_finetuned(tmp_path / "ckpt"))
    seen = {}

    def fake_snapshot_download(**kwargs):
        seen.update(kwargs)
        return snapshot

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    AutoDeltaModel.from_finetuned(REPO, tm.build("bert"), cache_dir=tmp_path / "cache", force_download=True,
                                  revision="v1", token="hf_x")
    assert seen["repo_id"] == REPO and seen["force_download"] is True and seen["revision"] == "v1"
    assert seen["token"] == "hf_x" and seen["local_files_only"] is False
    assert "model.safetensors" in seen["allow_patterns"] and "config.json" in seen["allow_patterns"]


def test_push_to_hub_uploads_config_and_weights(tmp_path, tuned_bert):
    _, delta = tuned_bert
    requests = []

    def hub(request):
        requests.append(request)
        path = request.url.path
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{REPO}", "name": REPO})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{REPO}/commit/{COMMIT}",
                                              "commitOid": COMMIT})
        return httpx2.Response(404, json={"error": "not part of this test"})

    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    try:
        os.makedirs(tmp_path / "ckpt")
        (tmp_path / "ckpt" / "notes.txt").write_text("private notes, not uploaded")
        path = delta.save_finetuned(tmp_path / "ckpt", push_to_hub=True, repo_id=REPO, private=True,
                                    token="hf_fake_token")
    finally:
        huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)

    create = [r for r in requests if r.url.path == "/api/repos/create"]
    assert len(create) == 1
    body = json.loads(create[0].content)
    assert (body["organization"], body["name"], body["visibility"]) == ("opendelta-tests", "tiny-bert-lora", "private")
    assert create[0].headers["authorization"] == "Bearer hf_fake_token"

    commits = [r for r in requests if f"/api/models/{REPO}/commit/main" in r.url.path]
    assert len(commits) == 1
    lines = [json.loads(line) for line in commits[0].content.decode().splitlines() if line.strip()]
    uploaded = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                for item in lines if item["key"] == "file"}
    assert set(uploaded) == {"config.json", "model.safetensors"}
    for name, content in uploaded.items():
        assert content == open(os.path.join(path, name), "rb").read()


def test_push_to_hub_needs_a_repo_id(tmp_path, tuned_bert):
    _, delta = tuned_bert
    with pytest.raises(ValueError, match="repo_id"):
        delta.save_finetuned(tmp_path / "ckpt", push_to_hub=True)
