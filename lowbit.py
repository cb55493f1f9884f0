"""
Decoding one token at a time from weights kept in the low-bit blocks they were stored in.

A GGUF file such as SmolLM2-135M-Instruct's stores each row of a weight matrix in blocks of 32
values: Q4_1 as d * q + m with q in 0..15, Q8_0 as d * q with q in -127..127, Q4_0 as d * q with
q in -8..7 (d and m float16). pretrained.py dequantizes them to float32, the weights every path of
model.py computes with. At batch 1 a decode step is bound by reading those weights from memory
(538 MB a token for SmolLM2-135M, ~43 ms on 2 cores); the same values as one byte each plus a
scale and offset a block (~170 MB) take a third of that. So:

    lowbit.keep_low_bits(model)   # -> how many weight matrices it found in low-bit blocks

finds the weights whose float32 values are exactly such blocks (it re-derives d, m and every q and
keeps only what reproduces the weight bit for bit: nothing is approximated) and hands
model.py's projections a byte-per-value copy of them, which serves a single float32 row without
grad on CPU. Everything else (prefill, batches, training, other devices) computes with the
float32 weights as before; a weight changed after the copy was made (an optimizer step, a load)
is no longer served from it. Per block, x . (d q + m) = d (x . q) + m sum(x): the same products
summed in another order, so the logits agree with the float32 path to float32 rounding.

The product is a loop of C (C_SOURCE), built with the C++ compiler torch.compile would use and
called through ctypes: one pass over the codes, vectorized by the compiler, on torch's thread
count. Where it does not build (no compiler, no OpenMP), keep_low_bits keeps nothing.
"""
import ctypes
import os
import subprocess
import tempfile

import torch

from model import cxx_compiler

BLOCK = 32


def formats(w):
    """The block formats (GGUF's Q4_1, Q8_0, Q4_0) as (codes' range, scale, offset) for blocks w
    (rows, blocks, 32): the quantizer puts a block's extremes at fixed codes, so they give d and m
    up to the float16 rounding they were stored with."""
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    extreme = torch.where(high.abs() > low.abs(), high, low)  # the value of largest magnitude
    zero = torch.zeros_like(low)
    return [((0, 15), (high.double() - low.double()) / 15, low),  # Q4_1 d q + m: min 0, max 15
            ((-127, 127), extreme.abs().double() / 127, zero),   # Q8_0 d q: largest |x| at +-127
            ((-8, 7), extreme.double() / -8, zero)]               # Q4_0 d (q - 8): largest |x| at -8


def low_bit_blocks(weight):
    """weight (rows, cols) float32 -> (codes int8 (blocks, 32, rows), scale and offset (blocks, 1,
    rows)) when every block of 32 values along a row is d * q + m in one of the formats exactly,
    else None."""
    rows, cols = weight.shape
    if weight.dtype != torch.float32 or cols % BLOCK:
        return None
    w = weight.detach().cpu().view(rows, cols // BLOCK, BLOCK)
    for (low, high), scale, offset in formats(w):
        scale = scale.half().float()
        codes = torch.where(scale != 0, (w - offset) / scale, 0).round().clamp(low, high)
        if torch.equal(scale * codes + offset, w):  # in float32, as the weight was dequantized
            layout = lambda t: t.permute(1, 2, 0).contiguous()  # (rows, blocks, n) -> (blocks, n, rows)
            return layout(codes.to(torch.int8)), layout(scale), layout(offset)
    return None


# y = W x for one row x, W in blocks of 32 along each row: y[r] = sum over blocks b of
# scale[b, r] * (sum_i codes[b, i, r] x[32 b + i]) + offset[b, r] * (sum_i x[32 b + i]).
# Each thread takes 64 output rows at a time, so a step reads one 64-byte line of codes per input
# value and the compiler vectorizes the loop over the 64 rows (int8 -> float, multiply-add).
C_SOURCE = r"""
#include <stdint.h>
#define TILE 64
void matvec(const int8_t* codes, const float* scale, const float* offset, const float* x, float* y,
            int64_t blocks, int64_t rows, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r0 = 0; r0 < rows; r0 += TILE) {
        int64_t n = rows - r0 < TILE ? rows - r0 : TILE;
        float acc[TILE] = {0};
        for (int64_t b = 0; b < blocks; b++) {
            float dot[TILE] = {0}, xsum = 0;
            for (int64_t i = 0; i < 32; i++) {
                const int8_t* c = codes + (b * 32 + i) * rows + r0;
                float xi = x[b * 32 + i];
                xsum += xi;
                if (n == TILE)
                    for (int64_t r = 0; r < TILE; r++) dot[r] += c[r] * xi;
                else
                    for (int64_t r = 0; r < n; r++) dot[r] += c[r] * xi;
            }
            for (int64_t r = 0; r < n; r++)
                acc[r] += dot[r] * scale[b * rows + r0 + r] + offset[b * rows + r0 + r] * xsum;
        }
        for (int64_t r = 0; r < n; r++) y[r0 + r] = acc[r];
    }
}
"""
_library = None


def library():
    """The C loop, built once a process (None where it does not build)."""
    global _library
    if _library is None:
        _library = build() or False
    return _library or None


def build():
    """C_SOURCE as a loaded library for this machine's CPU (~0.2 s), with OpenMP threads or, where
    the compiler has no OpenMP, on one -> ctypes.CDLL, or None where it does not build."""
    compiler = cxx_compiler()
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        source, built = os.path.join(folder, 'lowbit.c'), os.path.join(folder, 'lowbit.so')
        with open(source, 'w') as f:
            f.write(C_SOURCE)
        for threads in (['-fopenmp'], []):
            command = [compiler, '-x', 'c', '-O3', '-march=native', *threads, '-shared', '-fPIC', source,
                       '-o', built]
            try:
                if subprocess.run(command, capture_output=True, timeout=120).returncode != 0:
                    continue
                library = ctypes.CDLL(built)  # loaded before its folder goes
            except (OSError, subprocess.TimeoutExpired):  # no compiler after all; a noexec /tmp
                return None
            library.matvec.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_int]
            return library
    return None


def matvec(x, codes, scale, offset):
    """x (cols,) float32 @ the weight of codes, scale, offset -> (rows,)."""
    x = x.contiguous()
    y = x.new_empty(codes.size(2))
    library().matvec(codes.data_ptr(), scale.data_ptr(), offset.data_ptr(), x.data_ptr(), y.data_ptr(),
                     codes.size(0), codes.size(2), torch.get_num_threads())
    return y


class LowBits:
    """A low-bit copy of Linear layers that share an input (q, k and v; gate and up), stacked by
    rows so one pass computes them all. Called with one row x (..., cols) -> each layer's output."""

    def __init__(self, linears, blocks):
        self.linears = linears
        self.weights = [(linear.weight, linear.weight._version) for linear in linears]
        self.sizes = [linear.out_features for linear in linears]
        self.codes, self.scale, self.offset = (torch.cat(parts, -1) for parts in zip(*blocks))

    def serves(self, x):
        """One float32 row on CPU, no grad, and the weights still the ones copied."""
        return (x.numel() == x.size(-1) and x.dtype == torch.float32 and x.device.type == 'cpu'
                and not torch.is_grad_enabled()
                and all(linear.weight is w and w._version == version
                        for linear, (w, version) in zip(self.linears, self.weights)))

    def __call__(self, x):
        y = matvec(x.reshape(-1), self.codes, self.scale, self.offset).view(*x.shape[:-1], -1)
        return y.split(self.sizes, -1) if len(self.sizes) > 1 else y


def low_bits_of(linears):
    """LowBits for these Linear layers when all their weights are low-bit blocks, else None.
    Plain nn.Linear only: a LoRA layer (finetune.py) adds to its weight's product."""
    if any(type(linear) is not torch.nn.Linear or linear.bias is not None for linear in linears):
        return None
    blocks = [low_bit_blocks(linear.weight) for linear in linears]
    return None if any(b is None for b in blocks) else LowBits(linears, blocks)


def keep_low_bits(model):
    """Give model.py's projections a low-bit copy of the weights that are low-bit blocks ->
    how many weight matrices got one (0 off CPU or without a C++ compiler)."""
    if model.lm_head.weight.device.type != 'cpu' or library() is None:
        return 0
    kept = 0
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        attn.low_bits_qkv = low_bits_of([attn.q_proj, attn.k_proj, attn.v_proj])
        attn.low_bits_out = low_bits_of([attn.o_proj])
        mlp.low_bits_gate_up = low_bits_of([mlp.gate_proj, mlp.up_proj])
        mlp.low_bits_down = low_bits_of([mlp.down_proj])
        kept += sum(len(lb.sizes) for lb in (attn.low_bits_qkv, attn.low_bits_out, mlp.low_bits_gate_up,
                                            mlp.low_bits_down) if lb is not None)
    model.low_bits_head = low_bits_of([model.lm_head])
    return kept + (model.low_bits_head is not None)

