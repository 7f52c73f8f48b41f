"""GGUF output that llama.cpp runs: a base model with adapters merged on the fly (exact, as
``lorafast.merge``), written as ``convert_hf_to_gguf.py`` (f32 / f16 / bf16 / q8_0) and then
``llama-quantize`` (q4_0 / q4_k_m / q5_k_m / q6_k) would write the merged model, in one streaming pass.

>>> import lorafast
>>> lorafast.to_gguf("base_model", ["adapter"], "model.gguf", type="q4_k_m")  # doctest: +SKIP

The Rust core streams the tensors (names, transforms, dtype conversion, block quantizers); this module
builds the key-value metadata the converter writes (hyperparameters, tokenizer, general.*) with the
``gguf`` package, following the converter's classes for each architecture.
"""

from __future__ import annotations

import json
import math
import tempfile
from contextlib import contextmanager
from hashlib import sha256
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from lorafast import _core
from lorafast._core import GgufReport
from lorafast._deps import require
from lorafast.hub import PathLike, resolve_model_path
from lorafast.progress import run_with_bar

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
# llama_ftype of each --type (general.file_type), and of the converter's outtypes.
FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
QUANT_VERSION = 2  # GGML_QUANT_VERSION


# transformers' class defaults (its 5.x config dataclasses) for the keys the metadata reads, per
# model_type: enough to rebuild `AutoConfig.to_dict()` for these keys without importing transformers,
# which brings torch (seconds and hundreds of MB). tests/test_gguf.py checks them against AutoConfig.
_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": None,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "head_dim": None,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "head_dim": None,
    },
    "qwen2": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
    },
    "qwen2_moe": {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_experts_per_tok": 4,
        "num_experts": 60,
    },
    "qwen3_moe": {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "moe_intermediate_size": 768,
        "num_experts_per_tok": 8,
        "num_local_experts": 128,
    },
    "mixtral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": None,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "num_experts_per_tok": 2,
        "num_local_experts": 8,
    },
    "gpt_oss": {
        "vocab_size": 201088,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": 36,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "sliding_window": 128,
        "num_experts_per_tok": 4,
        "num_local_experts": 128,
    },
    "bert": {
        "vocab_size": 30522,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
    },
}
# The architectures the converter's RobertaModel class converts that lorafast writes.
_ROBERTA_ARCHITECTURES = ("RobertaForSequenceClassification", "XLMRobertaForSequenceClassification")
_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# Where a config class differs from the rest: its `attribute_map` (config.json's name -> the attribute
# to_dict() writes), a `default_theta` other than 10000, and the `None`s its __post_init__ leaves as they are.
_ATTRIBUTE_MAPS = {
    "qwen3_moe": {"num_experts": "num_local_experts"},
    "mixtral": {"num_experts": "num_local_experts"},
    "gpt_oss": {"num_experts": "num_local_experts"},
}
_DEFAULT_THETA = {"mixtral": 1000000.0, "gpt_oss": 150000.0}
# A rope a class's __post_init__ sets when config.json has none (GptOssConfig's yarn).
_DEFAULT_ROPE = {
    "gpt_oss": {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
    }
}
_KEEPS_NONE = {"mixtral": ("head_dim",), "qwen2_moe": ("num_key_value_heads",)}
# Fields typed `int` (not `int | None`) beyond the four every class checks: transformers' strict dataclass
# validation refuses anything else, and the converter then reads config.json as it is.
_EXPERT_INTS = ("num_experts_per_tok", "moe_intermediate_size")
_INT_FIELDS = {
    "mistral": ("num_key_value_heads",),
    "qwen2_moe": ("num_experts", "shared_expert_intermediate_size", *_EXPERT_INTS),
    "qwen3_moe": ("num_key_value_heads", "num_local_experts", *_EXPERT_INTS),
    "mixtral": ("num_key_value_heads", "num_local_experts", "num_experts_per_tok"),
    "gpt_oss": ("num_key_value_heads", "head_dim", "intermediate_size", "num_local_experts", "num_experts_per_tok"),
}


def _config_dict_light(config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """`AutoConfig.from_pretrained(...).to_dict()` for the keys the metadata reads, rebuilt from
    config.json as transformers' config classes fill it in (defaults, head_dim and kv heads derived,
    rope keys gathered into `rope_parameters`); None for anything else, which goes to transformers."""
    model_type = config.get("model_type", "")
    defaults = _CONFIG_DEFAULTS.get(model_type)
    if defaults is None or "text_config" in config:
        return None
    config = dict(config)
    for name, attribute in _ATTRIBUTE_MAPS.get(model_type, {}).items():
        if name in config:
            config[attribute] = config.pop(name)
    hp = {**config, **{k: v for k, v in defaults.items() if k not in config}}
    int_fields = ("hidden_size", "num_attention_heads", "num_hidden_layers", "max_position_embeddings")
    for key in int_fields + _INT_FIELDS.get(model_type, ()):
        if not isinstance(hp[key], int) or isinstance(hp[key], bool) or hp[key] <= 0:
            return None  # transformers' validation decides
    if hp["hidden_size"] % hp["num_attention_heads"] != 0:
        return None
    if "id2label" in config:
        hp["id2label"] = {int(k): v for k, v in config["id2label"].items()}
    else:
        hp["id2label"] = {i: f"LABEL_{i}" for i in range(config.get("num_labels", 2))}
    if config["model_type"] == "bert":
        return hp
    keeps_none = _KEEPS_NONE.get(model_type, ())
    if "head_dim" in defaults and hp["head_dim"] is None and "head_dim" not in keeps_none:
        hp["head_dim"] = hp["hidden_size"] // hp["num_attention_heads"]
    if hp["num_key_value_heads"] is None and "num_key_value_heads" not in keeps_none:
        hp["num_key_value_heads"] = hp["num_attention_heads"]
    # RotaryEmbeddingConfigMixin.convert_rope_params_to_dict + standardize_rope_params (flat case).
    rope = hp.pop("rope_scaling", None) or hp.get("rope_parameters") or _DEFAULT_ROPE.get(model_type) or {}
    if not isinstance(rope, dict):
        return None
    rope = dict(rope)
    rope.setdefault("rope_theta", hp.pop("rope_theta", _DEFAULT_THETA.get(model_type, 10000.0)))
    if "partial_rotary_factor" in hp:
        rope.setdefault("partial_rotary_factor", hp.pop("partial_rotary_factor"))
    rope.setdefault("rope_type", rope.get("type", "default"))
    if rope["rope_type"] not in _ROPE_TYPES or any(isinstance(v, dict) for v in rope.values()):
        return None
    if rope["rope_type"] in ("llama3", "yarn"):
        # (a top-level original_max_position_embeddings is not yet an attribute when this runs)
        rope.setdefault("original_max_position_embeddings", hp["max_position_embeddings"])
    hp["rope_parameters"] = rope
    return hp


def _config_dict_transformers(model_dir: Path) -> dict[str, Any]:
    """What the converter reads (`ModelBase.load_hparams`): transformers' config with its class defaults,
    or config.json as it is when transformers cannot load it."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False).to_dict()
    except Exception:
        return json.loads((model_dir / "config.json").read_text(encoding="utf-8"))


def _hparams(model_dir: Path) -> dict[str, Any]:
    """The converter's hyperparameters: the config dict (`ModelBase.load_hparams`), text_config merged in,
    rope parameters normalized (`TextModel.__init__`)."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        config = None
    hparams = _config_dict_light(config) if isinstance(config, dict) else None
    if hparams is None:
        hparams = _config_dict_transformers(model_dir)
    return _normalized(hparams)


def _normalized(hparams: dict[str, Any]) -> dict[str, Any]:
    if "text_config" in hparams:
        hparams = {**hparams, **hparams["text_config"]}
    rope = hparams.get("rope_parameters", hparams.get("rope_scaling")) or {}
    if "full_attention" not in rope and "sliding_attention" not in rope:
        for key in ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"):
            if key in hparams and "rope_theta" not in rope:
                rope["rope_theta"] = hparams[key]
        if "rope_type" not in rope and (t := rope.get("type")) is not None:
            rope["rope_type"] = t
        for key in ("partial_rotary_factor", "original_max_position_embeddings"):
            if key in hparams and key not in rope:
                rope[key] = hparams[key]
    hparams["_rope"] = rope
    return hparams


def _find(hparams: dict[str, Any], keys: Sequence[str]) -> Any:
    return next((hparams[k] for k in keys if k in hparams), None)


def _general(w: Any, model_dir: Path, name: Optional[str], counts: tuple[int, int, int, int]) -> None:
    """general.* as the converter derives it (`ModelBase.prepare_metadata`): model card, config, folder."""
    import gguf

    total_params = counts[0]
    metadata = gguf.Metadata.load(None, model_dir, name, total_params)
    gen = model_dir / "generation_config.json"
    if metadata.sampling_penalty_repeat is None and gen.is_file():
        # llama.cpp's gguf-py reads transformers' name too (PyPI's 0.19.0 does not yet).
        try:
            metadata.sampling_penalty_repeat = json.loads(gen.read_text(encoding="utf-8")).get("repetition_penalty")
        except json.JSONDecodeError:
            pass
    if metadata.name is None:
        metadata.name = model_dir.name
    if metadata.size_label is None and total_params > 0:
        metadata.size_label = gguf.size_label(*counts)
    w.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(w)


def _text_params(w: Any, hparams: dict[str, Any], file_type: int) -> None:
    """`TextModel.set_gguf_parameters` (the parts dense Llama, Qwen2 and BERT models reach)."""
    import gguf

    w.add_block_count(_find(hparams, ["n_layers", "num_hidden_layers", "n_layer", "num_layers"]))
    ctx = _find(
        hparams,
        ["max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length", "model_max_length"],
    )
    if ctx is not None:
        w.add_context_length(ctx)
    if (v := _find(hparams, ["hidden_size", "n_embd", "dim"])) is not None:
        w.add_embedding_length(v)
    ff_keys = [
        "prefix_dense_intermediate_size",
        "dense_intermediate_size",
        "intermediate_size",
        "n_inner",
        "hidden_dim",
    ]
    if (v := _find(hparams, ff_keys)) is not None:
        w.add_feed_forward_length(v)
    if (v := _find(hparams, ["num_attention_heads", "n_head", "n_heads"])) is not None:
        w.add_head_count(v)
    if (v := _find(hparams, ["num_key_value_heads", "n_kv_heads"])) is not None:
        w.add_head_count_kv(v)
    if hparams.get("is_causal") is False:
        w.add_causal_attention(False)
    # (per layer type: the full-attention layers' rope, and the sliding ones' theta as its own key)
    rope = hparams["_rope"].get("full_attention", hparams["_rope"])
    rope_type = rope.get("rope_type")
    if rope_type is not None and rope.get("factor") is not None:
        if rope_type == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        elif rope_type == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rope["factor"])
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            if (v := rope.get("extrapolation_factor")) is not None:
                w.add_rope_scaling_yarn_ext_factor(v)
            if (v := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
                w.add_rope_scaling_yarn_attn_factor(v)
            if (v := rope.get("beta_fast")) is not None:
                w.add_rope_scaling_yarn_beta_fast(v)
            if (v := rope.get("beta_slow")) is not None:
                w.add_rope_scaling_yarn_beta_slow(v)
    if rope_type in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if (theta := rope.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (theta := hparams["_rope"].get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(theta)
    if (v := _find(hparams, ["rms_norm_eps", "norm_eps"])) is not None:
        w.add_layer_norm_rms_eps(v)
    if (v := _find(hparams, ["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"])) is not None:
        w.add_layer_norm_eps(v)
    _expert_params(w, hparams)
    if (head_dim := hparams.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(file_type)


def _expert_params(w: Any, hparams: dict[str, Any]) -> None:
    """The mixture-of-experts part of `TextModel.set_gguf_parameters`."""
    import gguf

    if (v := _find(hparams, ["num_local_experts", "num_experts", "n_routed_experts"])) is not None:
        w.add_expert_count(v)
    if (v := _find(hparams, ["num_experts_per_tok", "num_experts_per_token", "top_k_experts"])) is not None:
        w.add_expert_used_count(v)
    if (v := hparams.get("n_group")) is not None:
        w.add_expert_group_count(v)
    if (v := hparams.get("topk_group")) is not None:
        w.add_expert_group_used_count(v)
    score_keys = [
        "score_function",
        "scoring_func",
        "score_func",
        "moe_router_activation",
        "moe_router_activation_func",
        "expert_selection_fn",
    ]
    if (fn := _find(hparams, score_keys)) is not None:
        funcs = {
            "sigmoid": gguf.ExpertGatingFuncType.SIGMOID,
            "softmax": gguf.ExpertGatingFuncType.SOFTMAX,
            "sqrtsoftplus": gguf.ExpertGatingFuncType.SQRTSOFTPLUS,
        }
        if fn not in funcs:
            raise ValueError(f"expert score gating function {fn!r}: convert_hf_to_gguf.py refuses it too")
        w.add_expert_gating_func(funcs[fn])


def _parameter_counts(tensors: Sequence[tuple[str, Sequence[int], str]]) -> tuple[int, int, int, int]:
    """`GGUFWriter.get_total_parameter_count`: total, shared, per-expert and expert count."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for name, shape, _ in tensors:
        size = math.prod(shape)
        if "_exps." in name and len(shape) >= 3:
            count = shape[-2 if ".bias" in name else -3]
            expert += size // count
            expert_sum += count
            n_expert_tensors += 1
        else:
            shared += size
        total += size
    return total, shared, expert, expert_sum // n_expert_tensors if n_expert_tensors else 0


def _pooling(w: Any, model_dir: Path, hparams: dict[str, Any]) -> None:
    """`_try_set_pooling_type`: a sentence-transformers Pooling module decides the embedding's pooling."""
    import gguf

    modes = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS, "lasttoken": gguf.PoolingType.LAST}
    modules = model_dir / "modules.json"
    if modules.is_file():
        for mod in json.loads(modules.read_text(encoding="utf-8")):
            if mod["type"].endswith("Pooling"):
                cfg = json.loads((model_dir / mod["path"] / "config.json").read_text(encoding="utf-8"))
                if cfg.get("pooling_mode_mean_tokens"):
                    w.add_pooling_type(gguf.PoolingType.MEAN)
                elif cfg.get("pooling_mode_cls_token"):
                    w.add_pooling_type(gguf.PoolingType.CLS)
                elif cfg.get("pooling_mode_lasttoken"):
                    w.add_pooling_type(gguf.PoolingType.LAST)
                elif cfg.get("pooling_mode") in modes:
                    w.add_pooling_type(modes[cfg["pooling_mode"]])
                else:
                    raise ValueError(
                        f"{model_dir / mod['path']}: only mean, cls and last-token pooling run in llama.cpp"
                    )
                break
    if (cp := hparams.get("classifier_pooling")) is not None:
        if cp not in ("cls", "mean"):
            raise ValueError(f"{model_dir}: classifier_pooling {cp!r}; llama.cpp pools a classifier by cls or mean")
        # (gguf-py's add_classifier_pooling_type, not on PyPI yet)
        w.add_uint32(f"{w.arch}.classifier.pooling_type", modes[cp].value)


def _looks_special(token: str) -> bool:
    """`does_token_look_special`."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _vocab_base(model_dir: Path, hparams: dict[str, Any]) -> tuple[list[str], list[int], str]:
    """`get_vocab_base`: a BPE or WordPiece vocabulary as transformers loads it, with llama.cpp's name for the
    pre-tokenizer (found by the hash of the ids of a fixed text). A byte-level BPE tokenizer.json that
    transformers takes as it is is read with `tokenizers` alone (`_gguf_tokenizer`), without torch."""
    import gguf

    from lorafast import _gguf_tokenizer
    from lorafast._gguf_pretokenizers import CHKTXT, PRE_TOKENIZERS

    tokenizer: Any = _gguf_tokenizer.load(model_dir)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab_size = hparams.get("vocab_size", len(tokenizer.vocab))
    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(chkhsh)
    if pre is None:
        raise ValueError(
            f"{model_dir}: llama.cpp does not know this tokenizer's pre-tokenizer (hash {chkhsh}); "
            "convert_hf_to_gguf.py refuses it too"
        )
    reverse = {i: t for t, i in tokenizer.vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types, pre


def _write_vocab(
    w: Any,
    model_dir: Path,
    model: str,
    pre: str,
    tokens: Sequence[Any],
    types: Sequence[int],
    scores: Optional[Sequence[float]] = None,
    merges: bool = False,
) -> None:
    """The tokenizer keys every converter vocabulary path writes, in its order, then the special tokens
    (with BPE merges for byte-level BPE, where the converter does not bound ids by the vocabulary)."""
    from lorafast._gguf_vocab import SpecialVocab

    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_token_types(types)
    special = SpecialVocab(model_dir, load_merges=True) if merges else SpecialVocab(model_dir, n_vocab=len(tokens))
    special.add_to_gguf(w, quiet=True)


def _sentencepiece_pieces(sp: Any, n: int) -> Iterator[tuple[int, bytes, float, int]]:
    """The first `n` pieces of a sentencepiece model: id, bytes, score and the converter's token type."""
    import gguf

    kinds = gguf.TokenType
    # sentencepiece's calls take a list of ids: one call per property instead of one per token.
    ids = list(range(n))
    flags = zip(sp.IsUnknown(ids), sp.IsControl(ids), sp.IsUnused(ids), sp.IsByte(ids))
    for i, piece, score, (unknown, control, unused, byte) in zip(ids, sp.IdToPiece(ids), sp.GetScore(ids), flags):
        ty = (
            kinds.UNKNOWN
            if unknown
            else kinds.CONTROL
            if control
            else kinds.UNUSED
            if unused
            else kinds.BYTE
            if byte
            else kinds.NORMAL
        )
        yield i, piece.encode("utf-8"), score, ty


def _vocab_sentencepiece(w: Any, model_dir: Path, hparams: dict[str, Any]) -> None:
    """`_set_vocab_sentencepiece`: tokenizer.model, added tokens, scores."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    vocab_size = _find(hparams, ["vocab_size_per_layer_input", "vocab_size"]) or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for i, piece, score, ty in _sentencepiece_pieces(sp, min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i], types[i] = piece, score, ty
    added_file = model_dir / "added_tokens.json"
    if added_file.is_file():
        for key, i in json.loads(added_file.read_text(encoding="utf-8")).items():
            if i < vocab_size:
                tokens[i], scores[i], types[i] = key.encode("utf-8"), -1000.0, gguf.TokenType.USER_DEFINED
    config_file = model_dir / "tokenizer_config.json"
    if config_file.is_file():
        decoder = json.loads(config_file.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        for key, data in decoder.items():
            i, token = int(key), data["content"]
            if i >= vocab_size:
                continue
            if data.get("special") or _looks_special(token):
                types[i] = gguf.TokenType.CONTROL
            else:
                token = token.replace("\u2581", " ")
                types[i] = gguf.TokenType.USER_DEFINED
            scores[i], tokens[i] = -1000.0, token.encode("utf-8")
    _write_vocab(w, model_dir, "llama", "default", tokens, types, scores=scores)


def _vocab_gpt2(w: Any, model_dir: Path, hparams: dict[str, Any]) -> None:
    """`_set_vocab_gpt2`: byte-level BPE from tokenizer.json."""

    tokens, types, pre = _vocab_base(model_dir, hparams)
    _write_vocab(w, model_dir, "gpt2", pre, tokens, types, merges=True)


def _vocab_bert(w: Any, model_dir: Path, hparams: dict[str, Any]) -> None:
    """`BertModel.set_vocab`: WordPiece written with llama.cpp's phantom spaces."""
    import gguf

    tokens, types, pre = _vocab_base(model_dir, hparams)
    w.add_token_type_count(hparams.get("type_vocab_size", 1))
    tokens = [
        t if ty == gguf.TokenType.CONTROL else t[2:] if t.startswith("##") else "\u2581" + t
        for t, ty in zip(tokens, types)
    ]
    _write_vocab(w, model_dir, "bert", pre, tokens, types)


def _vocab_xlmroberta(w: Any, model_dir: Path, hparams: dict[str, Any]) -> None:
    """`BertModel._xlmroberta_set_vocab`: the sentencepiece unigram model (or, without one, tokenizer.json
    as transformers loads it) as llama.cpp's T5 tokenizer, realigned to fairseq's ids as transformers does."""
    import gguf

    types_of = gguf.TokenType
    spm_file = model_dir / "sentencepiece.bpe.model"
    if spm_file.is_file():
        require("lorafast gguf of an XLM-RoBERTa model (its sentencepiece model)", "google.protobuf")
        from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
        proto.ParseFromString(spm_file.read_bytes())
        if proto.trainer_spec.model_type != 1:
            raise ValueError(f"{spm_file}: not a unigram sentencepiece model; the converter takes only those")
        add_prefix = proto.normalizer_spec.add_dummy_prefix
        remove_whitespaces = proto.normalizer_spec.remove_extra_whitespaces
        charsmap = proto.normalizer_spec.precompiled_charsmap
        sp = SentencePieceProcessor()
        sp.LoadFromFile(str(spm_file))
        vocab_size = max(hparams.get("vocab_size", 0), sp.vocab_size())
    else:
        from base64 import b64decode

        from transformers import AutoTokenizer

        tok: Any = AutoTokenizer.from_pretrained(model_dir)
        tok_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        config_file = model_dir / "tokenizer_config.json"
        tok_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        add_prefix = tok.add_prefix_space
        remove_whitespaces = tok.clean_up_tokenization_spaces
        charsmap = b64decode(tok_json["normalizer"]["precompiled_charsmap"])
        vocab_size = max(hparams.get("vocab_size", 0), tok.vocab_size)
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(types_of.UNUSED)] * vocab_size
    if spm_file.is_file():
        for i, piece, score, ty in _sentencepiece_pieces(sp, sp.vocab_size()):
            tokens[i], scores[i], types[i] = piece, score, ty
        # (realign tokens as transformers does: fairseq's <s> <pad> </s> <unk> first, every piece one on)
        tokens = [b"<s>", b"<pad>", b"</s>", b"<unk>"] + tokens[3:-1]
        scores = [0.0, 0.0, 0.0, 0.0] + scores[3:-1]
        types = [types_of.CONTROL, types_of.CONTROL, types_of.CONTROL, types_of.UNKNOWN] + types[3:-1]
    else:
        added = tok.get_added_vocab()
        unk_id = added.get(tok_config.get("unk_token"), tok_json["model"].get("unk_id", 3))
        specials = set(tok.all_special_ids)
        for i in range(tok.vocab_size):
            if (piece := tok._convert_id_to_token(i)) is not None:
                tokens[i], scores[i] = piece.encode("utf-8"), tok_json["model"]["vocab"][i][1]
                types[i] = (
                    types_of.UNKNOWN
                    if i == unk_id
                    else types_of.CONTROL
                    if i in specials
                    else types_of.USER_DEFINED
                    if i in added.values()
                    else types_of.NORMAL
                )
    from lorafast._gguf_vocab import SpecialVocab

    w.add_tokenizer_model("t5")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(add_prefix)
    w.add_token_type_count(hparams.get("type_vocab_size", 1))
    w.add_remove_extra_whitespaces(remove_whitespaces)
    if charsmap:
        w.add_precompiled_charsmap(charsmap)
    SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def _llama_vocab(w: Any, model_dir: Path, hparams: dict[str, Any]) -> None:
    """`LlamaModel.set_vocab` for sentencepiece and byte-level BPE tokenizers."""
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        if (aps := json.loads(config.read_text(encoding="utf-8")).get("add_prefix_space")) is not None:
            w.add_add_space_prefix(aps)
    if (model_dir / "tokenizer.model").is_file():
        _vocab_sentencepiece(w, model_dir, hparams)
    else:
        _vocab_gpt2(w, model_dir, hparams)
    if hparams.get("vocab_size", 32000) == 49152:
        w.add_add_bos_token(False)


def metadata(
    model_dir: Path,
    arch: str,
    file_type: str,
    outtype: str,
    tensors: Sequence[tuple[str, Sequence[int], str]],
    name: Optional[str] = None,
) -> tuple[bytes, int]:
    """The GGUF-encoded key-value section and its pair count, in the converter's order (for a
    llama-quantize mix, with general.quantization_version and general.file_type moved last as
    llama-quantize does)."""
    import gguf

    w = gguf.GGUFWriter(None, arch)
    _general(w, model_dir, name, _parameter_counts(tensors))
    hparams = _hparams(model_dir)
    hf_arch = (hparams.get("architectures") or [""])[0]
    roberta = hf_arch in _ROBERTA_ARCHITECTURES
    xlm_roberta = hf_arch == "XLMRobertaForSequenceClassification"
    if roberta and (pad := hparams.get("pad_token_id")) is not None and "max_position_embeddings" in hparams:
        # RobertaModel.__init__: positions start after the pad id; the rows before are dropped.
        hparams = {**hparams, "max_position_embeddings": hparams["max_position_embeddings"] - (1 + pad)}
    converter_type = FILE_TYPES[outtype]
    if arch == "gpt2":
        w.add_block_count(hparams["n_layer"])
        w.add_context_length(hparams["n_ctx"])
        w.add_embedding_length(hparams["n_embd"])
        w.add_feed_forward_length(4 * hparams["n_embd"])
        w.add_head_count(hparams["n_head"])
        w.add_layer_norm_eps(hparams["layer_norm_epsilon"])
        w.add_file_type(converter_type)
    else:
        _text_params(w, hparams, converter_type)
    if arch == "llama":
        w.add_vocab_size(hparams["vocab_size"])
        rope_dim = hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]
        w.add_rope_dimension_count(rope_dim)
    elif arch == "qwen2":
        _pooling(w, model_dir, hparams)
    elif arch in ("qwen2moe", "qwen3moe"):
        # Qwen2MoeModel.set_gguf_parameters (Qwen3MoeModel inherits it).
        if (v := hparams.get("moe_intermediate_size")) is not None:
            w.add_expert_feed_forward_length(v)
        if (v := hparams.get("shared_expert_intermediate_size")) is not None:
            w.add_expert_shared_feed_forward_length(v)
    elif arch == "gpt-oss":
        # GptOssModel.set_gguf_parameters
        w.add_sliding_window(hparams["sliding_window"])
        w.add_expert_feed_forward_length(hparams["intermediate_size"])
    elif arch in ("bert", "modern-bert"):
        w.add_causal_attention(False)
        _pooling(w, model_dir, hparams)
        labels = hparams.get("id2label")
        dummy = labels and len(labels) == 2 and labels.get(0, labels.get("0")) == "LABEL_0"
        # The converter drops AutoConfig's two dummy labels, so llama.cpp takes n_cls_out = 1 and refuses
        # the [H, 2] head; a classifier head (cls.output) keeps them, every label count as written.
        head = any(t[0] == "cls.output.weight" for t in tensors)
        if labels and (head or not dummy):
            w.add_classifier_output_labels([v for _, v in sorted(labels.items())])
        if arch == "modern-bert":
            if "layer_norm_eps" not in hparams and (eps := hparams.get("norm_eps")) is not None:
                # The converter finds ModernBERT's norm_eps as an RMS epsilon only, and llama.cpp's
                # modern-bert reads attention.layer_norm_epsilon (its norms are LayerNorms): without it the
                # converter's file does not load.
                w.add_layer_norm_eps(eps)
            # ModernBertModel.set_gguf_parameters
            w.add_sliding_window(hparams["local_attention"])
            if (pattern := hparams.get("global_attn_every_n_layers")) is not None:
                w.add_sliding_window_pattern(pattern)
            w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
            w.add_vocab_size(hparams["vocab_size"])
            if act := hparams.get("hidden_activation"):
                w.add_string(f"{arch}.hidden_activation", act)  # (gguf-py's add_hidden_act, not on PyPI yet)
    w.add_quantization_version(QUANT_VERSION)
    if arch == "llama":
        _llama_vocab(w, model_dir, hparams)
    elif arch == "qwen2":
        if (model_dir / "tokenizer.model").is_file():
            _vocab_sentencepiece(w, model_dir, hparams)
        else:
            _vocab_gpt2(w, model_dir, hparams)
    elif arch == "modern-bert":
        # ModernBertModel.set_vocab
        w.add_add_bos_token(True)
        w.add_add_eos_token(True)
        w.add_add_sep_token(True)
        _vocab_gpt2(w, model_dir, hparams)
    elif arch == "bert" and xlm_roberta:
        _vocab_xlmroberta(w, model_dir, hparams)
    elif arch == "bert" and roberta and (model_dir / "tokenizer.json").is_file():
        # RobertaModel.set_vocab: byte-level BPE, then the token type count BertModel.set_vocab writes first.
        _vocab_gpt2(w, model_dir, hparams)
        w.add_token_type_count(hparams.get("type_vocab_size", 1))
    elif arch == "bert":
        _vocab_bert(w, model_dir, hparams)
    else:
        # GPT-2, the Qwen MoE models (TextModel.set_vocab) and GPT-OSS (_set_vocab_gpt2).
        _vocab_gpt2(w, model_dir, hparams)
    kv = w.kv_data[0]
    if file_type != outtype:
        # llama-quantize copies the converter's keys and sets these two last (gguf_set_val_u32 moves a key).
        for key in (gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.FILE_TYPE):
            kv.pop(key, None)
        w.add_quantization_version(QUANT_VERSION)
        w.add_file_type(FILE_TYPES[file_type])
    return _encode_kv(w)


@contextmanager
def _merged_view(base_dir: Path, adapter_dirs: Sequence[Path], config: Optional[str]) -> Iterator[Path]:
    """The model folder the converter would read after `lorafast merge`, for the metadata: the base's files,
    an adapter's tokenizer files over them (a tokenizer saved with the adapter wins, as the merge copies
    it), and the merged config.json (a new task class, an untied or resized vocabulary, a pad token).
    Without either, the base folder itself; otherwise links to those files in a temporary folder of the
    base folder's name (the converter names the model after its folder), which no model data enters."""
    tokenizer_files = {f: a / f for a in adapter_dirs for f in _core.TOKENIZER_FILES if (a / f).is_file()}
    try:
        base_config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        base_config = None
    merged_config = json.loads(config) if config is not None else base_config
    if not tokenizer_files and merged_config == base_config:
        yield base_dir
        return
    with tempfile.TemporaryDirectory(prefix="lorafast-gguf-") as tmp:
        view = Path(tmp) / base_dir.name
        view.mkdir()
        for f in base_dir.iterdir():
            if f.name not in tokenizer_files and f.name != "config.json":
                (view / f.name).symlink_to(f.resolve())
        for name, f in tokenizer_files.items():
            (view / name).symlink_to(f.resolve())
        if merged_config is not None:
            (view / "config.json").write_text(json.dumps(merged_config, indent=2), encoding="utf-8")
        yield view


def to_gguf(
    base: PathLike,
    adapters: Sequence[PathLike] = (),
    out: PathLike = "model.gguf",
    *,
    type: str = "f16",
    weights: Optional[Sequence[float]] = None,
    name: Optional[str] = None,
    threads: Optional[int] = None,
    overwrite: bool = False,
    safe_merge: bool = False,
    progress: bool = True,
) -> GgufReport:
    """Merge ``adapters`` into ``base`` and write ``out`` as GGUF of ``type`` (f32, f16, bf16, q8_0: as
    convert_hf_to_gguf.py writes the merged model; q4_0, q4_k_m, q5_k_m, q6_k: as llama-quantize then
    writes that). ``name`` sets general.name (default: derived from the model folder, as the converter does)."""
    require("lorafast gguf", "gguf", "transformers", find_only=("transformers",))
    file_type = type.lower()
    if file_type not in TYPES:
        from lorafast.errors import InvalidArgumentError

        raise InvalidArgumentError(f"unknown GGUF type {type!r}; use one of {', '.join(TYPES)}")
    base_dir = Path(resolve_model_path(base))
    adapter_dirs = [Path(resolve_model_path(a)) for a in adapters]
    arch, _, outtype, tensors, config = _core.gguf_plan(base_dir, adapter_dirs, file_type=file_type, weights=weights)
    with _merged_view(base_dir, adapter_dirs, config) as model_dir:
        extra = _extra_tensors(arch, _hparams(model_dir))
        if extra:
            _, _, outtype, tensors, _ = _core.gguf_plan(
                base_dir, adapter_dirs, file_type=file_type, weights=weights, extra=extra
            )
        kv, n_kv = metadata(model_dir, arch, file_type, outtype, tensors, name)
    return run_with_bar(
        "gguf",
        progress,
        lambda cb: _core.gguf_write(
            base_dir,
            adapter_dirs,
            out,
            kv,
            n_kv,
            file_type=file_type,
            weights=weights,
            threads=threads,
            overwrite=overwrite,
            safe_merge=safe_merge,
            extra=extra,
            progress=cb,
        ),
    )


def _extra_tensors(arch: str, hparams: dict[str, Any]) -> list[tuple[str, list[float]]]:
    """`LlamaModel.generate_extra_tensors`: Llama 3's rope scaling as one factor per rotary frequency
    (rope_freqs.weight). Computed with torch as the converter computes it, since its float32 pow and
    reciprocals are the file's bytes; torch is imported for these models only."""
    rope = hparams["_rope"]
    rope = rope.get("full_attention", rope) or {}
    if arch != "llama" or str(rope.get("rope_type", "")).lower() != "llama3":
        return []
    require("lorafast gguf of a Llama 3 model (its rope_freqs)", "torch")
    import torch

    base = rope.get("rope_theta", 10000.0)
    if (dim := hparams.get("head_dim")) is None:
        dim = hparams["hidden_size"] // hparams["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors: list[Any] = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", torch.tensor(rope_factors, dtype=torch.float32).tolist())]


def lora_metadata(
    adapter_dir: Path,
    base_dir: Path,
    arch: str,
    lora_alpha: float,
    tensors: Sequence[tuple[str, Sequence[int], str]],
    name: Optional[str] = None,
) -> tuple[bytes, int]:
    """The key-value section `convert_lora_to_gguf.py` writes: general.* from the adapter folder (its
    README's model card), general.type adapter, adapter.type lora, adapter.lora.alpha."""
    import gguf

    w = gguf.GGUFWriter(None, arch)
    # gguf's parameter count of a LoRA file: each pair counts as B's rows times A's columns, negated.
    total, last_a = 0, None
    for tname, shape, _ in tensors:
        if tname.endswith(".lora_a"):
            last_a = shape
        elif tname.endswith(".lora_b") and last_a is not None:
            total += math.prod([*shape[:-1], last_a[-1]])
    metadata = gguf.Metadata.load(None, adapter_dir, name, -total)
    if metadata.name is None:
        metadata.name = base_dir.name
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    metadata.set_gguf_meta_model(w)
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora_alpha))
    w.add_quantization_version(QUANT_VERSION)
    return _encode_kv(w)


def _pack_array_fast(val: Any) -> Optional[bytes]:
    """The GGUFWriter encoding of a long list of str, float or int (the vocabulary's tokens, scores and
    types), built in bulk: gguf packs each item in Python, tenths of a second for a 32k vocabulary. None
    for anything else, which goes to gguf."""
    import struct

    import gguf
    import numpy as np

    if not isinstance(val, list) or len(val) < 64:
        return None
    kinds = {type(v) for v in val}
    array = struct.pack("<I", gguf.GGUFValueType.ARRAY)
    if kinds <= {str, bytes}:
        # gguf writes str as UTF-8 and bytes as they are
        length = struct.Struct("<Q").pack
        items = (v.encode("utf-8") if isinstance(v, str) else v for v in val)
        body = b"".join(length(len(e)) + e for e in items)
        return array + struct.pack("<IQ", gguf.GGUFValueType.STRING, len(val)) + body
    if kinds == {float}:
        floats = np.asarray(val, dtype=np.float64)
        if not np.isfinite(floats).all() or np.abs(floats).max() > np.finfo(np.float32).max:
            return None  # struct refuses what float32 cannot hold; gguf says so
        return array + struct.pack("<IQ", gguf.GGUFValueType.FLOAT32, len(val)) + floats.astype("<f4").tobytes()
    # ints, and IntEnums such as gguf.TokenType (bool is an int that gguf types apart)
    if all(issubclass(k, int) and not issubclass(k, bool) for k in kinds):
        ints = np.asarray([int(v) for v in val], dtype=np.int64)
        if ints.min() < -(2**31) or ints.max() >= 2**31:
            return None
        return array + struct.pack("<IQ", gguf.GGUFValueType.INT32, len(val)) + ints.astype("<i4").tobytes()
    return None


def _encode_kv(w: Any) -> tuple[bytes, int]:
    import gguf

    out = bytearray()
    for key, val in w.kv_data[0].items():
        out += w._pack_val(key, gguf.GGUFValueType.STRING, add_vtype=False)
        fast = _pack_array_fast(val.value) if val.type == gguf.GGUFValueType.ARRAY and val.sub_type is None else None
        out += fast if fast is not None else w._pack_val(val.value, val.type, add_vtype=True, sub_type=val.sub_type)
    return bytes(out), len(w.kv_data[0])


def lora_to_gguf(
    adapter: PathLike,
    base: PathLike,
    out: PathLike,
    *,
    type: str = "f32",
    name: Optional[str] = None,
    overwrite: bool = False,
) -> GgufReport:
    """Write the PEFT LoRA ``adapter`` (trained on the model folder ``base``) as a GGUF adapter that
    llama.cpp applies at run time (``--lora``), as convert_lora_to_gguf.py writes it (f32, f16, bf16, q8_0).
    Adapters llama.cpp's format cannot express exactly (DoRA, rsLoRA, per-module alpha, saved modules) are
    refused: merge them instead (``to_gguf``)."""
    require("lorafast gguf-lora", "gguf")
    file_type = type.lower()
    if file_type not in ("f32", "f16", "bf16", "q8_0"):
        from lorafast.errors import InvalidArgumentError

        raise InvalidArgumentError(f"a LoRA GGUF is f32, f16, bf16 or q8_0, not {type!r}")
    adapter_dir = Path(resolve_model_path(adapter))
    base_dir = Path(resolve_model_path(base))
    arch, alpha, tensors = _core.gguf_lora_plan(adapter_dir, base_dir, file_type=file_type)
    kv, n_kv = lora_metadata(adapter_dir, base_dir, arch, alpha, tensors, name)
    return _core.gguf_lora_write(adapter_dir, base_dir, out, kv, n_kv, file_type=file_type, overwrite=overwrite)
