"""Sequence packing: microbatches formed by a token budget, in megatron's THD layout (``PackedSeqParams``).

With ``train.max_tokens_per_microbatch`` set, the engine does not pad every row to the longest one: each
microbatch is one flat row [1, T] holding several whole sequences back to back, attention is block-diagonal
causal per sequence (``cu_seqlens``) and RoPE positions restart at every sequence. Exactness:

- a row is cut after its last response token (its target-space mask's last 1): causal attention means the
  later padding never influenced a loss token, so nothing the loss sees changes; rows without a loss token
  are left out of the pass entirely (their outputs are zeros);
- per-target-token tensors (mask, advantages, old / reference log-probs) are laid out in the flat row's
  target space ([1, T-1], position j predicts token j+1), so an objective's ``tokens[:, 1:]`` /
  ``logits[:, :-1]`` shift is unchanged; the one position per sequence whose target would be the next
  sequence's first token has mask 0;
- ``seq_ids`` [1, T-1] names each target token's sequence, so per-sequence aggregations (seq-mean-token-mean,
  GSPO's sequence ratio; :mod:`r1mega.grpo.loss`) stay per sequence, not per packed row.

Planning: first-fit-decreasing bin packing by length (a sequence longer than the budget gets a bin of its own),
then every data-parallel rank agrees on one microbatch count (megatron's EP all-to-alls and the pipeline
schedule run once per microbatch on every rank), splitting its heaviest bins to reach it. Pipeline parallelism
needs equal microbatch shapes: every microbatch is then padded to one token count; sequence parallelism needs
a multiple of TP. Padding is a trailing pseudo-sequence of its own in ``cu_seqlens`` (mask 0), so no real token
attends to it. Cross-rank *row* exchange (moving sequences between DP ranks to even out their token totals) is
:func:`balanced_partition`'s job where the rows are assigned; the engine packs the rows it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1mega.batch import TokenBatch

Microbatch = dict[str, torch.Tensor]


def row_lengths(mask: torch.Tensor) -> list[int]:
    """Tokens each row needs: up to and including its last response token (0 for a row without one).

    ``mask`` [B, S-1] is in target space (index t predicts token t+1), so the last 1 at t needs t + 2 tokens.
    """
    s1 = mask.shape[1]
    idx = torch.arange(1, s1 + 1, device=mask.device).expand_as(mask)
    last = (idx * (mask != 0)).max(dim=1).values  # t + 1 of the last 1, 0 when none
    return [int(v) + 1 if v > 0 else 0 for v in last.tolist()]


def first_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices in bins of at most ``budget`` tokens (longest first; an over-long row gets its own bin).

    Rows of length 0 are left out. Each bin lists its rows longest first; bins are in creation order.
    """
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(budget - n)
    return bins


def balanced_partition(lengths: list[int], k: int) -> list[list[int]]:
    """Indices split into ``k`` parts of near-equal total length (greedy LPT: longest to the lightest part).

    Used to spread rows over data-parallel ranks and to split a bin in two. Deterministic (ties by index).
    """
    parts: list[list[int]] = [[] for _ in range(k)]
    loads = [0] * k
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        p = min(range(k), key=lambda j: (loads[j], j))
        parts[p].append(i)
        loads[p] += lengths[i]
    return parts


def plan_bins(lengths: list[int], budget: int, num_bins: int | None = None) -> list[list[int]]:
    """First-fit-decreasing bins, split (heaviest bin with >= 2 rows first) or topped up with empty bins until
    there are ``num_bins`` (the count all data-parallel ranks agreed on). An empty bin is a padding-only
    microbatch."""
    bins = first_fit_decreasing(lengths, budget)
    num_bins = num_bins or max(len(bins), 1)
    while len(bins) < num_bins:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            bins.append([])
            continue
        heavy = max(splittable, key=lambda b: sum(lengths[i] for i in b))
        halves = balanced_partition([lengths[i] for i in heavy], 2)
        bins.remove(heavy)
        bins += [[heavy[j] for j in h] for h in halves]
    return bins


@dataclass
class PackedLayout:
    """Where a packed microbatch's sequences came from: ``rows[j]`` of the batch, ``lengths[j]`` tokens at
    ``offsets[j]`` of the flat row; ``cu_seqlens`` includes the trailing padding pseudo-sequence, if any."""

    rows: list[int]
    lengths: list[int]
    offsets: list[int]
    cu_seqlens: list[int]
    total: int

    def params(self, device: torch.device):
        """megatron's PackedSeqParams (THD) for this microbatch."""
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = torch.tensor(self.cu_seqlens, dtype=torch.int32, device=device)
        longest = max(b - a for a, b in zip(self.cu_seqlens[:-1], self.cu_seqlens[1:]))
        return PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
        )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_bin(batch: TokenBatch, rows: list[int], lengths: list[int], total: int) -> tuple[Microbatch, PackedLayout]:
    """One flat [1, total] microbatch of ``rows`` (each cut to its length), padded at the end to ``total``."""
    fields = batch.fields()
    tokens = batch.tokens.new_zeros(1, total)
    position_ids = torch.zeros(1, total, dtype=torch.long)
    seq_ids = torch.zeros(1, total - 1, dtype=torch.long)
    per_target = {k: v.new_zeros(1, total - 1) for k, v in fields.items() if k != "tokens"}
    offsets, cu, o = [], [0], 0
    for j, r in enumerate(rows):
        n = lengths[r]
        tokens[0, o : o + n] = batch.tokens[r, :n]
        position_ids[0, o : o + n] = torch.arange(n)
        seq_ids[0, o : o + n] = j  # the boundary position (o + n - 1) has mask 0: which id it gets is moot
        for k, t in per_target.items():
            t[0, o : o + n - 1] = fields[k][r, : n - 1]
        offsets.append(o)
        o += n
        cu.append(o)
    if o < total:  # the padding pseudo-sequence
        position_ids[0, o:] = torch.arange(total - o)
        seq_ids[0, o:] = len(rows)
        cu.append(total)
    assert o <= total, f"packed microbatch of {o} tokens overflows its token count {total}"
    mb = {"tokens": tokens, "position_ids": position_ids, "seq_ids": seq_ids, **per_target}
    return mb, PackedLayout(list(rows), [lengths[r] for r in rows], offsets, cu, total)


def pack_batch(
    batch: TokenBatch, budget: int, multiple: int = 1, equal_shapes: bool = False, num_bins: int | None = None
) -> list[tuple[Microbatch, PackedLayout]]:
    """The batch as packed microbatches of about ``budget`` tokens each (see the module docstring).

    ``multiple``: every microbatch's token count is rounded up to it (sequence parallelism: TP).
    ``equal_shapes``: all microbatches get the largest one's token count (pipeline parallelism).
    """
    lengths = row_lengths(batch.mask)
    bins = plan_bins(lengths, budget, num_bins)
    need = [_round_up(max(sum(lengths[i] for i in b), 2), multiple) for b in bins]
    if equal_shapes:
        need = [max(need)] * len(need)
    return [pack_bin(batch, b, lengths, t) for b, t in zip(bins, need)]


def unpack(
    outs: list[dict[str, torch.Tensor]], layouts: list[PackedLayout], batch_size: int, width: int
) -> dict[str, torch.Tensor]:
    """Per-target-token outputs of packed microbatches ([1, T-1] each) -> [batch_size, width] in row order;
    positions a row did not run (after its last response token, rows without one) are 0."""
    result = {}
    for k in outs[0]:
        ref = outs[0][k]
        full = ref.new_zeros(batch_size, width)
        for out, lay in zip(outs, layouts):
            flat = out[k].reshape(-1)
            for r, n, o in zip(lay.rows, lay.lengths, lay.offsets):
                full[r, : n - 1] = flat[o : o + n - 1]
        result[k] = full
    return result
