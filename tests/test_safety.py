"""Nothing the user owns is lost: Ctrl-C and kill leave nothing behind that a later run does not clear,
outputs never overwrite inputs, a full disk is caught before writing, concurrent writers leave one
whole output, and a missing optional package is one clear line.

Processes are signalled only once they are known to be working: the child's progress callback reports
the first finished tensor and then blocks, so the signal always lands mid-merge."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_error, digest

import lorafast
from lorafast.cli import main
from lorafast.synthetic import LlamaShape, make_llama_checkpoint, make_lora_adapter

SHAPE = LlamaShape(hidden=128, intermediate=352, layers=4, heads=4, kv_heads=2, vocab=512)

# A merge whose progress callback, after the first tensor, prints "working" and then waits until the
# file GATE exists (never, unless the test makes it). Ctrl-C inside that wait raises KeyboardInterrupt in
# the callback, which cancels the merge.
BLOCKING_MERGE = """
import os, sys, time, lorafast
base, adapter, out, gate = sys.argv[1:5]
seen = []
def progress(name, nbytes):
    if name and not seen:
        seen.append(name)
        print("working", flush=True)
        while not os.path.exists(gate):
            time.sleep(0.01)
r = lorafast._core.merge(base, [adapter], out, threads=1, overwrite=True, progress=progress)
print("done", r.tensors_total, flush=True)
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    return make_llama_checkpoint(root / "base", SHAPE, shards=2), make_lora_adapter(root / "adapter", SHAPE, r=8)


def start_blocked_merge(base: Path, adapter: Path, out: Path, gate: Path) -> subprocess.Popen:
    """A merge child process that is known to be mid-merge when this returns."""
    p = subprocess.Popen(
        [sys.executable, "-c", BLOCKING_MERGE, str(base), str(adapter), str(out), str(gate)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = p.stdout.readline().strip()
    if line != "working":
        p.kill()
        raise AssertionError(f"child did not start merging: {line!r} {p.stderr.read()}")
    return p


def staging_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "lorafast-tmp" in p.name)


def test_ctrl_c_stops_a_merge_and_leaves_nothing(tmp_path, model):
    base, adapter = model
    out = tmp_path / "out"
    p = start_blocked_merge(base, adapter, out, tmp_path / "never")
    assert staging_leftovers(tmp_path), "the merge is writing into its staging folder"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "KeyboardInterrupt" in err, err
    assert not out.exists()
    assert staging_leftovers(tmp_path) == []


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path, model, capsys):
    base, adapter = model
    out = tmp_path / "out"
    p = start_blocked_merge(base, adapter, out, tmp_path / "never")
    p.kill()
    p.wait(timeout=60)
    left = staging_leftovers(tmp_path)
    assert len(left) == 2 and any(x.endswith(".lock") for x in left), left  # the folder and its lock file
    # A later run writing beside it (another OUT in the same folder) clears it and says so in one line.
    assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "other"), "-q"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "removed" in err[0] and "interrupted run" in err[0] and f"process {p.pid}" in err[0], err
    assert staging_leftovers(tmp_path) == []
    assert not out.exists() and (tmp_path / "other" / "config.json").exists()


def test_a_live_runs_staging_folder_is_never_touched(tmp_path, model):
    base, adapter = model
    gate = tmp_path / "gate"
    p = start_blocked_merge(base, adapter, tmp_path / "slow", gate)
    try:
        live = staging_leftovers(tmp_path)
        report = lorafast.merge(base, adapter, tmp_path / "fast", progress=False)
        assert not report.warnings
        assert staging_leftovers(tmp_path) == live
    finally:
        gate.touch()
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and out.startswith("done"), err
    assert digest(tmp_path / "slow") == digest(tmp_path / "fast")
    assert staging_leftovers(tmp_path) == []


def test_concurrent_overwrites_leave_one_complete_output(tmp_path, model):
    base, adapter = model
    out, gate = tmp_path / "out", tmp_path / "gate"
    reference = lorafast.merge(base, adapter, tmp_path / "reference", progress=False).output
    # Three writers, all mid-merge into the same OUT, then released together to race for the rename.
    writers = [start_blocked_merge(base, adapter, out, gate) for _ in range(3)]
    gate.touch()
    for w in writers:
        stdout, err = w.communicate(timeout=120)
        assert w.returncode == 0 and stdout.startswith("done"), err
    assert digest(out) == digest(reference)
    assert staging_leftovers(tmp_path) == []


# --- outputs never overwrite inputs ------------------------------------------------------------


@pytest.fixture(scope="module")
def qbase(tmp_path_factory, model):
    base, _ = model
    return lorafast.quantize(base, tmp_path_factory.mktemp("q") / "qbase", progress=False).output


@pytest.mark.parametrize(
    "argv",
    [
        ["merge", "{qbase}", "{adapter}", "-o", "{qbase}"],
        ["merge", "{qbase}", "{adapter}", "-o", "{qbase}", "--requantize"],
        ["merge", "{qbase}", "{adapter}", "-o", "{qbase}/inner"],
        ["merge", "{qbase}", "{adapter}", "-o", "{adapter}", "--requantize"],
        ["merge", "{base}", "{adapter}", "-o", "{base}"],
        ["quantize", "{base}", "-o", "{base}"],
        ["dequantize", "{qbase}", "-o", "{qbase}"],
        ["combine", "{adapter}", "{adapter}", "--method", "cat", "-o", "{adapter}"],
        ["extract", "{base}", "{qbase_parent}/tuned", "--rank", "2", "-o", "{base}"],
        ["resize", "{adapter}", "--rank", "4", "-o", "{adapter}"],
    ],
    ids=[
        "merge-4bit",
        "merge-4bit-requantize",
        "merge-4bit-inside",
        "merge-4bit-into-adapter",
        "merge-float",
        "quantize",
        "dequantize",
        "combine",
        "extract",
        "resize",
    ],
)
def test_no_command_writes_into_its_inputs(tmp_path, capsys, model, qbase, argv):
    base, adapter = model
    tuned = qbase.parent / "tuned"
    if not tuned.exists():
        shutil.copytree(base, tuned)
    paths = {"base": base, "adapter": adapter, "qbase": qbase, "qbase_parent": qbase.parent}
    before = {p: digest(p) for p in (base, adapter, qbase)}
    line = cli_error(capsys, *(a.format(**paths) for a in argv), "--overwrite")
    assert "overlaps the input" in line, line
    assert {p: digest(p) for p in (base, adapter, qbase)} == before


def test_train_merge_refuses_to_overwrite_its_model_before_training(tmp_path, capsys, qbase):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    before = digest(qbase)
    run = tmp_path / "run"
    run.mkdir()
    target = run / "merged"
    shutil.copytree(qbase, target)
    line = cli_error(
        capsys,
        "train",
        "--model",
        str(target),
        "--task",
        "causal-lm",
        "--data",
        str(data),
        "--out",
        str(run),
        "--qlora",
        "--merge",
    )
    assert "overlaps the input" in line and "merged" in line, line
    assert digest(target) == before and not (run / "adapter").exists()
    line = cli_error(capsys, "train", "--model", str(target), "--data", str(data), "--out", str(target / "x"))
    assert "inside the model folder" in line


# --- disk space ----------------------------------------------------------------------------------


# Runs a script in a private mount namespace on a tmpfs of SIZE at MOUNT (as root, or as a user in its
# own user namespace): a real full filesystem without touching the machine's.
def run_on_small_tmpfs(mount: Path, size: str, script: str) -> subprocess.CompletedProcess:
    mount.mkdir()
    shell = f'mount -t tmpfs -o size={size} tmpfs {mount} || exit 97; exec {sys.executable} -c "$0"'
    for prefix in (["unshare", "-r", "-m"], ["unshare", "-m"]):
        r = subprocess.run([*prefix, "sh", "-c", shell, script], capture_output=True, text=True, timeout=300)
        if r.returncode != 97 and "unshare:" not in r.stderr:
            return r
    raise AssertionError(f"cannot mount a tmpfs in a private namespace: {r.stderr}")


def test_an_output_that_does_not_fit_fails_before_writing(tmp_path, model):
    base, adapter = model
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    script = f"""
import os, sys
from lorafast.cli import main
code = main(["merge", {str(base)!r}, {str(adapter)!r}, "-o", {str(tmp_path / "small" / "out")!r}, "-q"])
print("exit", code, "left", sorted(os.listdir({str(tmp_path / "small")!r})))
"""
    r = run_on_small_tmpfs(tmp_path / "small", f"{size // 2}", script)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "free" in err[0] and "out" in err[0], r.stderr
    assert "exit 1 left []" in r.stdout, r.stdout


def test_space_that_vanishes_mid_run_is_a_clean_error(tmp_path, model):
    base, adapter = model
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    small = tmp_path / "small"
    # After the first tensor, another writer takes all the free space.
    script = f"""
import os, lorafast
from lorafast.errors import LorafastIOError
seen = []
def fill(name, nbytes):
    if name and not seen:
        seen.append(1)
        with open({str(small / "filler")!r}, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"x" * (1 << 20))
            except OSError:
                pass
try:
    lorafast._core.merge({str(base)!r}, [{str(adapter)!r}], {str(small / "out")!r}, threads=1, progress=fill)
    print("no error")
except LorafastIOError as e:
    print("error:", e)
print("left", sorted(os.listdir({str(small)!r})))
"""
    r = run_on_small_tmpfs(small, f"{size * 2}", script)
    assert "error:" in r.stdout and "No space left" in r.stdout, r.stdout + r.stderr
    assert "left ['filler']" in r.stdout, r.stdout


# --- optional dependencies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hidden,argv,package",
    [
        (
            "matplotlib",
            ["experiment", "ranks", "--ranks", "2", "--out", "o", "--data", "d"],
            "matplotlib",
        ),
        ("peft", ["train", "--model", "m", "--data", "d.jsonl", "--out", "o"], "peft"),
        ("bitsandbytes", ["train", "--model", "m", "--data", "d.jsonl", "--out", "o", "--qlora"], "bitsandbytes"),
        ("torch", ["verify", "b", "a", "m"], "torch"),
        ("transformers", ["predict", "--model", "m", "--adapter", "x=a", "--data", "d", "--out", "p"], "transformers"),
        ("torch", ["quantize", "b", "-o", "q", "--plan", "transformers"], "torch"),
    ],
    ids=["experiment-matplotlib", "train-peft", "qlora-bitsandbytes", "verify-torch", "predict", "quantize-plan"],
)
def test_a_missing_optional_package_is_one_line_before_any_work(tmp_path, hidden, argv, package):
    # The package is made unimportable for the child (None in sys.modules), as if not installed.
    code = f"import sys; sys.modules[{hidden!r}] = None\nfrom lorafast.cli import main\nsys.exit(main({argv!r}))\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(err) == 1, r.stderr
    assert err[0].startswith("lorafast: error:") and f"needs {package}" in err[0], err[0]
    assert "pip install 'lorafast[torch]'" in err[0]
    assert list(tmp_path.iterdir()) == []  # nothing was started


def test_an_installed_package_that_fails_to_import_is_one_line_before_any_work(tmp_path):
    # A broken install: matplotlib is found, but importing it raises (as a missing shared library does).
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libfreetype.so.6: cannot open shared object file')\n")
    work = tmp_path / "work"
    work.mkdir()
    argv = ["experiment", "ranks", "--ranks", "2", "--out", "o", "--data", "d"]
    code = f"from lorafast.cli import main\nimport sys\nsys.exit(main({argv!r}))\n"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=work, env=env, timeout=300)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(err) == 1, r.stderr
    assert err[0].startswith("lorafast: error:") and "needs matplotlib" in err[0], err[0]
    assert "fails to import" in err[0] and "libfreetype" in err[0], err[0]
    assert "pip install --force-reinstall matplotlib" in err[0], err[0]
    assert list(work.iterdir()) == []  # nothing was started


def test_missing_dependency_error_is_picklable_and_an_import_error():
    import pickle

    from lorafast.errors import MissingDependencyError

    e = pickle.loads(pickle.dumps(MissingDependencyError("x needs y")))
    assert isinstance(e, ImportError) and isinstance(e, lorafast.LorafastError) and str(e) == "x needs y"


def test_output_parents_are_created(tmp_path, model):
    base, adapter = model
    out = tmp_path / "a" / "b" / "merged"
    assert lorafast.merge(base, adapter, out, progress=False).output == out
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert os.listdir(tmp_path / "a" / "b") == ["merged"]
