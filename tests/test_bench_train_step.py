"""tools/bench_train_step.py's CPU mode (--dry-run) runs both layouts on one ragged batch and the log-prob pass,
so the one-command GPU run next session is known to work up to the device."""

from __future__ import annotations

import re
from pathlib import Path

from tests.launch import run_ranks

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "bench_train_step.py"


def test_dry_run_reports_both_layouts_on_the_same_tokens():
    out = run_ranks(SCRIPT, ["--dry-run"], 1).stdout
    line = r"^qwen3\s+fp32\s+(\w+) rows=(\d+) real_tokens=(\d+) padded_tokens=(\d+)"
    rows = {m[0]: m[1:] for m in re.findall(line, out, re.M)}
    assert set(rows) == {"padded", "packed", "packed_fused"}, out
    assert rows["padded"] == rows["packed"] == rows["packed_fused"]  # the same ragged batch in one process
    assert int(rows["padded"][2]) > int(rows["padded"][1])  # padding exists: what packing saves
    assert re.search(r"tokens/s=[\d,]+ TFLOP/s=[\d.]+ MFU\(989 spec\)=[\d.]+\s+MFU\(790 measured\)", out)
    assert re.search(r"^logprob T=256 V=512 H=64 eager\s+[\d.]+ ms", out, re.M)
    for path in ("eager", "fused_train"):  # the training pass's LM head + loss, forward and backward
        assert re.search(rf"^loss\+backward T=256 V=512 H=64 {path}\s+[\d.]+ ms", out, re.M), out
    m = re.search(r"fused_train .* max\|dgrad\| h/w=(\S+)/(\S+)$", out, re.M)
    assert m and float(m[1]) < 1e-4 and float(m[2]) < 1e-4, out  # fp32 on the CPU: the eager path's gradients
