"""The Triton kernels: flash attention forward (online softmax, LSE saved), and the backward's delta,
dK/dV and dQ kernels; a query block visits only the key blocks that overlap its queries' segments."""

from __future__ import annotations

from ..dispatch import triton_available

if triton_available():
    import triton
    import triton.language as tl

    from .._triton_utils import dot
else:  # pragma: no cover - platforms without triton wheels
    triton = None


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _grid_position(S, BLOCK: tl.constexpr):
        """(tile index along the sequence, flat batch*head index) of this program in a 1-D grid.

        The tile index varies fastest, so programs that run together share one head's K/V in L2;
        a 1-D grid also lifts CUDA's 65535 limit on the second grid axis (large B * H).
        """
        n_tiles = tl.cdiv(S, BLOCK)
        pid = tl.program_id(0)
        return pid % n_tiles, pid // n_tiles

    @triton.jit
    def _load_rows(base, offs_s, offs_d, stride_s, S, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows offs_s of one [S, HEAD_DIM] head (last dim contiguous): [len(offs_s), BLOCK_D], 0 outside."""
        ptrs = base + offs_s[:, None] * stride_s + offs_d[None, :]
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs, mask=offs_s[:, None] < S, other=0.0)
        else:
            return tl.load(ptrs, mask=(offs_s[:, None] < S) & (offs_d[None, :] < HEAD_DIM), other=0.0)

    @triton.jit
    def _store_rows(base, x, offs_s, offs_d, stride_s, S, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        ptrs = base + offs_s[:, None] * stride_s + offs_d[None, :]
        if BLOCK_D == HEAD_DIM:
            tl.store(ptrs, x, mask=offs_s[:, None] < S)
        else:
            tl.store(ptrs, x, mask=(offs_s[:, None] < S) & (offs_d[None, :] < HEAD_DIM))

    @triton.jit
    def _query_block(SEG, SPAN_LO, SPAN_HI, S, H, GROUP, BLOCK_M: tl.constexpr):
        """This program's BLOCK_M queries of one (batch, query head): their ids, segments, and the key
        range [kv_lo, kv_hi) they can see (from the first start to the last end of their segments)."""
        pid_m, pid_bh = _grid_position(S, BLOCK_M)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        in_rows = offs_m < S
        row = b.to(tl.int64) * S
        seg_q = tl.load(SEG + row + offs_m, mask=in_rows, other=-1)
        kv_lo = tl.min(tl.load(SPAN_LO + row + offs_m, mask=in_rows, other=S), axis=0)
        kv_hi = tl.max(tl.load(SPAN_HI + row + offs_m, mask=in_rows, other=0), axis=0)
        return pid_bh, b, h, h // GROUP, offs_m, in_rows, row, seg_q, kv_lo, kv_hi

    @triton.jit
    def _key_block_scores(
        q,
        seg_q,
        k_base,
        seg_row,
        offs_n,
        offs_d,
        stride_ks,
        S,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
    ):
        """One key block: its keys, and the scaled base-2 scores of the query block against them,
        -inf where a query may not attend (another sample, or padding)."""
        k = _load_rows(k_base, offs_n, offs_d, stride_ks, S, HEAD_DIM, BLOCK_D)
        seg_k = tl.load(seg_row + offs_n, mask=offs_n < S, other=-1)
        allowed = (seg_q[:, None] == seg_k[None, :]) & (seg_q[:, None] >= 0)
        return k, tl.where(allowed, dot(q, tl.trans(k), None, UPCAST_DOT) * qk_scale, float("-inf"))

    @triton.jit
    def _attn_fwd(
        Q,
        K,
        V,
        SEG,
        SPAN_LO,
        SPAN_HI,
        OUT,
        LSE,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_vb,
        stride_vh,
        stride_vs,
        stride_ob,
        stride_oh,
        stride_os,
        S,
        H,
        GROUP,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STORE_LSE: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
    ):
        """One program: BLOCK_M queries of one (batch, query head); cdiv(S, BLOCK_M) * B * H programs.

        qk_scale = softmax scale * log2(e): the softmax runs in base 2 (exp2 is the native unit).
        LSE (float32 [B, H, S], base 2, only if STORE_LSE) is +inf for a query with no key (padding),
        so that exp2(score - LSE) = 0 in the backward pass.
        """
        pid_bh, b, h, hk, offs_m, in_rows, row, seg_q, kv_lo, kv_hi = _query_block(
            SEG, SPAN_LO, SPAN_HI, S, H, GROUP, BLOCK_M
        )
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)

        q = _load_rows(
            Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, offs_d, stride_qs, S, HEAD_DIM, BLOCK_D
        )
        k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

        # A finite floor instead of -inf: a row that sees no key in a block (its segment is elsewhere)
        # then gets alpha = exp2(0) = 1 and p = exp2(-inf) = 0 instead of NaN from (-inf) - (-inf).
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range((kv_lo // BLOCK_N) * BLOCK_N, kv_hi, BLOCK_N):
            offs_n = start_n + offs_n0
            k, s = _key_block_scores(
                q, seg_q, k_base, SEG + row, offs_n, offs_d, stride_ks, S, qk_scale, HEAD_DIM, BLOCK_D, UPCAST_DOT
            )
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = _load_rows(v_base, offs_n, offs_d, stride_vs, S, HEAD_DIM, BLOCK_D)
            acc = dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST_DOT)
            m_i = m_new

        has_keys = l_i > 0.0
        l_safe = tl.where(has_keys, l_i, 1.0)
        out = acc / l_safe[:, None]
        _store_rows(
            OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh,
            out.to(OUT.dtype.element_ty),
            offs_m,
            offs_d,
            stride_os,
            S,
            HEAD_DIM,
            BLOCK_D,
        )
        if STORE_LSE:
            lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("inf"))
            tl.store(LSE + pid_bh.to(tl.int64) * S + offs_m, lse, mask=in_rows)

    @triton.jit
    def _attn_bwd_delta(
        OUT,
        DO,
        DELTA,
        stride_ob,
        stride_oh,
        stride_os,
        stride_dob,
        stride_doh,
        stride_dos,
        S,
        H,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """DELTA[b, h, i] = sum_d OUT * DO (float32 [B, H, S]): the softmax-backward row term."""
        pid_m, pid_bh = _grid_position(S, BLOCK_M)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        o = _load_rows(
            OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh,
            offs_m,
            offs_d,
            stride_os,
            S,
            HEAD_DIM,
            BLOCK_D,
        )
        do = _load_rows(
            DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh,
            offs_m,
            offs_d,
            stride_dos,
            S,
            HEAD_DIM,
            BLOCK_D,
        )
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + pid_bh.to(tl.int64) * S + offs_m, delta, mask=offs_m < S)

    # The backward pass is split in two kernels so that every output has exactly one writer:
    # _attn_bwd_dkdv owns a block of keys (and sums over all query heads of its KV group),
    # _attn_bwd_dq owns a block of queries. The alternative, one kernel with atomic float32 adds
    # into dq, needs an extra float32 buffer and a cast, contends on the atomics, and makes dq
    # depend on the order in which programs finish (not bitwise reproducible). The price of the
    # split is recomputing Q K^T and dO V^T in the dq kernel: 7 block matmuls instead of 5.

    @triton.jit
    def _attn_bwd_dkdv(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        SEG,
        SPAN_LO,
        SPAN_HI,
        DK,
        DV,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_vb,
        stride_vh,
        stride_vs,
        stride_dob,
        stride_doh,
        stride_dos,
        stride_dkb,
        stride_dkh,
        stride_dks,
        S,
        H,
        GROUP,
        qk_scale,
        scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
    ):
        """One program: BLOCK_N keys of one (batch, KV head); cdiv(S, BLOCK_N) * B * H/GROUP programs.

        Works on the transposed scores (keys x queries), so that P^T and dS^T come out of the
        matmuls directly. DK and DV share one layout (both are fresh contiguous tensors).
        """
        pid_n, pid_bh = _grid_position(S, BLOCK_N)
        n_kv_heads = H // GROUP
        b = pid_bh // n_kv_heads
        hk = pid_bh % n_kv_heads
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        in_keys = offs_n < S

        row = b.to(tl.int64) * S
        seg_k = tl.load(SEG + row + offs_n, mask=in_keys, other=-1)
        q_lo = tl.min(tl.load(SPAN_LO + row + offs_n, mask=in_keys, other=S), axis=0)
        q_hi = tl.max(tl.load(SPAN_HI + row + offs_n, mask=in_keys, other=0), axis=0)

        k = _load_rows(
            K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh,
            offs_n,
            offs_d,
            stride_ks,
            S,
            HEAD_DIM,
            BLOCK_D,
        )
        v = _load_rows(
            V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh,
            offs_n,
            offs_d,
            stride_vs,
            S,
            HEAD_DIM,
            BLOCK_D,
        )
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
            do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
            stat_base = (b * H + h).to(tl.int64) * S
            for start_m in range((q_lo // BLOCK_M) * BLOCK_M, q_hi, BLOCK_M):
                offs_m = start_m + offs_m0
                in_rows = offs_m < S
                q = _load_rows(q_base, offs_m, offs_d, stride_qs, S, HEAD_DIM, BLOCK_D)
                seg_q = tl.load(SEG + row + offs_m, mask=in_rows, other=-1)
                lse = tl.load(LSE + stat_base + offs_m, mask=in_rows, other=float("inf"))
                qk_t = dot(k, tl.trans(q), None, UPCAST_DOT)
                allowed = (seg_k[:, None] == seg_q[None, :]) & (seg_k[:, None] >= 0)
                p_t = tl.math.exp2(tl.where(allowed, qk_t * qk_scale, float("-inf")) - lse[None, :])
                do = _load_rows(do_base, offs_m, offs_d, stride_dos, S, HEAD_DIM, BLOCK_D)
                dv = dot(p_t.to(do.dtype), do, dv, UPCAST_DOT)
                delta = tl.load(DELTA + stat_base + offs_m, mask=in_rows, other=0.0)
                dp_t = dot(v, tl.trans(do), None, UPCAST_DOT)
                ds_t = p_t * (dp_t - delta[None, :])
                dk = dot(ds_t.to(q.dtype), q, dk, UPCAST_DOT)

        out_base = b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
        _store_rows(
            DK + out_base, (dk * scale).to(DK.dtype.element_ty), offs_n, offs_d, stride_dks, S, HEAD_DIM, BLOCK_D
        )
        _store_rows(DV + out_base, dv.to(DV.dtype.element_ty), offs_n, offs_d, stride_dks, S, HEAD_DIM, BLOCK_D)

    @triton.jit
    def _attn_bwd_dq(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        SEG,
        SPAN_LO,
        SPAN_HI,
        DQ,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_vb,
        stride_vh,
        stride_vs,
        stride_dob,
        stride_doh,
        stride_dos,
        stride_dqb,
        stride_dqh,
        stride_dqs,
        S,
        H,
        GROUP,
        qk_scale,
        scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
    ):
        """One program: BLOCK_M queries of one (batch, query head); cdiv(S, BLOCK_M) * B * H programs."""
        pid_bh, b, h, hk, offs_m, in_rows, row, seg_q, kv_lo, kv_hi = _query_block(
            SEG, SPAN_LO, SPAN_HI, S, H, GROUP, BLOCK_M
        )
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        stat_base = pid_bh.to(tl.int64) * S
        lse = tl.load(LSE + stat_base + offs_m, mask=in_rows, other=float("inf"))
        delta = tl.load(DELTA + stat_base + offs_m, mask=in_rows, other=0.0)

        q = _load_rows(
            Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, offs_d, stride_qs, S, HEAD_DIM, BLOCK_D
        )
        do = _load_rows(
            DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh,
            offs_m,
            offs_d,
            stride_dos,
            S,
            HEAD_DIM,
            BLOCK_D,
        )
        k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range((kv_lo // BLOCK_N) * BLOCK_N, kv_hi, BLOCK_N):
            offs_n = start_n + offs_n0
            k, s = _key_block_scores(
                q, seg_q, k_base, SEG + row, offs_n, offs_d, stride_ks, S, qk_scale, HEAD_DIM, BLOCK_D, UPCAST_DOT
            )
            p = tl.math.exp2(s - lse[:, None])
            v = _load_rows(v_base, offs_n, offs_d, stride_vs, S, HEAD_DIM, BLOCK_D)
            dp = dot(do, tl.trans(v), None, UPCAST_DOT)
            ds = p * (dp - delta[:, None])
            dq = dot(ds.to(k.dtype), k, dq, UPCAST_DOT)

        _store_rows(
            DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh,
            (dq * scale).to(DQ.dtype.element_ty),
            offs_m,
            offs_d,
            stride_dqs,
            S,
            HEAD_DIM,
            BLOCK_D,
        )
