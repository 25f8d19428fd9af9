"""Triton kernels for per-token log-probs, entropy and the GRPO loss over [tokens, vocab] logits.

All kernels work in base 2: with ``scale2 = log2(e) / tau`` each logit becomes ``u = z * scale2`` and the softmax
is ``2^(u - lse2)``, so every element costs exactly one ``ex2`` (Triton's ``exp`` is ``ex2`` after a multiply
anyway). Per row the online statistics are

- ``m``  : running max of ``u``,
- ``d``  : sum of ``2^(u - m)``,
- ``sd`` : sum of ``2^(u - m) * (u - m)`` (kept relative to the running max, so that entropy = log d - sd / d
  suffers no cancellation when the logits are large),

from which ``lse2 = m + log2(d)``, ``logp = ln2 * (u_target - lse2)`` and ``entropy = ln2 * (log2(d) - sd / d)``.

Rows are addressed through two strides (``[B, L, V]`` views, e.g. logits with the last position sliced off, need
no copy); the vocab dimension must be contiguous. Row offsets are computed in int64 (T * V exceeds 2^31).

Written against the Triton subset shared by 3.6 (the GPU image) and 3.9 (the CPU interpreter in CI).
"""

from __future__ import annotations

import triton
import triton.language as tl

LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# Finite stand-in for -inf: keeps 0 * (u - m) from turning into NaN on masked lanes (logits must be > -1e30).
NEG_BIG: tl.constexpr = tl.constexpr(-1.0e30)


@triton.jit
def _online_update(u, m, d, sd):
    """Fold one block of base-2 scaled logits ``u`` into the running (max, sum-exp, sum exp*(u-max))."""
    m_new = tl.maximum(m, tl.max(u, 0))
    delta = m - m_new
    alpha = tl.exp2(delta)
    t = u - m_new
    p = tl.exp2(t)
    sd = alpha * (sd + d * delta) + tl.sum(p * t, 0)
    d = d * alpha + tl.sum(p, 0)
    return m_new, d, sd


@triton.jit
def _row_offset(row, L_inner, stride_b, stride_l):
    """int64 element offset of flattened row ``row`` of a [B, L_inner, V] view with strides (stride_b, stride_l)."""
    r = tl.cast(row, tl.int64)
    b = r // L_inner
    return b * stride_b + (r - b * L_inner) * stride_l


@triton.jit
def _row_stats(x_row, V, scale2, BLOCK_V: tl.constexpr, EVICT: tl.constexpr):
    """One sweep over a row: returns (m, d, sd) in base-2 units. Full blocks unmasked, one masked tail."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), NEG_BIG, tl.float32)
    d = tl.zeros((), tl.float32)
    sd = tl.zeros((), tl.float32)
    n_full = V // BLOCK_V
    for i in range(0, n_full):
        u = tl.load(x_row + i * BLOCK_V + offs, eviction_policy=EVICT).to(tl.float32) * scale2
        m, d, sd = _online_update(u, m, d, sd)
    tail = n_full * BLOCK_V
    if tail < V:
        cols = tail + offs
        mask = cols < V
        z = tl.load(x_row + cols, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
        u = tl.where(mask, z * scale2, NEG_BIG)
        m, d, sd = _online_update(u, m, d, sd)
    return m, d, sd


@triton.jit
def _uniform_mask(w, R: tl.constexpr, C: tl.constexpr):
    """[R, C] mask equal to (w != 0) everywhere: uniform, so 16-byte vector loads survive (built from the float w,
    not a broadcast bool, which the 3.9 interpreter mistypes)."""
    return (tl.zeros((R, C), tl.float32) + w) != 0.0


@triton.jit
def _vec_update(u, m, d, sd):
    """Fold a [R, SUB] tile into per-tile-row running stats (m, d, sd: [R]); reductions stay inside a warp."""
    m_new = tl.maximum(m, tl.max(u, 1))
    delta = m - m_new
    alpha = tl.exp2(delta)
    t = u - m_new[:, None]
    p = tl.exp2(t)
    sd = alpha * (sd + d * delta) + tl.sum(p * t, 1)
    d = d * alpha + tl.sum(p, 1)
    return m_new, d, sd


@triton.jit
def _vec_update_masked(u, mask, m, d, sd):
    """``_vec_update`` for the tail tile: padding lanes (u = NEG_BIG) must add nothing, even in all-padding rows."""
    m_new = tl.maximum(m, tl.max(u, 1))
    delta = m - m_new
    alpha = tl.exp2(delta)
    t = u - m_new[:, None]
    p = tl.where(mask, tl.exp2(t), 0.0)
    sd = alpha * (sd + d * delta) + tl.sum(p * t, 1)
    d = d * alpha + tl.sum(p, 1)
    return m_new, d, sd


@triton.jit
def _vec_merge(m, d, sd):
    """Merge per-tile-row stats into the row's (m, d, sd) (one cross-warp reduction per row)."""
    big_m = tl.max(m, 0)
    a = tl.exp2(m - big_m)
    return big_m, tl.sum(a * d, 0), tl.sum(a * (sd + d * (m - big_m)), 0)


@triton.jit
def _row_stats_vec(x_row, V, scale2, active_w, BLOCK_V: tl.constexpr, SUB: tl.constexpr, EVICT: tl.constexpr):
    """Same result as ``_row_stats``, but the block is a [BLOCK_V // SUB, SUB] tile and the running statistics are
    kept per tile row (in the registers of the thread(s) owning it): the loop has no cross-warp reduction (no shared
    memory, no barrier), which is what limits a wide (one program per SM) sweep. Costs one extra exp per SUB
    elements (the per-row rescale); the rows are merged once at the end. ``active_w`` == 0: nothing is read."""
    offs = tl.arange(0, BLOCK_V // SUB)[:, None] * SUB + tl.arange(0, SUB)[None, :]
    m = tl.full((BLOCK_V // SUB,), NEG_BIG, tl.float32)
    d = tl.zeros((BLOCK_V // SUB,), tl.float32)
    sd = tl.zeros((BLOCK_V // SUB,), tl.float32)
    full_mask = _uniform_mask(active_w, BLOCK_V // SUB, SUB)
    n_full = V // BLOCK_V
    for i in range(0, n_full):
        u = tl.load(x_row + i * BLOCK_V + offs, mask=full_mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
        m, d, sd = _vec_update(u * scale2, m, d, sd)
    tail = n_full * BLOCK_V
    if tail < V:
        cols = tail + offs
        mask = cols < V
        z = tl.load(x_row + cols, mask=mask & full_mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
        m, d, sd = _vec_update_masked(tl.where(mask, z * scale2, NEG_BIG), mask, m, d, sd)
    return _vec_merge(m, d, sd)


@triton.jit
def _grpo_finish(
    row, x_row, m, d, sd, store_mask,
    TGT, OLD, REF, ADV, W, LOSS, OUT_LOGP, OUT_ENT, OUT_CLIP, OUT_KL,
    V, vocab_start, scale2, inv_tau, eps_low, eps_high, beta,
    HAS_REF: tl.constexpr,
):  # fmt: skip
    """Per-token loss and stats of one row from its softmax stats; stores them (if store_mask) and returns
    (lse2, coef, local target column) for its gradient sweep. Rows with w == 0 get zeros and coef = 0, selected
    with tl.where so that garbage in their per-token inputs (inf, NaN) cannot leak."""
    w = tl.load(W + row).to(tl.float32)
    keep = w != 0.0
    local = tl.load(TGT + row).to(tl.int64) - vocab_start
    owned = (local >= 0) & (local < V) & keep
    ut = tl.load(x_row + local, mask=owned, other=0.0).to(tl.float32) * scale2
    lse2, coef = _grpo_token(
        row, ut, m, d, sd, w, store_mask, OLD, REF, ADV, LOSS, OUT_LOGP, OUT_ENT, OUT_CLIP, OUT_KL,
        inv_tau, eps_low, eps_high, beta, HAS_REF,
    )  # fmt: skip
    return lse2, coef, local


@triton.jit
def _grpo_terms(row, logp, OLD, REF, ADV, eps_low, eps_high, beta, HAS_REF: tl.constexpr):
    """The per-token GRPO objective at log-prob ``logp``: (loss term pg, d pg / d logp, k3 KL, clipped flag)."""
    old = tl.load(OLD + row).to(tl.float32)
    adv = tl.load(ADV + row).to(tl.float32)
    ratio = tl.exp(logp - old)
    clipped = ((adv > 0.0) & (ratio > 1.0 + eps_high)) | ((adv < 0.0) & (ratio < 1.0 - eps_low))
    c = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    pg = -tl.minimum(ratio * adv, c * adv)
    g = tl.where(clipped, 0.0, -adv * ratio)
    kl = 0.0
    if HAS_REF:
        diff = tl.load(REF + row).to(tl.float32) - logp
        e = tl.exp(diff)
        kl = e - diff - 1.0
        pg = pg + beta * kl
        g = g + beta * (1.0 - e)
    return pg, g, kl, clipped


@triton.jit
def _grpo_token(
    row, ut, m, d, sd, w, store_mask, OLD, REF, ADV, LOSS, OUT_LOGP, OUT_ENT, OUT_CLIP, OUT_KL,
    inv_tau, eps_low, eps_high, beta, HAS_REF: tl.constexpr,
):  # fmt: skip
    """Per-token GRPO terms of one row from its softmax stats (base 2: m, d, sd) and target logit ut (base 2);
    stores them (if store_mask) and returns (lse2, coef) of its gradient; zeros where w == 0."""
    keep = w != 0.0
    log2d = tl.log2(d)
    lse2 = m + log2d
    logp = (ut - lse2) * LN2
    ent = (log2d - sd / d) * LN2
    pg, g, kl, clipped = _grpo_terms(row, logp, OLD, REF, ADV, eps_low, eps_high, beta, HAS_REF)
    tl.store(LOSS + row, tl.where(keep, w * pg, 0.0), mask=store_mask)
    tl.store(OUT_LOGP + row, tl.where(keep, logp, 0.0), mask=store_mask)
    tl.store(OUT_ENT + row, tl.where(keep, ent, 0.0), mask=store_mask)
    tl.store(OUT_KL + row, tl.where(keep, kl, 0.0), mask=store_mask)
    tl.store(OUT_CLIP + row, (clipped & keep).to(tl.int8), mask=store_mask)
    return tl.where(keep, lse2, 0.0), tl.where(keep, w * g * inv_tau, 0.0)


@triton.jit
def _grpo_interleaved_kernel(
    X, stride_xb, stride_xl, DX, stride_db, stride_dl, L_inner,
    TGT, OLD, REF, ADV, W,
    LOSS, OUT_LOGP, OUT_ENT, OUT_CLIP, OUT_KL,
    T, V, vocab_start, scale2, inv_tau, eps_low, eps_high, beta,
    HAS_REF: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, SUB: tl.constexpr,
):  # fmt: skip
    """Single-rank GRPO loss + gradient, software-pipelined ACROSS rows: each program owns rows pid, pid + nprog,
    ...; one loop iteration writes the gradient block of row r (re-read newest-first, so from L2) AND reads the
    matching statistics block of row r + nprog (from DRAM). The stream never drains between the two sweeps of a
    row, and the L2 working set stays ~one row per program. Rows with w == 0 are never read."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK_V // SUB)[:, None] * SUB + tl.arange(0, SUB)[None, :]
    n_full = V // BLOCK_V
    tail = n_full * BLOCK_V
    # prologue: statistics of this program's first row
    x0 = X + _row_offset(pid, L_inner, stride_xb, stride_xl)
    m, d, sd = _row_stats_vec(x0, V, scale2, tl.load(W + pid).to(tl.float32), BLOCK_V, SUB, "evict_last")
    lse2, coef, local = _grpo_finish(
        pid, x0, m, d, sd, pid < T, TGT, OLD, REF, ADV, W, LOSS, OUT_LOGP, OUT_ENT, OUT_CLIP, OUT_KL,
        V, vocab_start, scale2, inv_tau, eps_low, eps_high, beta, HAS_REF,
    )  # fmt: skip
    for row in range(pid, T, nprog):
        nxt = row + nprog
        has_next = nxt < T
        nxt_c = tl.minimum(nxt, T - 1)
        x_cur = X + _row_offset(row, L_inner, stride_xb, stride_xl)
        dx_cur = DX + _row_offset(row, L_inner, stride_db, stride_dl)
        x_nxt = X + _row_offset(nxt_c, L_inner, stride_xb, stride_xl)
        cur_mask = _uniform_mask(tl.load(W + row).to(tl.float32), BLOCK_V // SUB, SUB)
        nxt_mask = _uniform_mask(tl.where(has_next, tl.load(W + nxt_c).to(tl.float32), 0.0), BLOCK_V // SUB, SUB)
        m = tl.full((BLOCK_V // SUB,), NEG_BIG, tl.float32)
        d = tl.zeros((BLOCK_V // SUB,), tl.float32)
        sd = tl.zeros((BLOCK_V // SUB,), tl.float32)
        if WRITE_GRAD:
            if tail < V:
                cols = tail + offs
                cmask = cols < V
                z = tl.load(x_cur + cols, mask=cmask & cur_mask, other=0.0, eviction_policy="evict_first")
                p = tl.exp2(z.to(tl.float32) * scale2 - lse2)
                gx = coef * (tl.where(cols == local, 1.0, 0.0) - p)
                tl.store(dx_cur + cols, gx.to(DX.dtype.element_ty), mask=cmask, eviction_policy="evict_first")
        for i in range(0, n_full):
            if WRITE_GRAD:
                cols = (n_full - 1 - i) * BLOCK_V + offs
                z = tl.load(x_cur + cols, mask=cur_mask, other=0.0, eviction_policy="evict_first")
                p = tl.exp2(z.to(tl.float32) * scale2 - lse2)
                gx = coef * (tl.where(cols == local, 1.0, 0.0) - p)
                tl.store(dx_cur + cols, gx.to(DX.dtype.element_ty), eviction_policy="evict_first")
            u = tl.load(x_nxt + i * BLOCK_V + offs, mask=nxt_mask, other=0.0, eviction_policy="evict_last")
            m, d, sd = _vec_update(u.to(tl.float32) * scale2, m, d, sd)
        if tail < V:
            cols = tail + offs
            cmask = cols < V
            z = tl.load(x_nxt + cols, mask=cmask & nxt_mask, other=0.0, eviction_policy="evict_last")
            m, d, sd = _vec_update_masked(tl.where(cmask, z.to(tl.float32) * scale2, NEG_BIG), cmask, m, d, sd)
        m, d, sd = _vec_merge(m, d, sd)
        lse2, coef, local = _grpo_finish(
            nxt_c, x_nxt, m, d, sd, has_next, TGT, OLD, REF, ADV, W, LOSS, OUT_LOGP, OUT_ENT, OUT_CLIP, OUT_KL,
            V, vocab_start, scale2, inv_tau, eps_low, eps_high, beta, HAS_REF,
        )  # fmt: skip


@triton.jit
def _logprob_entropy_kernel(
    X,
    stride_xb,
    stride_xl,
    L_inner,
    TGT,
    OUT_LOGP,
    OUT_ENT,
    OUT_LSE2,
    PART,
    V,
    vocab_start,
    scale2,
    FINALIZE: tl.constexpr,
    WRITE_LSE2: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row. FINALIZE: write logp / entropy; else write the partial stats (m, d, sd, u_target) of
    this vocab shard to PART[row, 0:4] for the cross-rank combine (u_target = 0 where the target is not in it)."""
    row = tl.program_id(0)
    x_row = X + _row_offset(row, L_inner, stride_xb, stride_xl)
    m, d, sd = _row_stats(x_row, V, scale2, BLOCK_V, "evict_first")
    local = tl.load(TGT + row).to(tl.int64) - vocab_start
    owned = (local >= 0) & (local < V)
    ut = tl.load(x_row + local, mask=owned, other=0.0).to(tl.float32) * scale2
    if FINALIZE:
        log2d = tl.log2(d)
        tl.store(OUT_LOGP + row, (ut - m - log2d) * LN2)
        tl.store(OUT_ENT + row, (log2d - sd / d) * LN2)
        if WRITE_LSE2:
            tl.store(OUT_LSE2 + row, m + log2d)
    else:
        p = PART + row.to(tl.int64) * 4
        tl.store(p, m)
        tl.store(p + 1, d)
        tl.store(p + 2, sd)
        tl.store(p + 3, ut)


@triton.jit
def _grpo_kernel(
    X,
    stride_xb,
    stride_xl,
    DX,
    stride_db,
    stride_dl,
    L_inner,
    TGT,
    OLD,
    REF,
    ADV,
    W,
    LSE2_IN,
    LOGP_IN,
    LOSS,
    OUT_LOGP,
    OUT_ENT,
    OUT_CLIP,
    OUT_KL,
    T,
    V,
    vocab_start,
    scale2,
    inv_tau,
    eps_low,
    eps_high,
    beta,
    HAS_REF: tl.constexpr,
    FUSED_STATS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SUB: tl.constexpr,
):
    """GRPO per-token loss + d(loss)/d(logits) for upstream gradient 1, persistent over rows.

    FUSED_STATS (single rank): sweep 1 computes the row statistics, sweep 2 re-reads the row REVERSE (newest
    blocks first, the ones most likely still in L2) and writes the gradient. DRAM sees one read + one write of
    the logits only if the rows in flight fit in L2; on the H200 at full occupancy they do not (2 x 132 rows x
    304 KB = 80 MB > 60 MB), so the measured traffic is ~3 passes (docs/perf/kernels.md). Otherwise (vocab-parallel)
    lse2 / logp come from the cross-rank combine and only sweep 2 runs. Rows with weight 0 are never read: their
    gradient row is written as exact zeros and their stats as 0.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK_V)
    n_full = V // BLOCK_V
    tail = n_full * BLOCK_V
    n_rows = T
    for row in range(pid, n_rows, nprog):
        x_row = X + _row_offset(row, L_inner, stride_xb, stride_xl)
        dx_row = DX + _row_offset(row, L_inner, stride_db, stride_dl)
        w = tl.load(W + row).to(tl.float32)
        if w == 0.0:
            if WRITE_GRAD:
                zero = tl.zeros((BLOCK_V,), tl.float32).to(DX.dtype.element_ty)
                for i in range(0, n_full):
                    tl.store(dx_row + i * BLOCK_V + offs, zero)
                if tail < V:
                    tl.store(dx_row + tail + offs, zero, mask=tail + offs < V)
            tl.store(LOSS + row, 0.0)
            tl.store(OUT_LOGP + row, 0.0)
            tl.store(OUT_ENT + row, 0.0)
            tl.store(OUT_KL + row, 0.0)
            tl.store(OUT_CLIP + row, tl.zeros((), tl.int8))
        else:
            local = tl.load(TGT + row).to(tl.int64) - vocab_start
            if FUSED_STATS:
                if SUB > 0:
                    m, d, sd = _row_stats_vec(x_row, V, scale2, w, BLOCK_V, SUB, "evict_last")
                else:
                    m, d, sd = _row_stats(x_row, V, scale2, BLOCK_V, "evict_last")
                owned = (local >= 0) & (local < V)
                ut = tl.load(x_row + local, mask=owned, other=0.0).to(tl.float32) * scale2
                log2d = tl.log2(d)
                lse2 = m + log2d
                logp = (ut - lse2) * LN2
                tl.store(OUT_ENT + row, (log2d - sd / d) * LN2)
            else:
                lse2 = tl.load(LSE2_IN + row)
                logp = tl.load(LOGP_IN + row)
            pg, g, kl, clipped = _grpo_terms(row, logp, OLD, REF, ADV, eps_low, eps_high, beta, HAS_REF)
            tl.store(OUT_KL + row, kl)
            tl.store(LOSS + row, w * pg)
            tl.store(OUT_LOGP + row, logp)
            tl.store(OUT_CLIP + row, clipped.to(tl.int8))
            if WRITE_GRAD:
                coef = w * g * inv_tau
                if tail < V:
                    cols = tail + offs
                    mask = cols < V
                    z = tl.load(x_row + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
                    p = tl.exp2(z * scale2 - lse2)
                    gx = coef * (tl.where(cols == local, 1.0, 0.0) - p)
                    tl.store(dx_row + cols, gx.to(DX.dtype.element_ty), mask=mask, eviction_policy="evict_first")
                for i in range(0, n_full):
                    if REVERSE:
                        start = (n_full - 1 - i) * BLOCK_V
                    else:
                        start = i * BLOCK_V
                    cols = start + offs
                    z = tl.load(x_row + cols, eviction_policy="evict_first").to(tl.float32)
                    p = tl.exp2(z * scale2 - lse2)
                    gx = coef * (tl.where(cols == local, 1.0, 0.0) - p)
                    tl.store(dx_row + cols, gx.to(DX.dtype.element_ty), eviction_policy="evict_first")


@triton.jit
def _scale_kernel(X, s_ptr, N, BLOCK: tl.constexpr):
    """In-place X *= s (device scalar), grid-stride. Returns at once when s == 1 (the usual upstream gradient), so
    the backward applies a non-unit upstream gradient without a host sync to find out whether there is one."""
    s = tl.load(s_ptr).to(tl.float32)
    if s != 1.0:
        start = tl.program_id(0).to(tl.int64) * BLOCK
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for base in range(start, N, step):
            offs = base + tl.arange(0, BLOCK)
            mask = offs < N
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(X + offs, (x * s).to(X.dtype.element_ty), mask=mask)
