"""TP=2, EP=2, PP=2, DP=2 (2 CPU ranks) and TP=2 x EP=2 (4 ranks) give the same log-probs, GRPO loss and
update as 1 rank.

Each layout runs tests/parallel_worker.py in fresh processes (megatron's parallel state is global),
loads the same weights from a megatron dist checkpoint saved by the 1-rank run, and computes on the
same global batch. Compared: per-token log-probs and entropy before the step, the loss, the gradient
norm, and the log-probs after one optimizer step (which checks every gradient reduction: a missing
or doubled all-reduce changes the update).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.launch import run_ranks

WORKER = Path(__file__).with_name("parallel_worker.py")
TOL = 1e-5


@pytest.fixture(scope="module", params=["gqa", "mla"])
def reference(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    extra = ["--mla"] if request.param == "mla" else []
    args = ["--layout", "ws1", "--ckpt", str(tmp / "ckpt"), "--out", str(tmp / "ws1.json"), "--save", *extra]
    run_ranks(WORKER, args, 1)
    return tmp, extra, json.loads((tmp / "ws1.json").read_text())


@pytest.mark.parametrize(
    "layout,nproc,impl",
    [("tp2", 2, "auto"), ("ep2", 2, "auto"), ("pp2", 2, "auto"), ("dp2", 2, "auto"), ("tp2ep2", 4, "auto"),
     ("ws1", 1, "triton"), ("tp2", 2, "triton"), ("tp2", 2, "triton-fused"),
     ("ws1", 1, "fused-train"), ("tp2", 2, "fused-train"), ("pp2", 2, "fused-train")],
)  # fmt: skip
def test_layout_matches_single_rank(reference, layout, nproc, impl):
    """impl=triton: the trainer's GPU loss path (r1mega_kernels through Triton's CPU interpreter; under TP=2 its
    vocab-parallel kernels) against the plain-PyTorch reference run. impl=fused-train: the training pass without
    logits (train.fused_lm_head_train: chunked linear + log-prob with its own backward, vocab-parallel under TP,
    its hidden-state gradient summed by the sequence-parallel region), same loss, gradient norm and update."""
    tmp, extra, ref = reference
    if extra and (layout != "tp2" or impl != "auto"):
        pytest.skip("MLA is checked under TP=2 (the layout that shards its projections); EP/PP are attention-agnostic")
    out = tmp / f"{layout}_{impl}.json"
    args = ["--layout", layout, "--ckpt", str(tmp / "ckpt"), "--out", str(out), "--loss-impl", impl, *extra]
    run_ranks(WORKER, args, nproc, env={"TRITON_INTERPRET": "1"} if impl.startswith("triton") else None)
    got = json.loads(out.read_text())
    mask = torch.tensor(ref["mask"])

    def max_diff(key: str) -> float:
        return float(((torch.tensor(ref[key]) - torch.tensor(got[key])).abs() * mask).max())

    assert mask.sum() > 20
    assert max_diff("logp") < TOL
    assert max_diff("entropy") < TOL
    assert abs(ref["loss"] - got["loss"]) < TOL
    assert abs(ref["grad_norm"] - got["grad_norm"]) < TOL * max(1.0, ref["grad_norm"])
    assert ref["clip_frac"] == pytest.approx(got["clip_frac"], abs=1e-9) and ref["clip_frac"] > 0
    assert ref["kl"] == pytest.approx(got["kl"], abs=TOL) and ref["kl"] > 0
    moved = float(((torch.tensor(ref["logp_after_step"]) - torch.tensor(ref["logp"])).abs() * mask).max())
    assert moved > 1e-3, "the optimizer step must change the log-probs for the next check to mean anything"
    assert max_diff("logp_after_step") < TOL


@pytest.fixture(scope="module")
def padded_reference(tmp_path_factory):
    """The padded 1-rank run with the router's expert-bias update off: padded rows route their padding tokens,
    which a packed batch never has, so that update (and only it) would legitimately differ."""
    tmp = tmp_path_factory.mktemp("packed")
    args = ["--layout", "ws1", "--ckpt", str(tmp / "ckpt"), "--out", str(tmp / "ws1.json"), "--save"]
    run_ranks(WORKER, args, 1, env={"FROZEN_EXPERT_BIAS": "1"})
    return tmp, json.loads((tmp / "ws1.json").read_text())


@pytest.mark.parametrize("layout,nproc", [("ws1", 1), ("pp2", 2), ("ep2", 2), ("tp2", 2)])
def test_packed_matches_padded(padded_reference, layout, nproc):
    """Sequence packing (THD, 40-token microbatches of 1-3 answers) gives the padded batch's log-probs, loss,
    gradient norm and update. pp2: every microbatch padded to one shape; ep2: both DP ranks agree on the
    microbatch count (the experts' all-to-alls); tp2: sequence parallelism splits the packed tokens (each
    microbatch padded to a multiple of TP)."""
    tmp, ref = padded_reference
    out = tmp / f"{layout}_packed.json"
    args = ["--layout", layout, "--ckpt", str(tmp / "ckpt"), "--out", str(out)]
    run_ranks(WORKER, args, nproc, env={"FROZEN_EXPERT_BIAS": "1", "PACK_TOKENS": "40"})
    got = json.loads(out.read_text())
    mask = torch.tensor(ref["mask"])
    for key in ("logp", "entropy", "logp_after_step"):
        assert float(((torch.tensor(ref[key]) - torch.tensor(got[key])).abs() * mask).max()) < TOL, key
    assert abs(ref["loss"] - got["loss"]) < TOL
    assert abs(ref["grad_norm"] - got["grad_norm"]) < TOL * max(1.0, ref["grad_norm"])
    assert ref["clip_frac"] == pytest.approx(got["clip_frac"], abs=1e-9) and ref["kl"] == pytest.approx(got["kl"])
    moved = float(((torch.tensor(ref["logp_after_step"]) - torch.tensor(ref["logp"])).abs() * mask).max())
    assert moved > 1e-3
