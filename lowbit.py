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

The product is a loop of C (cpu_kernels.py's matvec): one pass over the codes, 64 output rows at
a time, vectorized by the compiler. Where it does not build (no compiler), keep_low_bits keeps
nothing.
"""
import torch

from cpu_kernels import library, matvec

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
    how many weight matrices got one (0 off CPU or without a C++ compiler). For a model that is
    done training (sample.py, the bench): a copy stops serving when its weight is replaced or
    changed in place by an op that bumps its version, but fused AdamW (train.py's) does not."""
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

