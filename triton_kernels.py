"""
Fused Triton kernels for model.py: RMSNorm, residual add + RMSNorm, RoPE, SwiGLU, and a chunked
linear + cross-entropy that never materialises the full (tokens x vocab) logits.

Each op has Liger-Kernel's four layers: a @triton.jit kernel (formula in its docstring) -> a
launcher (flatten to 2-D rows, make contiguous, pick BLOCK_SIZE and num_warps) -> a
torch.autograd.Function (saves what backward needs) -> the plain function model.py calls.
The PyTorch references live in model.py; tests/test_kernels.py checks each op against them.
model.py uses every op here, add_rms_norm in Block between attention and the MLP.

On CUDA tensors the kernels compile for the GPU. With TRITON_INTERPRET=1 in the environment when
this module is imported, Triton runs them in numpy on the CPU instead (slow; for tests), and
model.py sends CPU tensors here too.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'  # read at import (tests set it themselves)
MAX_FUSED_SIZE = 65536         # longest row that RMSNorm holds in one block
ELEMENTWISE_BLOCK_CAP = 4096   # SwiGLU: a longer row is split over several programs
CE_BLOCK_CAP = 32768           # cross-entropy loops over the vocabulary in blocks of this size
CE_CHUNK_ELEMENTS = 2 ** 26    # logits per chunk: 1334 tokens at vocab 50304 (128 MiB in bf16)


def _num_warps(block_size):
    """About 4-8 elements per thread: more warps for longer rows."""
    return 4 if block_size <= 2048 else 8 if block_size <= 8192 else 16 if block_size <= 32768 else 32


def _rows(x):
    """(..., n) -> contiguous (rows, n); a view when x already is contiguous."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def _n_programs(x, n_rows):
    """Programs for a kernel that loops over rows (RMSNorm backward): one per SM on CUDA."""
    n_sm = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    return max(1, min(n_rows, n_sm))


# ----------------------------------------------------------------------------------------------
# RMSNorm, with an optional residual add fused in front

@triton.jit
def _rms_norm_fwd_kernel(Y_ptr, Y_row_stride, S_ptr, S_row_stride, X_ptr, X_row_stride,
                         R_ptr, R_row_stride, W_ptr, RSTD_ptr, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One program per row. s = x + r stored to S (HAS_RESIDUAL), else s = x;
    rstd = 1 / sqrt(mean(s^2) + eps);  y = (s * rstd).to(s.dtype) * w, in float32 math."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    s = tl.load(X_ptr + row * X_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R_ptr + row * R_row_stride + cols, mask=mask, other=0.0)
        s = (s.to(tl.float32) + r.to(tl.float32)).to(S_ptr.dtype.element_ty)
        tl.store(S_ptr + row * S_row_stride + cols, s, mask=mask)
    sf = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, axis=0) / n_cols + tl.cast(eps, tl.float32))
    w = tl.load(W_ptr + cols, mask=mask, other=0.0)
    y = (sf * rstd).to(s.dtype) * w
    tl.store(Y_ptr + row * Y_row_stride + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(RSTD_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(DX_ptr, DX_row_stride, DY_ptr, DY_row_stride, DS_ptr, DS_row_stride,
                         X_ptr, X_row_stride, W_ptr, RSTD_ptr, DW_ptr, DW_row_stride,
                         n_rows, n_cols, rows_per_program,
                         HAS_DS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Each program takes rows_per_program rows. With n = x * rstd and y = n * w:
    dx = rstd * (dy*w - n * mean(dy*w * n)) (+ ds, the gradient the residual stream brings);
    dw = sum over this program's rows of dy * n, one partial row per program."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r in range(row_start, row_end):
        row = tl.cast(r, tl.int64)
        x = tl.load(X_ptr + row * X_row_stride + cols, mask=mask, other=0.0)
        dy = tl.load(DY_ptr + row * DY_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        n = x.to(tl.float32) * tl.load(RSTD_ptr + row)
        dn = dy * w
        dx = tl.load(RSTD_ptr + row) * (dn - n * (tl.sum(dn * n, axis=0) / n_cols))
        if HAS_DS:
            dx += tl.load(DS_ptr + row * DS_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX_ptr + row * DX_row_stride + cols, dx.to(DX_ptr.dtype.element_ty), mask=mask)
        dw += dy * n.to(x.dtype).to(tl.float32)  # the forward multiplies w by n cast to x's dtype
    tl.store(DW_ptr + pid * DW_row_stride + cols, dw, mask=mask)


def _rms_norm_fwd(x, weight, eps, residual=None):
    """-> y, s = x (+ residual), rstd; y and s as (rows, C), rstd (rows,) float32."""
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    block = triton.next_power_of_2(n_cols)
    assert block <= MAX_FUSED_SIZE, f"RMSNorm rows of {n_cols} do not fit one block"
    if residual is None:
        r2 = s2 = x2
    else:
        r2 = _rows(residual)
        s2 = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    y2 = torch.empty(x2.shape, dtype=torch.promote_types(s2.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    _rms_norm_fwd_kernel[(n_rows,)](
        y2, y2.stride(0), s2, s2.stride(0), x2, x2.stride(0), r2, r2.stride(0),
        weight.contiguous(), rstd, n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_SIZE=block, num_warps=_num_warps(block))
    return y2, s2, rstd


def _rms_norm_bwd(dy, s2, weight, rstd, ds=None):
    """-> ds2 (rows, C) in s's dtype (plus ds if given), dw in weight's dtype."""
    dy2 = _rows(dy)
    ds2 = _rows(ds) if ds is not None else dy2
    n_rows, n_cols = s2.shape
    block = triton.next_power_of_2(n_cols)
    n_programs = _n_programs(s2, n_rows)
    dx = torch.empty_like(s2)
    dw_partial = torch.empty(n_programs, n_cols, dtype=torch.float32, device=s2.device)
    _rms_norm_bwd_kernel[(n_programs,)](
        dx, dx.stride(0), dy2, dy2.stride(0), ds2, ds2.stride(0), s2, s2.stride(0),
        weight.contiguous(), rstd, dw_partial, dw_partial.stride(0),
        n_rows, n_cols, triton.cdiv(n_rows, n_programs),
        HAS_DS=ds is not None, BLOCK_SIZE=block, num_warps=_num_warps(block))
    return dx, dw_partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y2, x2, rstd = _rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y2.view(*x.shape[:-1], y2.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_bwd(dy, x2, weight, rstd)
        return dx.view(dy.shape), dw, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y2, s2, rstd = _rms_norm_fwd(x, weight, eps, residual=residual)
        ctx.save_for_backward(s2, weight, rstd)
        ctx.dtypes = x.dtype, residual.dtype
        shape = (*x.shape[:-1], x.shape[-1])
        return s2.view(shape), y2.view(shape)

    @staticmethod
    def backward(ctx, ds, dy):
        s2, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_bwd(dy, s2, weight, rstd, ds=ds)  # d(x + r)/dx = d(x + r)/dr = 1
        dx = dx.view(dy.shape)
        return dx.to(ctx.dtypes[0]), dx.to(ctx.dtypes[1]), dw, None


def rms_norm(x, weight, eps):
    """model.rms_norm(x, weight, eps), fused: one read of x, one write of y."""
    return RMSNormFunction.apply(x, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    """-> (x + residual, model.rms_norm(x + residual, weight, eps)) in one pass."""
    return AddRMSNormFunction.apply(x, residual, weight, eps)


# ----------------------------------------------------------------------------------------------
# RoPE

@triton.jit
def _rope_kernel(Y_ptr, X_ptr, X_row_stride, COS_ptr, SIN_ptr, COS_b_stride, COS_t_stride,
                 seq_len, n_heads, half, BACKWARD: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per token row (b, t) of X (B*T, n_heads * 2*half); every head's halves
    (x1, x2) turn by the position's angle: y1 = x1 cos - x2 sin, y2 = x1 sin + x2 cos.
    BACKWARD turns by minus the angle (sin -> -sin): the transpose, hence the gradient."""
    row = tl.program_id(0).to(tl.int64)
    b, t = row // seq_len, row % seq_len
    d = tl.arange(0, BLOCK_D)
    h = tl.arange(0, BLOCK_H)
    cs_offs = b * COS_b_stride + t * COS_t_stride + d
    cos = tl.load(COS_ptr + cs_offs, mask=d < half, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(SIN_ptr + cs_offs, mask=d < half, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:
        sin = -sin
    offs = row * X_row_stride + h[:, None] * (2 * half) + d[None, :]  # (BLOCK_H, BLOCK_D)
    mask = (h[:, None] < n_heads) & (d[None, :] < half)
    x1 = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X_ptr + offs + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y_ptr + offs, (x1 * cos - x2 * sin).to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(Y_ptr + offs + half, (x1 * sin + x2 * cos).to(Y_ptr.dtype.element_ty), mask=mask)


def _rope(x, cos, sin, backward=False):
    """Rotate x, any strides, by the angles of its tokens; same shape out. Two layouts:
    x (B, H, T, hd) with cos, sin (T, hd/2) shared by the batch or (B, 1, T, hd/2) per lane
    (model.extend's KV cache), stored as (B, T, H, hd); or packed x (N, H, hd) with (N, 1, hd/2).
    Either way the kernel sees token rows (B*T or N, H*hd) and finds a row's angles at
    (row // T) * b_stride + (row % T) * t_stride of the table (b_stride 0 when shared).
    """
    H, hd = x.size(1), x.size(-1)
    xt = x.transpose(1, 2) if x.dim() == 4 else x  # token dims first: (B, T, H, hd) or (N, H, hd)
    xt = xt.contiguous()  # no copy for q, k straight from their projections
    y = torch.empty_like(xt)
    T = xt.size(-3)  # tokens per row: T, or N for packed rows
    cos, sin = (t[:, 0] if t.dim() > 2 else t for t in (cos, sin))  # drop the head axis
    cos, sin = cos.contiguous(), sin.contiguous()          # (T, hd/2) or (B, T, hd/2)
    assert cos.shape[-2:] == (T, hd // 2), f"rope table {tuple(cos.shape)} for x {tuple(x.shape)}"
    b_stride = cos.stride(0) if cos.dim() == 3 and cos.size(0) > 1 else 0
    _rope_kernel[(xt.numel() // (H * hd),)](
        y, xt, H * hd, cos, sin, b_stride, cos.stride(-2), T, H, hd // 2, BACKWARD=backward,
        BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(hd // 2),
        num_warps=_num_warps(H * hd))
    return y.transpose(1, 2) if x.dim() == 4 else y


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope(q, cos, sin), _rope(k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return _rope(dq, cos, sin, backward=True), _rope(dk, cos, sin, backward=True), None, None


def rope(q, k, cos, sin):
    """(model.apply_rope(q, cos, sin), model.apply_rope(k, cos, sin)), layouts as _rope:
    q (B, nh, T, hd) and k (B, nkv, T, hd), or packed q (N, nh, hd) and k (N, nkv, hd)."""
    return RoPEFunction.apply(q, k, cos, sin)


# ----------------------------------------------------------------------------------------------
# SwiGLU

@triton.jit
def _swiglu_fwd_kernel(C_ptr, A_ptr, B_ptr, row_stride, n_cols, BLOCK_SIZE: tl.constexpr):
    """Program (row, j) takes columns [j*BLOCK_SIZE, (j+1)*BLOCK_SIZE) of the row:
    c = silu(a) * b = a * sigmoid(a) * b, silu in float32 cast to a's dtype (as F.silu)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    a = tl.load(A_ptr + row * row_stride + cols, mask=mask, other=0.0)
    b = tl.load(B_ptr + row * row_stride + cols, mask=mask, other=0.0)
    af = a.to(tl.float32)
    c = (af * tl.sigmoid(af)).to(a.dtype).to(tl.float32) * b.to(tl.float32)
    tl.store(C_ptr + row * row_stride + cols, c.to(C_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DA_ptr, DB_ptr, DC_ptr, A_ptr, B_ptr, row_stride, n_cols,
                       BLOCK_SIZE: tl.constexpr):
    """With s = sigmoid(a): da = dc * b * s * (1 + a * (1 - s)),  db = dc * a * s."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    offs = row * row_stride + cols
    a = tl.load(A_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dc = tl.load(DC_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(DA_ptr + offs, (dc * b * s * (1 + a * (1 - s))).to(DA_ptr.dtype.element_ty), mask=mask)
    tl.store(DB_ptr + offs, (dc * a * s).to(DB_ptr.dtype.element_ty), mask=mask)


def _elementwise_grid(x2):
    """(rows, blocks per row) and BLOCK_SIZE for a (rows, n) elementwise kernel."""
    block = min(triton.next_power_of_2(x2.shape[1]), ELEMENTWISE_BLOCK_CAP)
    return (x2.shape[0], triton.cdiv(x2.shape[1], block)), block


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a2, b2 = _rows(a), _rows(b)
        c = torch.empty(a2.shape, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
        grid, block = _elementwise_grid(a2)
        _swiglu_fwd_kernel[grid](c, a2, b2, a2.stride(0), a2.shape[1],
                                 BLOCK_SIZE=block, num_warps=_num_warps(block))
        ctx.save_for_backward(a2, b2)
        return c.view(a.shape)

    @staticmethod
    def backward(ctx, dc):
        a2, b2 = ctx.saved_tensors
        dc2 = _rows(dc)
        da, db = torch.empty_like(a2), torch.empty_like(b2)
        grid, block = _elementwise_grid(a2)
        _swiglu_bwd_kernel[grid](da, db, dc2, a2, b2, a2.stride(0), a2.shape[1],
                                 BLOCK_SIZE=block, num_warps=_num_warps(block))
        return da.view(dc.shape), db.view(dc.shape)


def swiglu(a, b):
    """model.swiglu(a, b) = silu(a) * b, fused."""
    return SwiGLUFunction.apply(a, b)


# ----------------------------------------------------------------------------------------------
# Linear + cross-entropy, chunked over tokens (Liger's fused linear cross-entropy)

@triton.jit
def _cross_entropy_kernel(X_ptr, X_row_stride, Y_ptr, KEEP_ptr, N_KEEP_ptr, LOSS_ptr, n_cols,
                          BLOCK_SIZE: tl.constexpr):
    """One program per row x of logits, target y, kept or not, with n = max(number kept, 1):
    loss = (logsumexp(x) - x[y]) / n, and x is overwritten in place by the loss's gradient,
    (softmax(x) - onehot(y)) / n; both are 0 for a row not kept. logsumexp is computed online
    over blocks of the row (running max m and sum d of exp(x - m)), so any vocabulary fits."""
    row = tl.program_id(0).to(tl.int64)
    X_ptr += row * X_row_stride
    y = tl.load(Y_ptr + row)
    keep = tl.load(KEEP_ptr + row)
    scale = tl.where(keep, 1.0 / tl.maximum(tl.load(N_KEEP_ptr).to(tl.float32), 1.0), 0.0)
    m = float('-inf')
    d = 0.0
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        x = tl.load(X_ptr + cols, mask=cols < n_cols, other=float('-inf')).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    x_y = tl.load(X_ptr + y, mask=keep, other=0.0).to(tl.float32)  # masked: y may be padding
    tl.store(LOSS_ptr + row, (lse - x_y) * scale)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        x = tl.load(X_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) * scale - tl.where(cols == y, scale, 0.0)
        tl.store(X_ptr + cols, grad.to(X_ptr.dtype.element_ty), mask=cols < n_cols)


def _linear_cross_entropy_fwd(h, weight, targets, loss_mask, chunk_size, need_grad):
    """-> loss, grad_h (N, C), grad_w (V, C) float32; the grads None when not needed."""
    h2 = h.reshape(-1, h.size(-1))                                 # (N, C)
    n_rows, V = h2.size(0), weight.size(0)
    y = targets.reshape(-1).contiguous()
    keep = (loss_mask.reshape(-1).bool().contiguous() if loss_mask is not None
            else torch.ones(n_rows, dtype=torch.bool, device=h.device))
    n_keep = keep.sum()  # stays on the device: no host sync
    losses = torch.empty(n_rows, dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h2) if need_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_grad else None
    chunk = chunk_size or max(1, CE_CHUNK_ELEMENTS // V)
    block = min(triton.next_power_of_2(V), CE_BLOCK_CAP)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        h_chunk = h2[start:end]
        logits = torch.nn.functional.linear(h_chunk, weight)    # (chunk, V) as the reference
        _cross_entropy_kernel[(end - start,)](
            logits, logits.stride(0), y[start:end], keep[start:end], n_keep, losses[start:end], V,
            BLOCK_SIZE=block, num_warps=_num_warps(block))
        if need_grad:  # logits now hold d loss / d logits
            grad_h[start:end] = logits @ weight        # matmuls in the logits' dtype (autocast's)
            grad_w += logits.t() @ h_chunk
    return losses.sum(), grad_h, grad_w


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, loss_mask, chunk_size, need_grad):
        loss, grad_h, grad_w = _linear_cross_entropy_fwd(h, weight, targets, loss_mask,
                                                         chunk_size, need_grad)
        if need_grad:  # the whole backward was done chunk by chunk above
            ctx.save_for_backward(grad_h.view(h.shape), grad_w)
            ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype), (grad_w * grad_loss).to(ctx.weight_dtype),
                None, None, None, None)


def linear_cross_entropy(h, weight, targets, loss_mask=None, chunk_size=None):
    """model.masked_cross_entropy's loss without its (N, vocab) logits.

    h (B, T, C) or packed (N, C), weight (V, C), targets and loss_mask (bool, None for all)
    shaped as h without its last axis.
    Logits are made chunk_size tokens at a time (default: CE_CHUNK_ELEMENTS / V) and their
    gradient is folded into grad_h and grad_w during the forward, so the backward only scales.
    Targets of masked-out positions are never read. No position kept: loss 0 with zero
    gradients (the reference gives nan), so such a batch leaves the weights alone.
    """
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return LinearCrossEntropyFunction.apply(h, weight, targets, loss_mask, chunk_size, need_grad)
