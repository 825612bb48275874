"""Triton kernels for the fused LM-head divergence.

Each kernel computes [BLOCK_N, BLOCK_V] tiles of student and teacher logits on the fly
(fp32 accumulation over the hidden size) and never writes a [N, V] tensor:

* ``stats_kernel``: online log-sum-exp of both distributions over a slice of the vocabulary plus
  the running sums that give KL(p||q) and KL(q||p) in one pass (partials per vocabulary split).
* ``jsd_kernel``: the second pass that jsd needs (its mixture needs normalized p and q).
* ``grad_kernel``: d loss / d student logits for a vocabulary chunk, scaled per row; the caller
  turns it into dH and dW with two GEMMs. Also TRL's sampled-token estimator (``KIND`` 3), whose
  forward is ``stats_kernel``'s two log-sum-exps plus one indexed dot per side, and the softmax
  itself (``KIND`` 4, the gradient of a log-sum-exp: the top-k tail bucket reads one).
* ``topk_kernel``: each row's k largest logits of one side over a vocabulary slice, kept as a running
  top-k merged tile by tile (values and ids packed in one sortable int64 key), never [N, V].

``CAP`` applies Gemma-2's soft cap ``cap * tanh(z / cap)`` to the logits before the temperature;
the grad kernel chains its derivative ``1 - tanh^2`` (read back from the capped logit).

When teacher and student share the LM head each weight tile is loaded once for both dots.
"""
import triton
import triton.language as tl


@triton.jit
def _dot(x, w, acc, PRECISION: tl.constexpr):
    """acc += x @ w in fp32. PRECISION "interp" upcasts first: Triton's CPU interpreter
    mis-multiplies bf16 dots, and bf16/fp16 products are exact in fp32 anyway."""
    if PRECISION == "interp":
        return tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(x, w, acc, input_precision=PRECISION)


@triton.jit
def _dot_rows(acc, X, W, rows, cols, row_mask, col_mask, K, stride_x, stride_w,
              BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc += X[rows, :K] @ W[cols, :K]^T."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(X + rows[:, None] * stride_x + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(W + cols[None, :] * stride_w + ks[:, None],
                    mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        acc = _dot(x, w, acc, PRECISION)
    return acc


@triton.jit
def _tanh(x):
    """tanh from the sigmoid (Triton has no portable tanh); absolute error ~1e-7 in fp32."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _finish(acc, inv_temp, cap, CAP: tl.constexpr):
    """Raw logits -> (soft-capped) logits divided by the temperature."""
    if CAP:
        acc = cap * _tanh(acc / cap)
    return acc * inv_temp


@triton.jit
def _logit_tiles(HS, HT, W, WT, rows, cols, row_mask, col_mask, H, H_T,
                 s_hs, s_ht, s_w, s_wt, inv_temp, cap, SHARED: tl.constexpr, CAP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Student and teacher logit tiles, soft-capped when ``CAP``, divided by the temperature, fp32."""
    acc_s = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if SHARED:
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < H
            x_mask = row_mask[:, None] & k_mask[None, :]
            w = tl.load(W + cols[None, :] * s_w + ks[:, None],
                        mask=col_mask[None, :] & k_mask[:, None], other=0.0)
            hs = tl.load(HS + rows[:, None] * s_hs + ks[None, :], mask=x_mask, other=0.0)
            acc_s = _dot(hs, w, acc_s, PRECISION)
            ht = tl.load(HT + rows[:, None] * s_ht + ks[None, :], mask=x_mask, other=0.0)
            acc_t = _dot(ht, w, acc_t, PRECISION)
    else:
        acc_s = _dot_rows(acc_s, HS, W, rows, cols, row_mask, col_mask, H, s_hs, s_w, BLOCK_K, PRECISION)
        acc_t = _dot_rows(acc_t, HT, WT, rows, cols, row_mask, col_mask, H_T, s_ht, s_wt, BLOCK_K, PRECISION)
    return _finish(acc_s, inv_temp, cap, CAP), _finish(acc_t, inv_temp, cap, CAP)


@triton.jit
def _row_block(N, BLOCK_N: tl.constexpr):
    """Rows of this program (axis 0), their mask, this vocabulary split's offset and the plane size
    of a [quantities, splits, N] partials tensor (axis 1 = split)."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    return rows, rows < N, tl.program_id(1) * N, tl.num_programs(1) * N


@triton.jit
def stats_kernel(HS, HT, W, WT, OUT, N, V, H, H_T, s_hs, s_ht, s_w, s_wt, inv_temp, cap, v_per_split,
                 SHARED: tl.constexpr, CAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """OUT[6, splits, N]: max_s, sum_s, sum p(s-t), max_t, sum_t, sum q(t-s) (unnormalized)."""
    rows, row_mask, split_base, plane = _row_block(N, BLOCK_N)
    v_lo = tl.program_id(1) * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    z_s = tl.zeros((BLOCK_N,), tl.float32)
    z_t = tl.zeros((BLOCK_N,), tl.float32)
    a_s = tl.zeros((BLOCK_N,), tl.float32)
    a_t = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_hi
        s, t = _logit_tiles(HS, HT, W, WT, rows, cols, row_mask, col_mask, H, H_T,
                            s_hs, s_ht, s_w, s_wt, inv_temp, cap, SHARED, CAP, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION)
        valid = col_mask[None, :]
        diff = tl.where(valid, s - t, 0.0)
        s = tl.where(valid, s, float("-inf"))
        t = tl.where(valid, t, float("-inf"))
        new_m_s = tl.maximum(m_s, tl.max(s, 1))
        new_m_t = tl.maximum(m_t, tl.max(t, 1))
        e_s = tl.exp(s - new_m_s[:, None])
        e_t = tl.exp(t - new_m_t[:, None])
        scale_s = tl.exp(m_s - new_m_s)
        scale_t = tl.exp(m_t - new_m_t)
        z_s = z_s * scale_s + tl.sum(e_s, 1)
        a_s = a_s * scale_s + tl.sum(e_s * diff, 1)
        z_t = z_t * scale_t + tl.sum(e_t, 1)
        a_t = a_t * scale_t - tl.sum(e_t * diff, 1)
        m_s = new_m_s
        m_t = new_m_t
    base = OUT + split_base + rows
    tl.store(base, m_s, mask=row_mask)
    tl.store(base + plane, z_s, mask=row_mask)
    tl.store(base + 2 * plane, a_s, mask=row_mask)
    tl.store(base + 3 * plane, m_t, mask=row_mask)
    tl.store(base + 4 * plane, z_t, mask=row_mask)
    tl.store(base + 5 * plane, a_t, mask=row_mask)


@triton.jit
def _log_mixture(log_p, log_q, log_beta, log_1m_beta):
    a = log_q + log_beta
    b = log_p + log_1m_beta
    top = tl.maximum(a, b)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit
def jsd_kernel(HS, HT, W, WT, LSE, OUT, N, V, H, H_T, s_hs, s_ht, s_w, s_wt, inv_temp, cap, v_per_split,
               log_beta, log_1m_beta,
               SHARED: tl.constexpr, CAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """OUT[2, splits, N]: partial KL(q||m) and KL(p||m) given LSE[2, N] = (lse_s, lse_t)."""
    rows, row_mask, split_base, plane = _row_block(N, BLOCK_N)
    lse_s = tl.load(LSE + rows, mask=row_mask, other=0.0)
    lse_t = tl.load(LSE + N + rows, mask=row_mask, other=0.0)
    v_lo = tl.program_id(1) * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    kl_qm = tl.zeros((BLOCK_N,), tl.float32)
    kl_pm = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_hi
        s, t = _logit_tiles(HS, HT, W, WT, rows, cols, row_mask, col_mask, H, H_T,
                            s_hs, s_ht, s_w, s_wt, inv_temp, cap, SHARED, CAP, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION)
        log_p = s - lse_s[:, None]
        log_q = t - lse_t[:, None]
        log_m = _log_mixture(log_p, log_q, log_beta, log_1m_beta)
        valid = col_mask[None, :]
        kl_qm += tl.sum(tl.where(valid, tl.exp(log_q) * (log_q - log_m), 0.0), 1)
        kl_pm += tl.sum(tl.where(valid, tl.exp(log_p) * (log_p - log_m), 0.0), 1)
    base = OUT + split_base + rows
    tl.store(base, kl_qm, mask=row_mask)
    tl.store(base + plane, kl_pm, mask=row_mask)


@triton.jit
def grad_kernel(HS, HT, W, WT, STATS, ROW_GRAD, Y, GZ, N, H, H_T, s_hs, s_ht, s_w, s_wt, s_gz,
                inv_temp, cap, v_lo, v_hi, log_beta, log_1m_beta, one_m_beta,
                KIND: tl.constexpr, SHARED: tl.constexpr, CAP: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """GZ[:, v - v_lo] = ROW_GRAD * d loss / d s for v in [v_lo, v_hi); STATS[3, N] = lse_s, lse_t, c.
    KIND 3 (sampled token): c (onehot(Y) - p), with Y [N] the sampled ids and c = log p(y) - log q(y).
    KIND 4 (softmax): p, the gradient of lse_s. ``CAP``: times d capped / d raw = 1 - tanh^2."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    cols = (v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_mask = cols < v_hi
    s, t = _logit_tiles(HS, HT, W, WT, rows, cols, row_mask, col_mask, H, H_T,
                        s_hs, s_ht, s_w, s_wt, inv_temp, cap, SHARED, CAP, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION)
    lse_s = tl.load(STATS + rows, mask=row_mask, other=0.0)
    lse_t = tl.load(STATS + N + rows, mask=row_mask, other=0.0)
    c = tl.load(STATS + 2 * N + rows, mask=row_mask, other=0.0)
    g = tl.load(ROW_GRAD + rows, mask=row_mask, other=0.0)
    log_p = s - lse_s[:, None]
    log_q = t - lse_t[:, None]
    p = tl.exp(log_p)
    if KIND == 0:  # reverse KL
        gz = p * (log_p - log_q - c[:, None])
    elif KIND == 1:  # forward KL
        gz = p - tl.exp(log_q)
    elif KIND == 2:  # jsd
        log_m = _log_mixture(log_p, log_q, log_beta, log_1m_beta)
        gz = one_m_beta * p * (log_p - log_m - c[:, None])
    elif KIND == 3:  # sampled token
        y = tl.load(Y + rows, mask=row_mask, other=-1)
        gz = c[:, None] * (tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - p)
    else:  # softmax
        gz = p
    if CAP:  # s = cap * tanh(z / cap) / T
        th = s / (cap * inv_temp)
        gz = gz * (1.0 - th * th)
    gz = gz * g[:, None]
    out = GZ + rows[:, None] * s_gz + (cols - v_lo)[None, :]
    tl.store(out, gz.to(GZ.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _sort_key(x, cols):
    """int64 keys ordered like the fp32 values ``x``, ties broken towards the lower id: the value's
    bits made order-preserving as a signed int32 in the high word, ``2^31 - 1 - id`` in the low one."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - cols)


@triton.jit
def topk_kernel(X, W, OUT, N, V, H, s_x, s_w, inv_temp, cap, v_per_split,
                CAP: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr):
    """OUT[splits, N, K]: sort keys (``_sort_key``) of the K largest logits of X @ W.T (capped, / T)
    per row within this program's vocabulary split, unordered; empty slots hold the smallest key.
    Tiles are K wide: each is merged into the running top-K by one top-K of the 2K candidates."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    v_lo = tl.program_id(1) * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    lowest = tl.full((BLOCK_N, K), -9223372036854775807 - 1, tl.int64)
    best = lowest
    for v0 in range(v_lo, v_hi, K):
        cols = (v0 + tl.arange(0, K)).to(tl.int64)
        col_mask = cols < v_hi
        acc = tl.zeros((BLOCK_N, K), dtype=tl.float32)
        acc = _dot_rows(acc, X, W, rows, cols, row_mask, col_mask, H, s_x, s_w, BLOCK_K, PRECISION)
        keys = tl.where(col_mask[None, :], _sort_key(_finish(acc, inv_temp, cap, CAP), cols[None, :]), lowest)
        best = tl.topk(tl.reshape(tl.join(best, keys), (BLOCK_N, 2 * K)), K, dim=1)
    out = OUT + (tl.program_id(1) * N + rows)[:, None] * K + tl.arange(0, K)[None, :]
    tl.store(out, best, mask=row_mask[:, None])
