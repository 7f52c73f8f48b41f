"""Bad input: a clear error naming the file, tensor or module; nothing half-written; inputs untouched."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import cli_error, digest, no_leftovers

import lorafast
from lorafast import errors
from lorafast.cli import main
from lorafast.synthetic import LlamaShape, make_llama_checkpoint, make_lora_adapter, write_safetensors

SHAPE = LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=128)


@pytest.fixture()
def pair(tmp_path):
    base = make_llama_checkpoint(tmp_path / "base", SHAPE, shards=2)
    adapter = make_lora_adapter(tmp_path / "adapter", SHAPE, r=4, alpha=8)
    return base, adapter


def first_shard(base: Path) -> Path:
    return sorted(base.glob("*.safetensors"))[0]


def test_truncated_base_shard(tmp_path, pair, capsys):
    base, adapter = pair
    shard = first_shard(base)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(errors.CheckpointError, match=shard.name + ".*truncated"):
        lorafast.merge(base, adapter, tmp_path / "out", progress=False)
    line = cli_error(capsys, "merge", str(base), str(adapter), "-o", str(tmp_path / "out"))
    assert shard.name in line
    no_leftovers(tmp_path)


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def test_header_pointing_outside_the_file(tmp_path, pair):
    base, adapter = pair
    shard = first_shard(base)

    def outside(h):
        last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        h[last]["data_offsets"][1] += 1 << 20

    _rewrite_header(shard, outside)
    with pytest.raises(errors.CheckpointError, match=shard.name):
        lorafast.merge(base, adapter, tmp_path / "out", progress=False)
    no_leftovers(tmp_path)


def test_overlapping_tensors(tmp_path, pair):
    base, adapter = pair
    shard = first_shard(base)

    def overlap(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        h[names[1]]["data_offsets"] = [0, h[names[1]]["data_offsets"][1] - h[names[1]]["data_offsets"][0]]

    _rewrite_header(shard, overlap)
    with pytest.raises(errors.CheckpointError, match=f"{shard.name}.*(overlap|offsets)"):
        lorafast.merge(base, adapter, tmp_path / "out", progress=False)


def test_unknown_dtype(tmp_path, pair):
    base, adapter = pair
    shard = first_shard(base)

    def unknown(h):
        k = next(k for k in h if k != "__metadata__")
        h[k]["dtype"] = "Q4_K"

    _rewrite_header(shard, unknown)
    with pytest.raises(errors.CheckpointError, match="Q4_K"):
        lorafast.merge(base, adapter, tmp_path / "out", progress=False)


def test_adapter_shapes_do_not_fit(tmp_path, pair, capsys):
    base, _ = pair
    other = make_lora_adapter(
        tmp_path / "other", LlamaShape(hidden=96, intermediate=128, layers=2, heads=4, kv_heads=2), r=4
    )
    with pytest.raises(errors.ShapeMismatchError) as e:
        lorafast.merge(base, other, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert re.search(
        r"^module model\.layers\.\d+\.\w+\.\w+_proj: .*A \[4, \d+\] and B \[\d+, 4\] "
        r"does not fit base tensor model\.layers\.\d+\.\w+\.\w+_proj\.weight of shape \[\d+, \d+\]",
        msg,
    ), msg
    line = cli_error(capsys, "merge", str(base), str(other), "-o", str(tmp_path / "out"))
    assert "does not fit base tensor" in line
    no_leftovers(tmp_path)


def test_adapter_targets_no_module_of_the_base(tmp_path, pair):
    base, adapter = pair
    st = adapter / "adapter_model.safetensors"
    _rewrite_header(
        st,
        lambda h: {
            h.__setitem__(k.replace("model.layers", "decoder.blocks"), h.pop(k))
            for k in [k for k in h if k != "__metadata__"]
        },
    )
    with pytest.raises(errors.AdapterError, match="targets no module of the base"):
        lorafast.merge(base, adapter, tmp_path / "out", progress=False)


def test_missing_adapter_config(tmp_path, pair, capsys):
    base, adapter = pair
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(errors.AdapterError, match="adapter_config.json"):
        lorafast.merge(base, adapter, tmp_path / "out", progress=False)
    assert "adapter_config.json" in cli_error(capsys, "merge", str(base), str(adapter), "-o", str(tmp_path / "out"))


def test_missing_base_folder(tmp_path, pair):
    _, adapter = pair
    with pytest.raises(FileNotFoundError, match="nope"):
        lorafast.merge(tmp_path / "nope", adapter, tmp_path / "out", progress=False)


def test_unsupported_peft_type(tmp_path, pair):
    base, adapter = pair
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.UnsupportedError, match="IA3"):
        lorafast.merge(base, adapter, tmp_path / "out", progress=False)


def test_pickle_adapter_is_refused(tmp_path, pair, capsys):
    base, adapter = pair
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(errors.UnsupportedError, match="adapter_model.bin.*convert"):
        lorafast.merge(base, adapter, tmp_path / "out", progress=False)
    assert "safetensors" in cli_error(capsys, "merge", str(base), str(adapter), "-o", str(tmp_path / "out"))


def test_pickle_base_is_refused(tmp_path, pair):
    base, adapter = pair
    for f in base.glob("*.safetensors*"):
        f.unlink()
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(errors.LorafastError, match="pickle"):
        lorafast.merge(base, adapter, tmp_path / "out", progress=False)


def _poison(adapter: Path, value: float) -> None:
    st = adapter / "adapter_model.safetensors"
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(st))
    key = next(k for k in tensors if "layers.1.self_attn.v_proj.lora_B" in k)
    tensors[key][3, 1] = value
    save_file(tensors, str(st), metadata={"format": "pt"})


def test_nonfinite_refused_with_safe_merge(tmp_path, pair, capsys):
    base, adapter = pair
    _poison(adapter, np.inf)
    with pytest.raises(errors.NonFiniteError, match="model.layers.1.self_attn.v_proj.weight"):
        lorafast.merge(base, adapter, tmp_path / "out", progress=False, safe_merge=True)
    no_leftovers(tmp_path)
    cli_error(capsys, "merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "--safe-merge")
    report = lorafast.merge(base, adapter, tmp_path / "out", progress=False)
    assert report.nonfinite_values > 0


def test_existing_output_is_refused_then_replaced(tmp_path, pair, capsys):
    base, adapter = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(errors.OutputError, match="already exists.*overwrite"):
        lorafast.merge(base, adapter, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    cli_error(capsys, "merge", str(base), str(adapter), "-o", str(out))
    lorafast.merge(base, adapter, out, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if "lorafast-" in p.name]


@pytest.mark.parametrize("where", ["base", "adapter", "inside-base"])
def test_never_writes_into_inputs(tmp_path, pair, where):
    base, adapter = pair
    out = {"base": base, "adapter": adapter, "inside-base": base / "merged"}[where]
    before = digest(base), digest(adapter)
    with pytest.raises(errors.OutputError, match="never writes into its inputs"):
        lorafast.merge(base, adapter, out, progress=False, overwrite=True)
    assert (digest(base), digest(adapter)) == before


def test_inputs_are_not_modified_by_a_merge(tmp_path, pair):
    base, adapter = pair
    before = digest(base), digest(adapter)
    lorafast.merge(base, adapter, tmp_path / "out", progress=False)
    assert (digest(base), digest(adapter)) == before


def test_failure_midway_leaves_nothing(tmp_path, pair):
    """Shapes are checked before writing; a corrupt adapter tensor found while writing still leaves no OUT."""
    base, adapter = pair
    st = adapter / "adapter_model.safetensors"
    # Valid header, but the file is cut short inside the data of its last tensor.
    raw = st.read_bytes()
    st.write_bytes(raw[:-8])
    with pytest.raises(errors.CheckpointError):
        lorafast.merge(base, adapter, tmp_path / "out", progress=False)
    no_leftovers(tmp_path)


def test_weights_must_match_adapters(tmp_path, pair, capsys):
    base, adapter = pair
    with pytest.raises(errors.InvalidArgumentError, match="2 weights given for 1 adapter"):
        lorafast.merge(base, adapter, tmp_path / "out", weights=[1, 2], progress=False)
    cli_error(capsys, "merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "--weights", "1,2")
    no_leftovers(tmp_path)


def test_bad_dtype_and_threads(tmp_path, pair):
    base, adapter = pair
    with pytest.raises(errors.InvalidArgumentError, match="int4"):
        lorafast.merge(base, adapter, tmp_path / "out", dtype="int4", progress=False)
    with pytest.raises(errors.InvalidArgumentError, match="threads"):
        lorafast.merge(base, adapter, tmp_path / "out", threads=0, progress=False)


def test_cli_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["merge", "only-base"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "required" in err[0]


@pytest.mark.parametrize("cls", [getattr(errors, n) for n in errors.__all__])
def test_errors_pickle_round_trip(cls):
    e = cls("model.layers.0.q_proj: something is wrong")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and str(back) == str(e)
    assert isinstance(back, errors.LorafastError)


def test_lora_bias_without_base_bias(tmp_path, pair):
    base, adapter = pair
    st = adapter / "adapter_model.safetensors"
    from safetensors.numpy import load_file, save_file

    t = load_file(str(st))
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = np.ones(64, np.float32)
    save_file(t, str(st))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["lora_bias"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.ShapeMismatchError, match="model.layers.0.self_attn.q_proj.*no bias"):
        lorafast.merge(base, adapter, tmp_path / "out", progress=False)


def test_rank_not_matching_config(tmp_path, pair):
    base, adapter = pair
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["r"] = 8
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.ShapeMismatchError, match="rank 8"):
        lorafast.merge(base, adapter, tmp_path / "out", progress=False)


def test_write_safetensors_helper_round_trips(tmp_path):
    from safetensors.numpy import load_file

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_safetensors(tmp_path / "x.safetensors", [("x", (2, 3))], lambda n, s: x, "fp32")
    assert np.array_equal(load_file(str(tmp_path / "x.safetensors"))["x"], x)
    shutil.rmtree(tmp_path)
