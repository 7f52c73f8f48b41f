from __future__ import annotations

import hashlib
from pathlib import Path

from lorafast.reference import compare_checkpoints


def assert_matches_peft(
    ours: Path, theirs: Path, *, min_equal: float = 0.999, max_ulp: int = 1, allow_extra=()
) -> dict:
    """Every tensor PEFT wrote equals ours bit for bit in >= 99.9% of elements, never > 1 ULP away."""
    cmp = compare_checkpoints(ours, theirs)
    assert not cmp["only_b"], f"tensors PEFT wrote that lorafast did not: {cmp['only_b']}"
    extra = [k for k in cmp["only_a"] if not any(k.endswith(a) for a in allow_extra)]
    assert not extra, f"tensors lorafast wrote that PEFT did not: {extra}"
    for name, s in cmp["tensors"].items():
        assert s["shape_equal"] and s["dtype_a"] == s["dtype_b"], (name, s)
        assert s["max_ulp"] is not None and s["max_ulp"] <= max_ulp, (name, s)
        assert s["equal_fraction"] >= min_equal, (name, s)
    return cmp


def changed_tensors(base_state: dict, merged: Path) -> int:
    from lorafast.reference import load_state_dict

    out = load_state_dict(merged)
    return sum(1 for k, v in out.items() if k in base_state and not v.equal(base_state[k]))


def digest(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli_error(capsys, *argv) -> str:
    """Run the CLI; assert it failed with exactly one line on stderr and no traceback."""
    from lorafast.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    assert code != 0
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert lines[0].startswith("lorafast: error:"), lines[0]
    return lines[0]


def no_leftovers(parent: Path, out_name: str = "out"):
    assert not (parent / out_name).exists(), "a failed merge must not leave OUT"
    assert not [p for p in parent.iterdir() if "lorafast-tmp" in p.name], "temporary folder left behind"
