"""The ``opendelta`` command line: bad arguments, inspect, and a real fine-tune of MiniLM."""
import json
import subprocess
import sys

import pytest

from opendelta.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "opendelta", *args], capture_output=True, text=True,
                          timeout=1200)


@pytest.mark.parametrize("args, message", [
    (["train", "--model", "/nonexistent/model"], "not a model directory"),
    (["train", "--delta", "nosuchdelta"], "unknown delta_type 'nosuchdelta'; known delta types: "),
    (["train", "--epochs", "0"], "--epochs and --batch-size must be >= 1"),
    (["train", "--delta-arg", "lora_r"], "expected NAME=VALUE"),
    (["inspect", "/nonexistent/ckpt"], "not a directory"),
    (["visualize", "/nonexistent/model"], "not a model directory"),
])
def test_bad_arguments_give_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("opendelta: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("content, suffix, message", [
    ('{"text": "a", "label": 1}\n{"text": "b", "label": \n', ".jsonl", "line 2: not valid JSON"),
    ("text,label\nhello,1,extra\n", ".csv", "line 2: more fields than the header has"),
    ("words,label\nhello,1\nbye,0\n", ".csv", "no value in column 'text'"),
    ("text,label\nhello,1\nbye,1\n", ".csv", "fewer than two distinct labels"),
    ("whatever", ".parquet", "unknown format .parquet"),
])
def test_malformed_data_files(tmp_path, capsys, content, suffix, message):
    data = tmp_path / f"data{suffix}"
    data.write_text(content)
    assert main(["train", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_visualize_a_local_model_with_a_delta(tmp_path):
    import tiny_models as tm

    tm.build("bert", "cls").save_pretrained(tmp_path / "model")
    result = run_cli("visualize", str(tmp_path / "model"), "--delta", "lora")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "0-1 (BertLayer)" in result.stdout
    assert "query,value (Linear) weight:[32, 32] bias:[32]" in result.stdout
    assert "lora (LoraLayer) lora_A:[8, 32] lora_B:[32, 8]" in result.stdout
    common = run_cli("visualize", str(tmp_path / "model"), "--common-structure", "--structure-only")
    assert common.returncode == 0 and "attn" in common.stdout and "ff" in common.stdout


@pytest.mark.slow
def test_train_a_local_llama_classifier_on_a_users_jsonl(tmp_path):
    """--model and --data: a local Llama-architecture classifier (head ``score``, found by
    itself) with the bundled MiniLM's tokenizer, on a JSONL file with string labels."""
    import random

    import transformers

    from opendelta.cli.train import default_model_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_path())
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      pad_token_id=tokenizer.pad_token_id, num_labels=2)
    model_dir = tmp_path / "model"
    transformers.LlamaForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    rows = [{"review": f"{rng.choice(['great', 'lovely', 'superb'])} film, {rng.randint(0, 9)} stars",
             "sentiment": "pos"} for _ in range(40)]
    rows += [{"review": f"{rng.choice(['awful', 'dull', 'terrible'])} film, {rng.randint(0, 9)} stars",
              "sentiment": "neg"} for _ in range(40)]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "delta"
    result = run_cli("train", "--model", str(model_dir), "--data", str(data), "--text-column", "review",
                     "--label-column", "sentiment", "--delta", "adapter", "--delta-arg", "bottleneck_dim=8",
                     "--epochs", "2", "--max-length", "16", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["neg", "pos"] and metrics["test_examples"] == 16
    assert metrics["delta_type"] == "adapter" and metrics["delta_config"]["bottleneck_dim"] == 8
    keys = run_cli("inspect", str(out), "--keys").stdout
    assert "score.weight" in keys and "adapter.modulelist.down_proj.weight" in keys


def test_inspect_corrupt_and_missing(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"delta_type": "lora"}')
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no model.safetensors or pytorch_model.bin" in capsys.readouterr().err
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    assert main(["inspect", str(tmp_path)]) == 2
    assert "model.safetensors: cannot be read" in capsys.readouterr().err


@pytest.mark.slow
def test_train_real_minilm_on_bbc_news_and_reload(tmp_path):
    """A small budget of the main job: accuracy well above chance (0.2), and the saved
    checkpoint reproduces the command's predictions on a fresh backbone."""
    out = tmp_path / "delta"
    result = run_cli("train", "--train-size", "240", "--test-size", "100", "--max-length", "64", "--lr", "1e-2",
                     "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accuracy:" in result.stdout and "checkpoint:" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_examples"] == 100 and metrics["train_examples"] == 240
    assert metrics["accuracy_after"] >= 0.6 > 0.2
    assert metrics["checkpoint_bytes"] < 0.02 * metrics["full_model_bytes"]

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from opendelta import AutoDeltaModel
    from opendelta.cli.train import default_model_path, load_bbc_news, predict

    path = default_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    AutoDeltaModel.from_finetuned(str(out), backbone_model=model)
    test = load_bbc_news().test
    predictions = predict(model, AutoTokenizer.from_pretrained(path), test[:100], 16, 64)
    assert predictions == metrics["test_predictions"]

    shown = run_cli("inspect", str(out))
    assert shown.returncode == 0 and "delta type: lora" in shown.stdout
    assert "BertForSequenceClassification" in shown.stdout
