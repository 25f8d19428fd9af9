// GRPO loss + d(logits) in ONE read and ONE write of bf16 logits: each row is split over a thread-block cluster.
//
// Why CUDA and not Triton: the gradient of a row needs the row's log-sum-exp, so a one-read kernel must hold the row
// (151936 x 2 B = 304 KB) on chip until the whole row has been reduced. No single SM holds that; a cluster of C CTAs
// (Hopper) holds one 1/C slice each, exchanges its partial softmax statistics through distributed shared memory,
// then writes its gradient slice from registers. Triton 3.6 exposes neither clusters,
// DSMEM nor explicit shared-memory tiles; its global-memory exchange variants were latency-bound
// (docs/perf/kernels.md). The hardware co-schedules a cluster's CTAs, so the exchange cannot deadlock: no timeouts,
// no fallback.
//
// Compiled at run time with NVRTC (torch.cuda._compile_kernel): no CUDA headers are used (only PTX and builtins),
// so it builds wherever PyTorch's CUDA wheels are installed. The host (cuda_grpo.py) prepends these defines:
//   R1K_CLUSTER  CTAs per row (cluster size, 2..8)         R1K_THREADS  threads per CTA (multiple of 32)
//   R1K_CHUNK    columns per CTA (multiple of 8)          R1K_HAS_REF  1: k3 KL term to the reference log-probs
//   R1K_MIN_BLOCKS  CTAs per SM the register allocation must allow (__launch_bounds__)
//   R1K_STAGE_VEC   16-byte vectors of each gradient slice written through the shared-memory staging buffer by
//                   a bulk store that drains during the next row (the rest: st.global from the threads at once)
//
// Per CTA and row (persistent over rows r = cluster id + k * clusters):
//   1. its slice [rank * CHUNK, +CHUNK) arrived in shared memory (one bulk (TMA) copy per 16 KB, issued one row
//      ahead, an mbarrier counts the bytes) -> registers; the slot is then refilled at once with the next row's
//      slice, so the copy overlaps everything below
//   2. per-thread then per-CTA base-2 softmax statistics (max m, sum 2^(u-m), sum 2^(u-m)(u-m)), target logit
//   3. each CTA sends its partial to every sibling's shared memory with st.async (which completes the receiver's
//      mbarrier: no cluster-wide barrier, whose release semantics would wait for the gradient stores to drain);
//      every warp merges the C partials -> lse, loss terms
//   4. gradient slice written from the registers: coef * (onehot - 2^(u - lse))
// Measured alternatives (docs/perf/kernels.md): per-thread cp.async instead of TMA, reusing the statistics sweep's
// exponentials as bf16, part of the exponentials on the FMA pipe: none faster.
// Semantics are those of ops.py (see its module docstring); rows with weight 0 are never read.

#ifndef R1K_DIAG  // benchmark-only ablations (results are wrong): 1 no gradient stores, 2 no loads, 4 no exchange
#define R1K_DIAG 0
#endif
#define R1K_NEG_BIG (-1.0e30f)
#define R1K_LN2 0.6931471805599453f
#define R1K_NVEC (R1K_CHUNK / 8)                    // 16-byte vectors in a full slice
#define R1K_KF (R1K_NVEC / R1K_THREADS)             // rounds in which every thread holds a vector
#define R1K_REM (R1K_NVEC % R1K_THREADS)            // threads holding one more vector
#define R1K_VEC_PER_THREAD (R1K_KF + (R1K_REM > 0))
#define R1K_WARPS (R1K_THREADS / 32)
#define R1K_CLUSTER_POW2 (R1K_CLUSTER <= 2 ? 2 : R1K_CLUSTER <= 4 ? 4 : 8)
#define R1K_PAD2 0xF149F149u  // two bf16 -1e30: pads a short slice, adds exactly 0 to the statistics

__device__ __forceinline__ unsigned r1k_smem_addr(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ float r1k_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float r1k_lo(unsigned v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float r1k_hi(unsigned v) { return __uint_as_float(v & 0xffff0000u); }

__device__ __forceinline__ unsigned r1k_pack(float lo, float hi) {  // round-to-nearest-even, like .to(bfloat16)
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ unsigned r1k_max2(unsigned a, unsigned b) {  // per-half max of two bf16 pairs
    unsigned r;
    asm("max.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

// Cluster special registers: this CTA's rank in its cluster, the cluster's id, the number of clusters.
#define R1K_SREG(fn, reg)                                     \
    __device__ __forceinline__ unsigned fn() {                \
        unsigned r;                                           \
        asm volatile("mov.u32 %0, %%" reg ";" : "=r"(r));     \
        return r;                                             \
    }
R1K_SREG(r1k_sreg_cluster_rank, "cluster_ctarank")
R1K_SREG(r1k_sreg_cluster_id, "clusterid.x")
R1K_SREG(r1k_sreg_num_clusters, "nclusterid.x")

__device__ __forceinline__ void r1k_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

__device__ __forceinline__ unsigned r1k_mapa(unsigned local, unsigned rank) {  // a sibling's copy of an address
    unsigned remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
    return remote;
}

// 16 bytes into a sibling's shared memory; the write completes 16 bytes of its mbarrier's transaction count. Unlike
// a release barrier, this does not wait for this thread's earlier global stores (the gradient) to drain.
__device__ __forceinline__ void r1k_send4(unsigned addr, unsigned bar, float a, float b, float c, float d) {
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(
                     addr),
                 "f"(a), "f"(b), "f"(c), "f"(d), "r"(bar)
                 : "memory");
}

__device__ __forceinline__ void r1k_bar_wait(unsigned bar, unsigned phase) {
    unsigned done = 0;
    while (!done) {
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
            : "=r"(done)
            : "r"(bar), "r"(phase)
            : "memory");
    }
}

// Merge softmax statistics (m, d, sd) of two disjoint parts (sd relative to the part's own max, as in _kernels.py).
__device__ __forceinline__ void r1k_merge(float& m, float& d, float& sd, float m2, float d2, float sd2) {
    const float big = fmaxf(m, m2);
    const float a = r1k_ex2(m - big), b = r1k_ex2(m2 - big);
    sd = a * (sd + d * (m - big)) + b * (sd2 + d2 * (m2 - big));
    d = a * d + b * d2;
    m = big;
}

template <int FIRST = 16>  // merge lanes [0, 2 * FIRST) (all 32 by default) into every one of them
__device__ __forceinline__ void r1k_warp_merge(float& m, float& d, float& sd) {
#pragma unroll
    for (int o = FIRST; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float d2 = __shfl_xor_sync(0xffffffffu, d, o);
        const float sd2 = __shfl_xor_sync(0xffffffffu, sd, o);
        r1k_merge(m, d, sd, m2, d2, sd2);
    }
}

extern "C" __global__ void __cluster_dims__(R1K_CLUSTER, 1, 1) __launch_bounds__(R1K_THREADS, R1K_MIN_BLOCKS)
r1k_grpo_cluster(const unsigned short* __restrict__ X, long long stride_xb, long long stride_xl,
                 unsigned short* DX, long long stride_db, long long stride_dl, int l_inner,
                 const long long* __restrict__ TGT, const float* __restrict__ OLD, const float* __restrict__ REF,
                 const float* __restrict__ ADV, const float* __restrict__ W, float* __restrict__ LOSS,
                 float* __restrict__ OUT_LOGP, float* __restrict__ OUT_ENT, signed char* __restrict__ OUT_CLIP,
                 float* __restrict__ OUT_KL, int n_rows, long long vocab, long long vocab_start, float scale2,
                 float inv_tau, float eps_low, float eps_high, float beta) {
    // X and DX may alias (in-place gradient): a CTA reads its whole slice before writing it, and never touches
    // another CTA's slice, so no __restrict__ on them.
    extern __shared__ __align__(16) uint4 r1k_slot[];  // next row's slice (R1K_NVEC vectors), then the staging
    __shared__ __align__(16) float part[2][R1K_CLUSTER][4];  // per row parity: every CTA's (m, d, sd, target)
    __shared__ float red[R1K_WARPS][3];
    __shared__ __align__(8) unsigned long long slot_bar;  // completes when the slice has arrived (TMA)
    __shared__ __align__(8) unsigned long long xbar[2];   // per row parity: completes when all C partials arrived

    const unsigned rank = r1k_sreg_cluster_rank();
    const int n_clusters = (int)r1k_sreg_num_clusters();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long col0 = (long long)rank * R1K_CHUNK;
    const long long rest = vocab - col0;
    const int n_local = rest <= 0 ? 0 : (rest < R1K_CHUNK ? (int)rest : R1K_CHUNK);
    const int nvec = n_local >> 3;  // the host guarantees vocab % 8 == 0
    const unsigned slot_s = r1k_smem_addr(r1k_slot);
    const unsigned stage_s = slot_s + 16u * R1K_NVEC;  // staging buffer: R1K_STAGE_VEC vectors after the slot
    const unsigned bar_s = r1k_smem_addr(&slot_bar);
    unsigned bar_phase = 0;
    // A short (last) slice is padded once to the full length: every loop below then runs unpredicated, and only
    // the gradient stores check the length. The pad is never overwritten (copies cover [0, nvec) only).
    for (int v = nvec + tid; v < R1K_NVEC; v += R1K_THREADS) r1k_slot[v] = make_uint4(R1K_PAD2, R1K_PAD2, R1K_PAD2, R1K_PAD2);
    const unsigned xbar0_s = r1k_smem_addr(&xbar[0]);  // xbar[p] at xbar0_s + 8p (no dynamically indexed arrays:
    unsigned xphase = 0u;                                // they would live in local memory); bit p = phase of xbar[p]
    if (tid == 0) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar_s) : "memory");
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(xbar0_s) : "memory");
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(xbar0_s + 8u) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    r1k_cluster_sync();  // every sibling's barriers are initialised before anyone sends to them

    auto x_row = [&](int row) {
        const int b = row / l_inner;
        return X + b * stride_xb + (row - b * l_inner) * stride_xl + col0;
    };
    auto dx_of = [&](int row) {
        const int b = row / l_inner;
        return DX + b * stride_db + (row - b * l_inner) * stride_dl + col0;
    };
    auto prefetch = [&](int row) {  // called by all threads
        const char* src = reinterpret_cast<const char*>(x_row(row));
        if (tid == 0) {
            const unsigned bytes = (R1K_DIAG & 2) ? 0u : 16u * nvec;
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // our reads of the slot came first
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar_s), "r"(bytes) : "memory");
            for (unsigned off = 0; off < bytes; off += 16384u) {
                const unsigned n = bytes - off < 16384u ? bytes - off : 16384u;
                asm volatile(
                    "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                        slot_s + off),
                    "l"(src + off), "r"(n), "r"(bar_s)
                    : "memory");
            }
        }
    };
    // One warp polls an mbarrier while the others sleep in __syncthreads (polling warps would take issue slots from
    // the working ones); then every thread's own (immediately successful) wait acquires the data for itself.
    auto wait_all = [&](unsigned bar, unsigned phase) {
        if (warp == 0) r1k_bar_wait(bar, phase);
        __syncthreads();
        r1k_bar_wait(bar, phase);
    };
    auto wait_slot = [&]() {  // all threads: the slice of the current row is in the slot and visible
        wait_all(bar_s, bar_phase);
        bar_phase ^= 1u;
    };

    int row = (int)r1k_sreg_cluster_id();
    float w = row < n_rows ? W[row] : 0.0f;
    if (row < n_rows && w != 0.0f) prefetch(row);
    int parity = 0;

    for (; row < n_rows; row += n_clusters) {
        const int next = row + n_clusters;
        const float w_next = next < n_rows ? W[next] : 0.0f;
        if (w == 0.0f) {  // masked row: never read; exact-zero gradient slice and zero stats
            unsigned short* dx_row = dx_of(row);
            for (int v = tid; v < nvec; v += R1K_THREADS) reinterpret_cast<uint4*>(dx_row)[v] = make_uint4(0, 0, 0, 0);
            if (rank == 0 && tid == 0) {
                LOSS[row] = 0.0f;
                OUT_LOGP[row] = 0.0f;
                OUT_ENT[row] = 0.0f;
                OUT_KL[row] = 0.0f;
                OUT_CLIP[row] = 0;
            }
            if (next < n_rows && w_next != 0.0f) prefetch(next);
            w = w_next;
            continue;
        }

        const long long t_global = TGT[row] - vocab_start - col0;  // loaded first: its latency overlaps the wait

        // 1. slice -> registers, then refill the shared slot with the next row's slice
        wait_slot();
        uint4 q[R1K_VEC_PER_THREAD];
#pragma unroll
        for (int k = 0; k < R1K_VEC_PER_THREAD; ++k) {
            const uint4 pad = make_uint4(R1K_PAD2, R1K_PAD2, R1K_PAD2, R1K_PAD2);
            q[k] = (k < R1K_KF || tid < R1K_REM) ? r1k_slot[tid + k * R1K_THREADS] : pad;
        }
        const bool owns_target = t_global >= 0 && t_global < n_local;
        const int t_local = owns_target ? (int)t_global : 0;
        float ut_own = R1K_NEG_BIG;
        if (owns_target) {
            ut_own = __uint_as_float(((unsigned)reinterpret_cast<const unsigned short*>(r1k_slot)[t_local]) << 16);
            ut_own *= scale2;
        }
        __syncthreads();  // the slot is free
        if (next < n_rows && w_next != 0.0f) prefetch(next);

        // 2. per-thread max (on bf16 pairs), then sums relative to it (one ex2 per element), then the CTA's stats
        unsigned m2 = R1K_PAD2;
#pragma unroll
        for (int k = 0; k < R1K_VEC_PER_THREAD; ++k)
            m2 = r1k_max2(r1k_max2(m2, r1k_max2(q[k].x, q[k].y)), r1k_max2(q[k].z, q[k].w));
        float m = fmaxf(r1k_lo(m2), r1k_hi(m2)) * scale2;  // scale2 > 0: max commutes with the scaling
        float d = 0.0f, sd = 0.0f;
#pragma unroll
        for (int k = 0; k < R1K_VEC_PER_THREAD; ++k) {
            unsigned e[4] = {q[k].x, q[k].y, q[k].z, q[k].w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float t0 = fmaf(r1k_lo(e[j]), scale2, -m), t1 = fmaf(r1k_hi(e[j]), scale2, -m);
                const float p0 = r1k_ex2(t0), p1 = r1k_ex2(t1);
                d += p0 + p1;
                sd = fmaf(p0, t0, fmaf(p1, t1, sd));
            }
        }
        r1k_warp_merge(m, d, sd);
        if (lane == 0) {
            red[warp][0] = m;
            red[warp][1] = d;
            red[warp][2] = sd;
        }
        __syncthreads();
        if (warp == 0) {
            float wm = R1K_NEG_BIG, wd = 0.0f, wsd = 0.0f;
            if (lane < R1K_WARPS) {
                wm = red[lane][0];
                wd = red[lane][1];
                wsd = red[lane][2];
            }
            r1k_warp_merge(wm, wd, wsd);
            if (lane == 0 && (R1K_DIAG & 4)) part[parity][rank][0] = wm;
            if (lane == 0 && !(R1K_DIAG & 4)) {  // arm our barrier for C partials, send ours to every CTA (us too)
                asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(xbar0_s + 8u * parity),
                             "r"(16u * R1K_CLUSTER)
                             : "memory");
                const unsigned slot = r1k_smem_addr(&part[parity][rank][0]);
#pragma unroll
                for (unsigned r = 0; r < R1K_CLUSTER; ++r)
                    r1k_send4(r1k_mapa(slot, r), r1k_mapa(xbar0_s + 8u * parity, r), wm, wd, wsd, ut_own);
            }
        }

        // 3. wait for the C partials (no cluster-wide barrier); every warp merges them itself (no broadcast).
        // The per-row scalars are loaded first: their latency overlaps the wait.
        const float old = OLD[row], adv = ADV[row];
#if R1K_HAS_REF
        const float ref_logp = REF[row];
#endif
        if (R1K_DIAG & 4) {
            if (tid == 0) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
            __syncthreads();
        } else {
            // the previous row's bulk store has read the staging buffer before anyone rewrites it (long done)
            if (tid == 0) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
            wait_all(xbar0_s + 8u * parity, (xphase >> parity) & 1u);
            xphase ^= 1u << parity;
        }
        float cm = R1K_NEG_BIG, cd = 0.0f, csd = 0.0f, ut = R1K_NEG_BIG;
        if (lane < R1K_CLUSTER) {
            const float4 pr = *reinterpret_cast<const float4*>(&part[parity][lane][0]);
            cm = pr.x;
            cd = pr.y;
            csd = pr.z;
            ut = pr.w;
        }
        r1k_warp_merge<R1K_CLUSTER_POW2 / 2>(cm, cd, csd);  // only lanes < C hold partials: merge those ...
#pragma unroll
        for (int o = R1K_CLUSTER_POW2 / 2; o > 0; o >>= 1) ut = fmaxf(ut, __shfl_xor_sync(0xffffffffu, ut, o));
        cm = __shfl_sync(0xffffffffu, cm, 0);  // ... and hand lane 0's result to the whole warp
        cd = __shfl_sync(0xffffffffu, cd, 0);
        csd = __shfl_sync(0xffffffffu, csd, 0);
        ut = __shfl_sync(0xffffffffu, ut, 0);
        // part[parity] is rewritten two rows later, after every warp passed the next row's __syncthreads
        parity ^= 1;

        const float log2d = log2f(cd);
        const float lse2 = cm + log2d;
        const float logp = (ut - lse2) * R1K_LN2;
        const float ratio = expf(logp - old);
        const bool clipped = (adv > 0.0f && ratio > 1.0f + eps_high) || (adv < 0.0f && ratio < 1.0f - eps_low);
        const float c = fminf(fmaxf(ratio, 1.0f - eps_low), 1.0f + eps_high);
        float pg = -fminf(ratio * adv, c * adv);
        float g = clipped ? 0.0f : -adv * ratio;
        float kl = 0.0f;
#if R1K_HAS_REF
        const float diff = ref_logp - logp;
        const float e = expf(diff);
        kl = e - diff - 1.0f;
        pg += beta * kl;
        g += beta * (1.0f - e);
#endif
        const float coef = w * g * inv_tau;
        if (rank == 0 && tid == 0) {
            LOSS[row] = w * pg;
            OUT_LOGP[row] = logp;
            OUT_ENT[row] = (log2d - csd / cd) * R1K_LN2;
            OUT_KL[row] = kl;
            OUT_CLIP[row] = clipped ? 1 : 0;
        }

        // 4. gradient slice from the registers: -coef * p everywhere, then the target element coef * (1 - p).
        // Vectors [stage_lo, nvec) go to the staging buffer and leave as one bulk (TMA) store that drains while the
        // next row is processed; the rest are stored by the threads now (a burst: every SM writes at once).
        const bool full = nvec == R1K_NVEC;
        unsigned short* dx_row = dx_of(row);
        const int stage_lo = nvec - (nvec < R1K_STAGE_VEC ? nvec : R1K_STAGE_VEC);
#pragma unroll
        for (int k = 0; k < R1K_VEC_PER_THREAD; ++k) {
            const int v = tid + k * R1K_THREADS;
            unsigned e[4] = {q[k].x, q[k].y, q[k].z, q[k].w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float g0 = -coef * r1k_ex2(fmaf(r1k_lo(e[j]), scale2, -lse2));
                const float g1 = -coef * r1k_ex2(fmaf(r1k_hi(e[j]), scale2, -lse2));
                e[j] = r1k_pack(g0, g1);
            }
            const bool valid = ((k < R1K_KF && full) || v < nvec) && !(R1K_DIAG & 1);
            const unsigned direct = valid && v < stage_lo, staged = valid && v >= stage_lo;  // predicated stores
            asm volatile(
                "{ .reg .pred p; setp.ne.u32 p, %5, 0; @p st.global.cs.v4.u32 [%0], {%1, %2, %3, %4}; }" ::"l"(
                    dx_row + 8ll * v),
                "r"(e[0]), "r"(e[1]), "r"(e[2]), "r"(e[3]), "r"(direct)
                : "memory");
            asm volatile("{ .reg .pred p; setp.ne.u32 p, %5, 0; @p st.shared.v4.u32 [%0], {%1, %2, %3, %4}; }" ::"r"(
                             stage_s + 16u * (v - stage_lo)),
                         "r"(e[0]), "r"(e[1]), "r"(e[2]), "r"(e[3]), "r"(staged)
                         : "memory");
        }
        if (owns_target && tid == (t_local >> 3) % R1K_THREADS) {  // the thread that stored that vector: ordered
            const unsigned short gt = (unsigned short)(r1k_pack(coef * (1.0f - r1k_ex2(ut - lse2)), 0.0f) & 0xffffu);
            if ((t_local >> 3) < stage_lo)
                asm volatile("st.global.cs.u16 [%0], %1;" ::"l"(dx_row + t_local), "h"(gt) : "memory");
            else
                asm volatile("st.shared.u16 [%0], %1;" ::"r"(stage_s + 2u * (t_local - 8 * stage_lo)), "h"(gt)
                             : "memory");
        }
        if (stage_lo < nvec) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // our writes, before the copy engine reads
            __syncthreads();
            if (tid == 0) {
                const unsigned bytes = 16u * (nvec - stage_lo);
                char* dst = reinterpret_cast<char*>(dx_row + 8ll * stage_lo);
                for (unsigned off = 0; off < bytes; off += 16384u) {
                    const unsigned n = bytes - off < 16384u ? bytes - off : 16384u;
                    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst + off),
                                 "r"(stage_s + off), "r"(n)
                                 : "memory");
                }
                asm volatile("cp.async.bulk.commit_group;" ::: "memory");
            }
        }
        w = w_next;
    }
    if (tid == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");  // the last bulk stores are done
    r1k_cluster_sync();  // keep this CTA's shared memory alive until every sibling has read its last partials
}
