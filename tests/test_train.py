"""Training on the CPU with tiny generated models and the real MiniLM weights (no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers
from conftest import minilm_path, save_model, tiny_llama_config, with_minilm_tokenizer

from lorafast import errors
from lorafast.cli import main
from lorafast.train import train

POS = [
    "I loved this movie",
    "a wonderful, moving film",
    "great acting and a great story",
    "truly delightful",
    "one of the best films this year",
    "brilliant and funny",
    "an excellent, joyful experience",
]
NEG = [
    "I hated this movie",
    "a boring, tedious film",
    "terrible acting and a dull story",
    "truly awful",
    "one of the worst films this year",
    "stupid and unfunny",
    "a dreadful, painful experience",
]


def sentiment(path: Path, n: int, seed: int) -> Path:
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rnd.randint(0, 1)
        text = rnd.choice(POS if label else NEG) + rnd.choice([".", "!", ", really.", " overall."])
        rows.append({"text": text, "label": label})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def minilm_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sent")
    return sentiment(d / "train.jsonl", 160, 0), sentiment(d / "dev.jsonl", 60, 1)


@pytest.mark.slow
def test_minilm_sentiment_reaches_accuracy_and_adapter_reloads(tmp_path, minilm_data):
    train_file, dev_file = minilm_data
    r = train(
        model=str(minilm_path()),
        data=str(train_file),
        eval_data=str(dev_file),
        out=str(tmp_path / "run"),
        task="seq-cls",
        r=8,
        targets="attn",
        epochs=4,
        batch_size=16,
        lr=2e-3,
        max_length=32,
        progress=False,
    )
    s = r.summary
    assert s["eval"]["accuracy"] >= 0.9, s["eval"]
    losses = [
        json.loads(x)["loss"]
        for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in x and "eval" not in x
    ]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, "loss went down"
    for k in ("trainable_parameters", "total_parameters", "adapter_bytes", "train_seconds", "peak_memory_bytes"):
        assert s[k] > 0, k
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["eval"] == s["eval"]
    # The saved adapter loads in PEFT and gives the accuracy measured in training.
    from peft import PeftModel

    base = transformers.AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=2)
    model = PeftModel.from_pretrained(base, str(r.adapter)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(r.adapter))
    rows = [json.loads(x) for x in dev_file.read_text().splitlines()]
    with torch.no_grad():
        enc = tok([x["text"] for x in rows], padding=True, return_tensors="pt", truncation=True, max_length=32)
        logits = model(**enc).logits
    pred = logits.argmax(-1).tolist()
    acc = sum(p == x["label"] for p, x in zip(pred, rows)) / len(rows)
    # Training evaluated in batches of 16, this in one batch: the fp32 logits differ by rounding only, so
    # predictions can differ only where the two logits are that close (never here in practice).
    close = int(((logits[:, 0] - logits[:, 1]).abs() < 1e-3).sum())
    assert abs(acc - s["eval"]["accuracy"]) <= close / len(rows) + 1e-12, (acc, s["eval"], close)


@pytest.mark.slow
def test_gpt2_r8_c_attn_trainable_count_matches_peft(tmp_path):
    """GPT-2 (base size, random weights) with r=8 on c_attn: PEFT counts 294,912 trainable parameters."""
    base = save_model(
        transformers.GPT2LMHeadModel,
        transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=30522),
        tmp_path / "gpt2",
        torch.float32,
    )
    with_minilm_tokenizer(base)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"say {i}", "output": f"{i}"}) for i in range(4)))
    r = train(
        model=str(base),
        data=str(data),
        out=str(tmp_path / "run"),
        task="causal-lm",
        r=8,
        targets="attn",
        epochs=1,
        batch_size=4,
        max_length=128,
        progress=False,
    )
    assert r.summary["trainable_parameters"] == 294_912


@pytest.mark.slow
def test_causal_lm_instruction_tuning_loss_goes_down(tmp_path):
    base = save_model(
        transformers.LlamaForCausalLM, tiny_llama_config(vocab_size=30522), tmp_path / "llama", torch.float32
    )
    with_minilm_tokenizer(base)
    rows = [
        {"instruction": "name a color", "input": "", "output": "blue"},
        {"instruction": "add the numbers", "input": "2 and 3", "output": "five"},
    ] * 8
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in rows))
    r = train(
        model=str(base),
        data=str(data),
        eval_data=str(data),
        out=str(tmp_path / "run"),
        task="causal-lm",
        r=8,
        targets="attn-mlp",
        epochs=6,
        batch_size=4,
        lr=3e-3,
        max_length=128,
        progress=False,
        merge=True,
    )
    evals = [
        json.loads(x)["eval"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"eval"' in x
    ]
    assert evals[-1]["loss"] < evals[0]["loss"] and evals[-1]["perplexity"] > 0
    assert (r.merged / "config.json").exists()


def test_bad_input_fails_before_training(tmp_path, minilm_data, capsys):
    train_file, _ = minilm_data
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    nolabel = tmp_path / "nolabel.jsonl"
    nolabel.write_text(json.dumps({"text": "hi"}))
    badlabel = tmp_path / "badlabel.jsonl"
    badlabel.write_text(json.dumps({"text": "hi", "label": 7}))
    m = str(minilm_path())
    cases = [
        (["--data", str(empty)], "no records"),
        (["--data", str(nolabel)], "no field 'label'"),
        (["--data", str(train_file), "--eval-data", str(badlabel)], "label 7 is not among"),
        (["--data", str(train_file), "--targets", "q_proj"], "unknown target module 'q_proj'"),
        (["--data", str(tmp_path / "missing.jsonl")], "no such file"),
    ]
    for extra, needle in cases:
        assert main(["train", "--model", m, "--out", str(tmp_path / "o"), "-q", *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (extra, err)
    with pytest.raises(errors.InvalidArgumentError, match="query"):
        train(model=m, data=str(train_file), out=str(tmp_path / "o"), targets="nope", progress=False)


@pytest.mark.slow
def test_several_adapters_on_one_base_and_predict(tmp_path, minilm_data, capsys):
    import lorafast

    train_file, dev_file = minilm_data
    flipped = tmp_path / "flipped.jsonl"
    flipped.write_text(
        "\n".join(
            json.dumps({"text": r["text"], "label": 1 - r["label"]})
            for r in map(json.loads, train_file.read_text().splitlines())
        )
    )
    common = dict(model=str(minilm_path()), task="seq-cls", r=4, epochs=1, batch_size=16, max_length=32, progress=False)
    a = train(data=str(train_file), out=str(tmp_path / "a"), seed=1, **common)
    b = train(data=str(flipped), out=str(tmp_path / "b"), seed=2, **common)
    model = lorafast.load(minilm_path(), {"a": a.adapter, "b": b.adapter})
    ids = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))(["a wonderful film"], return_tensors="pt")
    from peft import PeftModel

    def alone(adapter):
        base = transformers.AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=2)
        return PeftModel.from_pretrained(base, str(adapter)).eval()(**ids).logits

    with torch.no_grad():
        model.set_adapter("a")
        la = model(**ids).logits
        model.set_adapter("b")
        lb = model(**ids).logits
        with model.disable_adapter():
            base_logits = model(**ids).logits
        assert torch.allclose(la, alone(a.adapter), atol=1e-5) and torch.allclose(lb, alone(b.adapter), atol=1e-5)
        assert not torch.allclose(la, lb) and not torch.allclose(la, base_logits)
        # unload: the plain model back, every LoRA layer removed
        plain = model.unload()
        assert not any("lora_" in n for n, _ in plain.named_parameters())
    out = tmp_path / "preds.jsonl"
    assert (
        main(
            [
                "predict",
                "--model",
                str(minilm_path()),
                "--adapter",
                f"a={a.adapter}",
                f"b={b.adapter}",
                "--use",
                "b",
                "--data",
                str(dev_file),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    preds = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(preds) == 60 and all(0.5 <= p["probability"] <= 1 for p in preds)


def test_verify_passes_on_a_good_merge_and_fails_on_a_corrupted_one(tmp_path, capsys):
    from conftest import save_adapter
    from safetensors.torch import load_file, save_file

    import lorafast

    base = save_model(transformers.LlamaForCausalLM, tiny_llama_config(), tmp_path / "base", torch.float32)
    ad = save_adapter(
        transformers.AutoModelForCausalLM,
        base,
        tmp_path / "ad",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
    )
    merged = lorafast.merge(base, ad, tmp_path / "merged", progress=False).output
    assert main(["verify", str(base), str(ad), str(merged)]) == 0
    assert "ok: largest logit difference" in capsys.readouterr().out
    st = load_file(str(merged / "model.safetensors"))
    st["model.layers.1.self_attn.q_proj.weight"] += 0.5
    save_file(st, str(merged / "model.safetensors"), metadata={"format": "pt"})
    assert main(["verify", str(base), str(ad), str(merged)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs from base + adapter" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,spec", [("ranks", ["--ranks", "2,8"]), ("modules", ["--module-sets", "query;query,value"])]
)
def test_experiments_write_their_three_files(tmp_path, minilm_data, kind, spec, capsys):
    train_file, dev_file = minilm_data
    out = tmp_path / "exp"
    argv = [
        "experiment",
        kind,
        *spec,
        "--out",
        str(out),
        "--model",
        str(minilm_path()),
        "--data",
        str(train_file),
        "--eval-data",
        str(dev_file),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-length",
        "32",
    ]
    assert main(argv) == 0
    import csv

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["setting"] for r in rows] == (["2", "8"] if kind == "ranks" else ["query", "query,value"])
    assert int(rows[1]["trainable_parameters"]) > int(rows[0]["trainable_parameters"])
    assert all(r["metric"] == "accuracy" and 0 <= float(r["value"]) <= 1 for r in rows)
    assert (out / "results.md").read_text().startswith(f"| {kind[:-1]} | trainable params")
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A bad train option fails before any setting runs (argparse: one line, exit 2).
    with pytest.raises(SystemExit) as e:
        main(["experiment", kind, *spec, "--out", str(tmp_path / "x"), "--model", "m", "--data", "d", "--no-such"])
    assert e.value.code == 2
    assert not (tmp_path / "x").exists()


def test_qlora_on_the_cpu_quantizes_once_and_trains(tmp_path, monkeypatch):
    """--qlora: the base is quantized by lorafast (cached), loaded 4-bit by bitsandbytes, and trained."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("LORAFAST_CACHE", str(tmp_path / "cache"))
    base = save_model(
        transformers.LlamaForCausalLM,
        tiny_llama_config(vocab_size=30522, intermediate_size=192),
        tmp_path / "llama",
        torch.float32,
    )
    with_minilm_tokenizer(base)
    rows = [{"instruction": "name a color", "input": "", "output": "blue"}] * 8
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in rows))
    r = train(
        model=str(base),
        data=str(data),
        out=str(tmp_path / "run"),
        task="causal-lm",
        r=4,
        targets="attn",
        epochs=2,
        batch_size=4,
        max_length=128,
        lr=3e-3,
        qlora=True,
        progress=False,
    )
    cached = list((tmp_path / "cache" / "quantized").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").exists()
    qc = json.loads((cached[0] / "config.json").read_text())["quantization_config"]
    assert qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    assert (r.adapter / "adapter_model.safetensors").exists()
    # Again: the cached 4-bit base is reused, not quantized a second time.
    mtime = (cached[0] / "model.safetensors").stat().st_mtime_ns
    train(
        model=str(base),
        data=str(data),
        out=str(tmp_path / "run2"),
        task="causal-lm",
        r=4,
        targets="attn",
        epochs=1,
        batch_size=4,
        max_length=128,
        qlora=True,
        progress=False,
    )
    assert (cached[0] / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_two_cpu_processes_share_the_data(tmp_path, minilm_data):
    """Distributed data parallel over two CPU processes (torchrun, as `accelerate launch --multi_gpu` uses):
    each process sees half of the batches, the main process evaluates, logs and saves once."""
    import subprocess
    import sys

    train_file, dev_file = minilm_data
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\nfrom lorafast.train import train\n"
        f"train(model={str(minilm_path())!r}, data={str(train_file)!r}, eval_data={str(dev_file)!r}, out=sys.argv[1],"
        " task='seq-cls', r=4, epochs=1, batch_size=16, max_length=32, progress=False)\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free local port for the rendezvous: no clash with other runs on the machine
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path / "ddp"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert s["processes"] == 2
    assert s["steps"] == 5  # 160 records / 16 per batch / 2 processes
    evals = [x for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(evals) == 1 and (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_csv_and_parquet_data_and_lora_options(tmp_path, minilm_data):
    """CSV and parquet data; rsLoRA, a rank pattern and a non-default init reach the saved adapter config."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    train_file, _ = minilm_data
    rows = [json.loads(x) for x in train_file.read_text().splitlines()]
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    r = train(
        model=str(minilm_path()),
        data=str(tmp_path / "d.csv"),
        out=str(tmp_path / "csv"),
        task="seq-cls",
        r=8,
        targets="query,value",
        rslora=True,
        rank_pattern={"value": 4},
        init="gaussian",
        epochs=1,
        batch_size=32,
        max_length=32,
        progress=False,
    )
    cfg = json.loads((r.adapter / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["rank_pattern"] == {"value": 4} and cfg["init_lora_weights"] == "gaussian"
    assert r.summary["steps"] == 5
    # PiSSA changes the base at init: the adapter is saved converted to plain LoRA of rank 2r, which merges into
    # the original base and matches base + adapter.
    import lorafast

    r = train(
        model=str(minilm_path()),
        data=str(tmp_path / "d.parquet"),
        out=str(tmp_path / "pq"),
        task="seq-cls",
        r=8,
        targets="query,value",
        init="pissa",
        epochs=1,
        batch_size=32,
        max_length=32,
        progress=False,
    )
    cfg = json.loads((r.adapter / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 16
    assert not (tmp_path / "pq" / "initial_adapter").exists()
    merged = lorafast.merge(minilm_path(), r.adapter, tmp_path / "pq-merged", progress=False).output
    assert main(["verify", str(minilm_path()), str(r.adapter), str(merged)]) == 0


def test_datasets_folder_and_gradient_accumulation(tmp_path, minilm_data):
    """A `datasets` folder as --data; gradient accumulation makes one optimizer step per two batches."""
    train_file, _ = minilm_data
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text(train_file.read_text())
    r = train(
        model=str(minilm_path()),
        data=str(folder),
        out=str(tmp_path / "run"),
        task="seq-cls",
        r=4,
        epochs=1,
        batch_size=16,
        grad_accum=2,
        max_length=32,
        progress=False,
    )
    assert r.summary["steps"] == 5  # 160 records / 16 per batch / 2 batches per step
    assert (
        main(["train", "--model", str(minilm_path()), "--data", "no-such/dataset", "--out", str(tmp_path / "x"), "-q"])
        == 1
    )


def test_causal_lm_predictions_and_qlora_without_bitsandbytes(tmp_path, monkeypatch):
    from lorafast.train.multi import load, predict

    base = save_model(
        transformers.LlamaForCausalLM, tiny_llama_config(vocab_size=30522), tmp_path / "llama", torch.float32
    )
    with_minilm_tokenizer(base)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "name a color", "output": "blue"}))
    r = train(
        model=str(base),
        data=str(data),
        out=str(tmp_path / "run"),
        task="causal-lm",
        r=4,
        targets="all-linear",
        epochs=1,
        batch_size=1,
        max_length=128,
        progress=False,
    )
    model = load(base, {"colors": r.adapter})
    tok = transformers.AutoTokenizer.from_pretrained(str(r.adapter))
    preds = predict(model, tok, [{"instruction": "name a color"}], task="causal-lm", max_new_tokens=4)
    assert len(preds) == 1 and isinstance(preds[0]["response"], str)
    targeted = set(json.loads((r.adapter / "adapter_config.json").read_text())["target_modules"])
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= targeted  # all-linear
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    with pytest.raises(errors.MissingDependencyError, match="needs bitsandbytes"):
        train(model=str(base), data=str(data), out=str(tmp_path / "q"), task="causal-lm", qlora=True, progress=False)
