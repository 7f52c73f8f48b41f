"""The classifiers `lorafast train` produces, as GGUF that llama.cpp runs: the real MiniLM with a
LoRA-trained sentiment head (BertForSequenceClassification: of the model types lorafast writes GGUF for,
the one task architecture both `train` and the vendored converter's registry have:
`test_every_trained_task_the_converter_registers_exports`).

The converter (`conversion/bert.py`) drops `pooler.dense`, but transformers' logits go through it
(BertPooler: dense + tanh on the CLS row), so its file cannot give the model's scores; with the default
two labels it also writes the head as `cls` [2, H], which llama.cpp does not load. lorafast writes the
converter's file with the pooler as `cls` and the head as `cls.output` (llama.cpp's RANK pooling: dense,
tanh, projection): every other key and tensor byte for byte the converter's. With AutoConfig's dummy
labels (LABEL_0, LABEL_1), which the converter leaves out, it writes them, since llama.cpp sizes the head
by the label count."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import minilm_path
from test_gguf import convert
from test_train import sentiment

import lorafast
from lorafast import gguf as lgguf
from lorafast.train import train

pytestmark = pytest.mark.slow

TEXTS = ["a wonderful film, really.", "terrible acting and a dull story!", "the fox", "an utter delight overall."]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """MiniLM with a sentiment head trained by `lorafast train` (LoRA on attention, the head saved)."""
    root = tmp_path_factory.mktemp("cls")
    r = train(
        model=str(minilm_path()),
        data=str(sentiment(root / "train.jsonl", 96, 0)),
        out=str(root / "run"),
        task="seq-cls",
        r=8,
        targets="attn",
        epochs=2,
        batch_size=16,
        lr=2e-3,
        max_length=32,
        progress=False,
    )
    return root, r.adapter


def named_labels_base(folder: Path) -> Path:
    """MiniLM whose config names the two labels (the converter writes them, and renames the head)."""
    shutil.copytree(minilm_path(), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["id2label"], cfg["label2id"] = {"0": "negative", "1": "positive"}, {"negative": 0, "positive": 1}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def rank_scores(llama_cpp, model: Path, texts=TEXTS) -> np.ndarray:
    """llama.cpp's classifier scores (RANK pooling: llama_get_embeddings_seq holds n_cls_out values)."""
    llm = llama_cpp.Llama(
        model_path=str(model),
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_RANK,
        n_ctx=128,
        n_threads=2,
        verbose=False,
    )
    try:
        n = llama_cpp.llama_model_n_cls_out(llm._model.model)
        rows = []
        for text in texts:
            llm._batch.reset()
            llm._batch.add_sequence(llm.tokenize(text.encode(), add_bos=True), 0, False)
            llm._ctx.kv_cache_clear()
            llm._ctx.decode(llm._batch)
            rows.append(llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, 0)[:n])
        return np.asarray(rows, dtype=np.float64)
    finally:
        llm.close()


class GgmlGelu(torch.nn.Module):
    """GELU as llama.cpp's CPU backend computes it for BERT (ggml_vec_gelu_f32 with GGML_GELU_FP16): the
    tanh approximation, looked up in a table by the input rounded to fp16 and stored as fp16; identity at
    and above 10, zero at and below -10. transformers' BERT uses the exact erf form; the two differ by
    up to ~1e-3 of an activation, which no file can change, so the reference computes it llama.cpp's way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x >= 10, x, torch.where(x <= -10, torch.zeros_like(x), table))


def hf_logits(merged: Path, texts=TEXTS) -> np.ndarray:
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(merged)).eval()
    for layer in model.bert.encoder.layer:
        layer.intermediate.intermediate_act_fn = GgmlGelu()
    tok = transformers.AutoTokenizer.from_pretrained(str(merged))
    with torch.no_grad():
        return np.concatenate([model(**tok(t, return_tensors="pt")).logits.double().numpy() for t in TEXTS])


def tensors(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type, list(t.shape), bytes(t.data.tobytes())) for t in reader.tensors}


def fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {k: [bytes(p.tobytes()) for p in f.parts] for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# Scores within the type's precision, relative to the largest score. f32: the two summation orders
# (~1e-6 relative a layer), where an activation whose input lands on the other side of an fp16 rounding
# moves by up to 2^-11 of itself in the GELU table (measured 4e-5). f16 / q8_0: the weights' rounding
# (2^-11, and 1/254 of a 32-block's amax), through 6 layers (measured 3e-4, 9e-3).
BOUNDS = {"f32": 3e-4, "f16": 1e-2, "q8_0": 3e-2}


@pytest.mark.parametrize("file_type", list(BOUNDS))
def test_trained_classifier_gguf_gives_transformers_logits(llama_cpp, trained, file_type):
    root, adapter = trained
    out = root / f"cls-{file_type}.gguf"
    lgguf.to_gguf(minilm_path(), [adapter], out, type=file_type, progress=False)
    merged = root / "merged"
    if not merged.exists():
        lorafast.merge(minilm_path(), [adapter], merged, progress=False)
    ref = hf_logits(merged)
    got = rank_scores(llama_cpp, out)
    assert got.shape == ref.shape == (len(TEXTS), 2)
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert err < BOUNDS[file_type], (file_type, err, got, ref)
    # The predicted label, wherever the reference's margin is beyond the error bound.
    clear = np.abs(ref[:, 0] - ref[:, 1]) > 2 * BOUNDS[file_type] * np.abs(ref).max()
    assert clear.any()
    assert (got.argmax(-1) == ref.argmax(-1))[clear].all()


def test_classifier_gguf_is_the_converters_file_with_the_pooler(llama_cpp, llama_cpp_dir, trained, tmp_path):
    """Named labels: the converter renames the head to cls.output and writes the labels; lorafast's file
    has every key and tensor of it, byte for byte, and the pooler as cls. Without the pooler llama.cpp's
    scores are not the model's: that is the converter's file, run."""
    _, adapter = trained
    base = named_labels_base(tmp_path / "base")
    merged = lorafast.merge(base, [adapter], tmp_path / "merged", progress=False).output
    theirs = convert(llama_cpp_dir, merged, "f32", tmp_path / "theirs.gguf", "tiny")
    ours = tmp_path / "ours.gguf"
    lgguf.to_gguf(base, [adapter], ours, type="f32", name="tiny", progress=False)
    t_ours, t_theirs = tensors(ours), tensors(theirs)
    assert set(t_ours) - set(t_theirs) == {"cls.weight", "cls.bias"}
    assert set(t_theirs) <= set(t_ours)
    for name, t in t_theirs.items():
        assert t_ours[name] == t, name
    f_ours, f_theirs = fields(ours), fields(theirs)
    # (the parameter count, and with it the size label, includes the pooler)
    differ = {k for k in set(f_ours) | set(f_theirs) if f_ours.get(k) != f_theirs.get(k)}
    assert differ <= {"general.size_label"}, differ
    labels = f_ours["bert.classifier.output_labels"]
    assert b"negative" in labels and b"positive" in labels
    ref = hf_logits(merged)
    assert float(np.abs(rank_scores(llama_cpp, ours) - ref).max() / np.abs(ref).max()) < BOUNDS["f32"]
    assert float(np.abs(rank_scores(llama_cpp, theirs) - ref).max() / np.abs(ref).max()) > 1e-2


def test_default_labels_head_the_converter_writes_does_not_load(llama_cpp, llama_cpp_dir, trained, tmp_path):
    """What `train` saves (two labels, LABEL_0/LABEL_1): the converter writes the head as `cls` [2, H],
    where llama.cpp's BERT expects the pooler's [H, H], so its file does not load; lorafast's does."""
    root, adapter = trained
    merged = root / "merged"
    if not merged.exists():
        lorafast.merge(minilm_path(), [adapter], merged, progress=False)
    theirs = convert(llama_cpp_dir, merged, "f32", tmp_path / "theirs.gguf", "tiny")
    assert tensors(theirs)["cls.weight"][1] == [384, 2]
    with pytest.raises(ValueError):
        rank_scores(llama_cpp, theirs)


def test_every_trained_task_the_converter_registers_exports(llama_cpp_dir):
    """What `lorafast train` builds - transformers' auto mapping for the task, any model type it has -
    against the converter's registry: every sequence classifier the converter registers is one lorafast
    gguf writes, or refuses naming why llama.cpp cannot run it; so is every causal LM of the model types
    lorafast writes GGUF for."""
    import re

    from transformers.models.auto import modeling_auto

    from lorafast import _core

    registry = set()
    for f in (llama_cpp_dir / "vendor" / "llama.cpp" / "conversion").glob("*.py"):
        for args in re.findall(r"ModelBase\.register\(([^)]*)\)", f.read_text()):
            registry |= set(re.findall(r'"([A-Za-z0-9_]+)"', args))
    classifiers = set(modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()) & registry
    assert {"BertForSequenceClassification", "RobertaForSequenceClassification"} <= classifiers
    gguf_types = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3_moe", "gpt_oss"}
    causal = {modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[t] for t in gguf_types} & registry
    refused = dict(_core.gguf_not_runnable())
    assert all("llama.cpp" in why for why in refused.values())
    missing = (classifiers | causal) - set(_core.gguf_architectures()) - set(refused)
    assert not missing, missing


def roberta_base(folder: Path, gpt2: Path) -> Path:
    """A small random RobertaModel (the encoder a seq-cls run starts from) with GPT-2's real byte-level BPE
    tokenizer.json (Roberta's is GPT-2's BPE; a tokenizer whose pre-tokenizer hash llama.cpp does not know
    is refused by the converter and by lorafast alike), its end-of-text token the pad, as `train` sets it.
    Roberta's positions start after the pad id: the pad + 1 rows before are what the converter drops."""
    folder.mkdir(parents=True)
    for f in gpt2.iterdir():
        shutil.copy(f, folder / f.name)
    vocab, pad = 50257, 50256
    cfg = transformers.RobertaConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=pad + 1 + 64, pad_token_id=pad, type_vocab_size=1,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.RobertaModel(cfg).save_pretrained(str(folder))
    return folder


def xlm_roberta_base(folder: Path) -> Path:
    """A small random XLMRobertaModel with a sentencepiece unigram model trained here the way XLM-R's is laid
    out (<unk> 0, <s> 1, </s> 2, no pad: transformers shifts every piece one on, fairseq's way)."""
    import random

    import sentencepiece as spm
    from test_train import NEG, POS

    folder.mkdir(parents=True)
    rnd = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "fi", "ja", "wo", "bu"]
    words = " ".join(POS + NEG + TEXTS).replace(",", " ").replace(".", " ").split()
    words += ["".join(rnd.choice(syllables) for _ in range(rnd.randint(1, 4))) for _ in range(300)]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rnd.choice(words) for _ in range(10)) for _ in range(2000)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "sentencepiece.bpe"), vocab_size=300, model_type="unigram",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    corpus.unlink()
    (folder / "sentencepiece.bpe.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "XLMRobertaTokenizer"}))
    cfg = transformers.XLMRobertaConfig(
        vocab_size=302, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=2 + 64, pad_token_id=1, type_vocab_size=1,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.XLMRobertaModel(cfg).save_pretrained(str(folder))
    assert len(transformers.AutoTokenizer.from_pretrained(str(folder))) == cfg.vocab_size
    return folder


def train_head(root: Path, base: Path, targets: str) -> tuple[Path, Path, Path, Path]:
    """`lorafast train --task seq-cls` on BASE (LoRA on `targets`, the new head saved), then merged:
    (root, base, adapter, merged)."""
    r = train(
        model=str(base),
        data=str(sentiment(root / "train.jsonl", 64, 0)),
        out=str(root / "run"),
        task="seq-cls",
        r=8,
        targets=targets,
        epochs=1,
        batch_size=16,
        lr=2e-3,
        max_length=32,
        progress=False,
    )
    # The tokenizer saved as the base's, without the truncation training encoded with.
    assert json.loads((r.adapter / "tokenizer.json").read_text())["truncation"] is None
    merged = lorafast.merge(base, [r.adapter], root / "merged", progress=False).output
    return root, base, r.adapter, merged


@pytest.fixture(scope="module", params=["roberta", "xlm-roberta"])
def roberta_trained(request, tmp_path_factory, gpt2_tokenizer_dir):
    """A Roberta / XLM-RoBERTa sentiment classifier trained by `lorafast train` (LoRA on attention, the head
    saved)."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "roberta":
        base = roberta_base(root / "base", gpt2_tokenizer_dir)
    else:
        base = xlm_roberta_base(root / "base")
    return train_head(root, base, "query,key,value")


def logits_for(merged: Path, ids: list[list[int]]) -> np.ndarray:
    """transformers' logits for these token ids, with llama.cpp's GELU wherever the encoder has one (BERT-style
    intermediate layers, ModernBERT's GLU and head)."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(merged)).eval()
    for module in list(model.modules()):
        for attr in ("intermediate_act_fn", "act"):
            if isinstance(getattr(module, attr, None), torch.nn.Module):
                setattr(module, attr, GgmlGelu())
    with torch.no_grad():
        return np.concatenate([model(input_ids=torch.tensor([i])).logits.double().numpy() for i in ids])


def llama_ids(llama_cpp, model: Path) -> list[list[int]]:
    llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(t.encode(), add_bos=True) for t in TEXTS]
    finally:
        llm.close()


def gguf_score_error(llama_cpp, trained, file_type: str) -> tuple[list[list[int]], float]:
    """The trained classifier written as GGUF of `file_type` and run in llama.cpp: its token ids, and its
    scores' largest error against transformers' logits for those ids, relative to the largest logit."""
    root, base, adapter, merged = trained
    out = root / f"cls-{file_type}.gguf"
    lgguf.to_gguf(base, [adapter], out, type=file_type, progress=False)
    ids = llama_ids(llama_cpp, out)
    ref = logits_for(merged, ids)
    got = rank_scores(llama_cpp, out)
    assert got.shape == ref.shape == (len(TEXTS), 2)
    return ids, float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("file_type", list(BOUNDS))
def test_trained_roberta_classifier_gguf_gives_transformers_logits(llama_cpp, roberta_trained, file_type):
    ids, err = gguf_score_error(llama_cpp, roberta_trained, file_type)
    tok = transformers.AutoTokenizer.from_pretrained(str(roberta_trained[3]))
    assert ids == [tok(t)["input_ids"] for t in TEXTS]  # llama.cpp tokenizes as transformers does
    assert err < BOUNDS[file_type], (file_type, err)


def test_roberta_classifier_gguf_is_the_converters_file(llama_cpp, llama_cpp_dir, roberta_trained, tmp_path):
    """The converter maps Roberta's (and XLM-RoBERTa's) head itself (classifier.dense -> cls, out_proj ->
    cls.output) and drops the position rows before the pad id; lorafast's file is its file, byte for byte,
    but for the default labels it leaves out (without them llama.cpp sizes the head at one score and
    refuses the file)."""
    root, base, adapter, merged = roberta_trained
    theirs = convert(llama_cpp_dir, merged, "f32", tmp_path / "theirs.gguf", "tiny")
    ours = tmp_path / "ours.gguf"
    lgguf.to_gguf(base, [adapter], ours, type="f32", name="tiny", progress=False)
    t_ours, t_theirs = tensors(ours), tensors(theirs)
    assert set(t_ours) == set(t_theirs) and {"cls.weight", "cls.output.weight"} <= set(t_ours)
    for name, t in t_theirs.items():
        assert t_ours[name] == t, name
    assert t_ours["position_embd.weight"][1] == [64, 64]  # the pad + 1 rows dropped
    f_ours, f_theirs = fields(ours), fields(theirs)
    differ = {k for k in set(f_ours) | set(f_theirs) if f_ours.get(k) != f_theirs.get(k)}
    assert differ == {"bert.classifier.output_labels"}, differ
    assert b"LABEL_1" in f_ours["bert.classifier.output_labels"][-1]
    with pytest.raises(ValueError):
        rank_scores(llama_cpp, theirs)


def test_a_classifier_llama_cpp_cannot_run_is_refused_naming_why(tmp_path, capsys):
    """DistilBERT's head is pre_classifier, ReLU, classifier; llama.cpp runs tanh there: the converter's
    file loads and gives other scores, so lorafast refuses it, in one line."""
    from helpers import cli_error, no_leftovers

    cfg = transformers.DistilBertConfig(vocab_size=128, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    transformers.DistilBertForSequenceClassification(cfg).save_pretrained(str(tmp_path / "distil"))
    line = cli_error(capsys, "gguf", str(tmp_path / "distil"), "-o", str(tmp_path / "out"))
    assert "DistilBertForSequenceClassification" in line and "ReLU" in line and "tanh" in line, line
    no_leftovers(tmp_path)


@pytest.fixture(scope="module")
def modern_bert_trained(tmp_path_factory, gpt2_tokenizer_dir):
    """A small random ModernBERT (GPT-2's real BPE tokenizer, its end-of-text token every special, as the
    converter reads ModernBERT's BPE) with a sentiment head trained by `lorafast train`."""
    root = tmp_path_factory.mktemp("modernbert")
    base = root / "base"
    base.mkdir()
    for f in gpt2_tokenizer_dir.iterdir():
        shutil.copy(f, base / f.name)
    end = 50256
    cfg = transformers.ModernBertConfig(
        vocab_size=50257, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        global_attn_every_n_layers=3, local_attention=16, max_position_embeddings=128,
        pad_token_id=end, bos_token_id=end, eos_token_id=end, cls_token_id=end, sep_token_id=end,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.ModernBertModel(cfg).save_pretrained(str(base))
    return train_head(root, base, "Wqkv,Wo")


@pytest.mark.parametrize("file_type", list(BOUNDS))
def test_trained_modern_bert_classifier_gguf_gives_transformers_logits(llama_cpp, modern_bert_trained, file_type):
    _, err = gguf_score_error(llama_cpp, modern_bert_trained, file_type)
    assert err < BOUNDS[file_type], (file_type, err)


def test_modern_bert_classifier_gguf_is_the_converters_file(llama_cpp, llama_cpp_dir, modern_bert_trained, tmp_path):
    """With named labels the converter writes ModernBERT's head as cls (head.dense), cls.norm, cls.output
    (classifier): lorafast's file is its file, byte for byte. (With the default two labels it maps classifier
    to cls as well, beside head.dense, and fails.)"""
    root, base, adapter, merged = modern_bert_trained
    named = tmp_path / "merged"
    shutil.copytree(merged, named)
    cfg = json.loads((named / "config.json").read_text())
    cfg["id2label"], cfg["label2id"] = {"0": "negative", "1": "positive"}, {"negative": 0, "positive": 1}
    (named / "config.json").write_text(json.dumps(cfg, indent=2))
    theirs = convert(llama_cpp_dir, named, "f32", tmp_path / "theirs.gguf", "tiny")
    ours = tmp_path / "ours.gguf"
    lgguf.to_gguf(named, [], ours, type="f32", name="tiny", progress=False)
    t_ours, t_theirs = tensors(ours), tensors(theirs)
    assert set(t_ours) == set(t_theirs) and {"cls.weight", "cls.norm.weight", "cls.output.weight"} <= set(t_ours)
    for name, t in t_theirs.items():
        assert t_ours[name] == t, name
    f_ours, f_theirs = fields(ours), fields(theirs)
    differ = {k for k in set(f_ours) | set(f_theirs) if f_ours.get(k) != f_theirs.get(k)}
    # The converter writes norm_eps as an RMS epsilon only; llama.cpp's modern-bert needs the LayerNorm one
    # and refuses the converter's file without it.
    assert differ == {"modern-bert.attention.layer_norm_epsilon"}, differ
    with pytest.raises(ValueError):
        rank_scores(llama_cpp, theirs)
