"""Sequence packing: the bin planner against brute force, and the GRPO loss on packed microbatches against the
fp64 loop reference of tests/test_grpo_loss.py (same loss and gradient as the rows it packs)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from r1mega.batch import TokenBatch
from r1mega.grpo.loss import LossSettings, grpo_loss
from r1mega.packing import balanced_partition, first_fit_decreasing, pack_batch, plan_bins, row_lengths, unpack
from tests.test_grpo_loss import _inputs, reference_loss


def test_row_lengths_end_at_the_last_response_token():
    mask = torch.zeros(3, 7)
    mask[0, 2:5] = 1  # targets 2..4 -> tokens 0..5 needed
    mask[2, 6] = 1
    assert row_lengths(mask) == [6, 0, 8]


@pytest.mark.parametrize("seed", range(5))
def test_first_fit_decreasing_respects_the_budget_and_keeps_every_row(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = (torch.rand(30, generator=g) ** 3 * 60).long().tolist()  # long-tailed, some 0
    bins = first_fit_decreasing(lengths, 40)
    flat = sorted(i for b in bins for i in b)
    assert flat == [i for i, n in enumerate(lengths) if n > 0]
    for b in bins:
        assert sum(lengths[i] for i in b) <= 40 or len(b) == 1  # only an over-long row may exceed it alone
    lower = math.ceil(sum(min(n, 40) for n in lengths) / 40)
    assert len(bins) <= 11 / 9 * lower + 1  # FFD's bound against the optimum (>= the volume bound)


def test_balanced_partition_is_optimal_on_small_cases():
    """LPT against the brute-force best 2- and 3-way split: within its 4/3 bound, and exact on easy ones."""
    g = torch.Generator().manual_seed(0)
    for k in (2, 3):
        for _ in range(20):
            lengths = torch.randint(1, 50, (7,), generator=g).tolist()
            parts = balanced_partition(lengths, k)
            assert sorted(i for p in parts for i in p) == list(range(7))
            got = max(sum(lengths[i] for i in p) for p in parts)
            best = min(
                max(sum(n for n, a in zip(lengths, assign) if a == j) for j in range(k))
                for assign in itertools.product(range(k), repeat=7)
            )
            assert best <= got <= 4 / 3 * best
    assert balanced_partition([5, 5, 4, 3, 3], 2) in ([[0, 2], [1, 3, 4]], [[0, 3, 4], [1, 2]])


def test_plan_bins_reaches_the_agreed_count():
    lengths = [10, 9, 3, 3, 2, 0]
    bins = plan_bins(lengths, 100, num_bins=4)
    assert len(bins) == 4 and sorted(i for b in bins for i in b) == [0, 1, 2, 3, 4]
    assert plan_bins([7], 100, num_bins=3)[1:] == [[], []]  # nothing left to split: padding-only bins


def _token_batch(logp, old, ref, adv, mask):
    """The fp64 inputs (already in target space) as a TokenBatch with random tokens, each row's padding after
    its last response token made distinct so a packing bug that reads it would show."""
    b, s = mask.shape
    tokens = torch.randint(3, 50, (b, s + 1), generator=torch.Generator().manual_seed(1))
    return TokenBatch(tokens=tokens, mask=mask, old_logp=old, ref_logp=ref, advantages=adv)


def _packed_logp(logp: torch.Tensor, layout, total: int) -> torch.Tensor:
    """The (differentiable) per-token log-probs laid out as the packed microbatch: what the model would give."""
    b, s = logp.shape
    idx = torch.full((total - 1,), b * s, dtype=torch.long)
    for r, n, o in zip(layout.rows, layout.lengths, layout.offsets):
        idx[o : o + n - 1] = r * s + torch.arange(n - 1)
    return torch.cat([logp.reshape(-1), logp.new_zeros(1)])[idx].unsqueeze(0)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("budget", [26, 60])
def test_packed_loss_and_grad_match_fp64_reference(agg, ratio_level, budget):
    logp, old, ref, adv, mask = _inputs(11)
    if ratio_level == "sequence":
        old = logp + 0.02 * torch.randn_like(logp)
    eps = (0.2, 0.28) if ratio_level == "token" else (3e-4, 4e-4)
    settings = LossSettings(eps[0], eps[1], 0.04, agg, ratio_level, max_len=9)
    batch = _token_batch(logp, old, ref, adv, mask)
    packed = pack_batch(batch, budget, multiple=4)
    assert len(packed) > 1 and any(len(lay.rows) > 1 for _, lay in packed)

    lp = logp.clone().requires_grad_(True)
    loss_sum, denom = 0.0, 0.0
    for mb, lay in packed:
        assert mb["tokens"].shape[1] % 4 == 0
        part, d, _ = grpo_loss(
            _packed_logp(lp, lay, mb["tokens"].shape[1]), mb["old_logp"], mb["ref_logp"], mb["advantages"],
            mb["mask"], settings, seq_ids=mb["seq_ids"],
        )  # fmt: skip
        loss_sum, denom = loss_sum + part, denom + d
    ours = loss_sum / denom
    ours.backward()

    lp_ref = logp.clone().requires_grad_(True)
    expect = reference_loss(
        lp_ref, old, ref, adv, mask, eps[0], eps[1], 0.04, agg, max_len=9, seq_ratio=ratio_level == "sequence"
    )
    expect.backward()
    assert math.isclose(ours.item(), expect.item(), rel_tol=1e-12, abs_tol=1e-12)
    torch.testing.assert_close(lp.grad, lp_ref.grad, rtol=1e-10, atol=1e-12)


def test_pack_then_unpack_restores_rows_and_positions_restart():
    logp, old, ref, adv, mask = _inputs(5)
    batch = _token_batch(logp, old, ref, adv, mask)
    packed = pack_batch(batch, 20, multiple=3, equal_shapes=True)
    totals = {mb["tokens"].shape[1] for mb, _ in packed}
    assert len(totals) == 1 and totals.pop() % 3 == 0  # one shape for the pipeline schedule
    lengths = row_lengths(mask)
    for mb, lay in packed:
        for r, n, o in zip(lay.rows, lay.lengths, lay.offsets):
            assert torch.equal(mb["tokens"][0, o : o + n], batch.tokens[r, :n])
            assert torch.equal(mb["position_ids"][0, o : o + n], torch.arange(n))
        assert lay.cu_seqlens[-1] == mb["tokens"].shape[1]
    outs = [{"x": mb["old_logp"]} for mb, _ in packed]
    back = unpack(outs, [lay for _, lay in packed], batch.size, mask.shape[1])["x"]
    keep = torch.zeros_like(mask)
    for i, n in enumerate(lengths):
        keep[i, : max(n - 1, 0)] = 1
    torch.testing.assert_close(back, old * keep)
    assert torch.all(mask * (1 - keep) == 0)  # every loss token survived the cut


def test_fp8_token_counts_are_multiples_of_16_times_tp():
    """TE's FP8 GEMMs need each rank's token count divisible by 16 (run 1 of docs/perf/train_step.md)."""
    from types import SimpleNamespace

    from r1mega.config import Config
    from r1mega.engine import MegatronEngine

    def multiple(tp: int, sp: bool, fp8):
        cfg = Config()
        cfg.parallel.tp, cfg.train.fp8 = tp, fp8
        fake = SimpleNamespace(cfg=cfg, model=SimpleNamespace(config=SimpleNamespace(sequence_parallel=sp)))
        return MegatronEngine.seq_multiple.fget(fake)

    assert [multiple(1, False, None), multiple(2, True, None), multiple(2, False, None)] == [1, 2, 1]
    assert [multiple(1, False, "blockwise"), multiple(4, True, "tensorwise")] == [16, 64]
    packed = pack_batch(_token_batch(*_inputs(5)), 20, multiple=16)
    assert all(mb["tokens"].shape[1] % 16 == 0 for mb, _ in packed)
