"""
A Llama-style GPT, small enough to read in one sitting.

token embedding -> n_layer x [RMSNorm -> causal self-attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> output projection. No biases.

Three entry points, each returning one kind of thing:
    forward(idx, targets)        -> (logits (B, T, vocab), loss): nanoGPT's contract
    packed_loss(idx, targets, loss_mask, doc_ids) -> loss: training on rows packed with dialogs
    setup_cache, then prefill / decode -> next-token logits per lane: generation with a KV cache

Several dialogs may share a row: `doc_ids` (B, T) says which dialog each token belongs to, and
attention never crosses from one to another. RoPE makes attention depend only on relative
positions, so a dialog packed at offset 100 of a row computes exactly what it would at offset 0.

The PyTorch functions below are the reference; triton_kernels.py holds fused Triton versions of the
same math under the same names. Which of the two the model runs is decided when its weights are
placed on a device (`kernel_ops`), not on every call. Both paths share every parameter.
"""
import contextlib
import ctypes
import math
import os
import sys
import types
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import cpu_kernels

try:
    import triton_kernels  # needs triton; absent or broken -> PyTorch everywhere
except Exception:  # noqa: BLE001 - any import failure means "no Triton", never a crash
    triton_kernels = None


@dataclass
class GPTConfig:
    vocab_size: int = 260
    block_size: int = 256      # longest sequence (RoPE table size)
    n_layer: int = 2
    n_head: int = 2
    n_kv_head: int = 0         # grouped-query attention: 0 means n_head (plain multi-head)
    n_embd: int = 64
    mlp_hidden: int = 0        # 0 means 4 * n_embd, as the paper's models
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict = None  # Llama 3.1's long-context frequencies: factor, low_freq_factor, ...
    norm_eps: float = 1e-5
    kernels: str = 'auto'      # 'auto' | 'triton' | 'torch'

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd {self.n_embd} must split into {self.n_head} heads of even size")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")


KERNELS = ('auto', 'triton', 'torch')


# ----------------------------------------------------------------------------------------------
# Devices and dtypes: one resolver for every script

DTYPES = ('auto', 'float32', 'bfloat16')


def check_device(name):
    """None when `name` is a device this machine has, else why not (for configurator checks)."""
    if not isinstance(name, str):
        return "not a device: use auto, cpu, cuda or cuda:N"
    if name in ('auto', 'cpu'):
        return None
    if name == 'cuda' or name.startswith('cuda:'):
        index = name[5:] or '0'
        if not index.isdigit():
            return "write cuda:N with N a GPU's number"
        if not torch.cuda.is_available():
            return 'CUDA is not available on this machine: use --device=cpu (or auto)'
        count = torch.cuda.device_count()
        if int(index) >= count:
            return f'this machine has {count} GPU(s): cuda:0 to cuda:{count - 1}'
        return None
    return "not a device: use auto, cpu, cuda or cuda:N"


def resolve_device(name):
    """'auto' -> 'cuda' when a GPU is there, else 'cpu'; any other valid name as given."""
    problem = check_device(name)
    if problem:
        raise ValueError(f"device {name!r}: {problem}")
    return name if name != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')


def resolve_dtype(name, device, training=False):
    """'auto' -> 'bfloat16' on CUDA; on CPU 'bfloat16' for training where the CPU does bfloat16
    in hardware (2026-12-05, 2-core AMD Zen 4: steps 1.3x faster than float32), else 'float32'.
    Generation stays float32 on CPU, the dtype its answers and speed were measured in."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: use one of {', '.join(DTYPES)}")
    if name != 'auto':
        return name
    if device.startswith('cuda'):
        return 'bfloat16'
    return 'bfloat16' if training and cpu_has_bf16() else 'float32'


def cpu_has_bf16():
    """True where the CPU has bfloat16 instructions (AVX512-BF16 or AMX, from Linux's
    /proc/cpuinfo). Elsewhere oneDNN emulates bfloat16 and it is slower than float32."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return not flags.isdisjoint({'avx512_bf16', 'amx_bf16'})


def keep_freed_memory():
    """Make glibc keep freed blocks of up to 32 MB for reuse instead of unmapping them.

    A CPU training step frees and reallocates the same ~20 MB activations, as a batch of
    generation does its prefill and cache copies; by default glibc hands many back to the OS and
    the next use page-faults them in again (20-120k faults a training step): 8-10% of a step,
    3-8% of agent.py's batch of 1024, on 2 cores. Memory stays at the peak, as with PyTorch's
    CUDA caching allocator.
    Not glibc (macOS, musl): nothing to do.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks under 32 MB (its maximum) from the heap
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: return the heap's top only past 1 GB free
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        pass


def huge_pages(tensor):
    """Back a new CPU tensor, whose contents do not matter yet, with 2 MB pages where it spans
    them -> tensor. agent.py's KV cache is read whole every step, 64 MB a layer at 1024 lanes: over
    4 KB pages nearly every read of a lane's keys missed the TLB, and attention took ~15% longer
    (2 AMD EPYC cores). Memory malloc hands back from its heap is already paged in 4 KB pages, so
    those pages are dropped (its contents read as zeros) and fault in again as 2 MB ones. Linux
    only; where the kernel says no (THP off), nothing changes."""
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    first, last = (start + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
    if tensor.device.type == 'cpu' and last > first and sys.platform.startswith('linux'):
        try:
            madvise = ctypes.CDLL(None).madvise
            if madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 14) == 0:  # MADV_HUGEPAGE
                madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)        # MADV_DONTNEED
        except (OSError, AttributeError, TypeError):
            pass
    return tensor


HUGE_PAGE = 2 << 20


def autocast(device, dtype):
    """The context a model runs in: bfloat16 autocast, or plain float32."""
    return torch.autocast(device.split(':')[0], dtype=torch.bfloat16, enabled=dtype == 'bfloat16')


# ----------------------------------------------------------------------------------------------
# PyTorch reference functions (triton_kernels.py has fused versions under the same names)

def rms_norm(x, weight, eps):
    """x / rms(x) * weight, computed in float32 and cast back (the numerical spec)."""
    xf = x.float()
    return (xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def add_rms_norm(x, residual, weight, eps):
    """-> (x + residual, rms_norm(x + residual))."""
    x = x + residual
    return x, rms_norm(x, weight, eps)


def rope_table(head_dim, length, theta, device=None, scaling=None):
    """cos, sin of shape (length, head_dim // 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    if scaling:
        inv_freq = llama3_frequencies(inv_freq, **scaling)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def llama3_frequencies(inv_freq, factor, low_freq_factor, high_freq_factor,
                       original_max_position_embeddings, **_):
    """Llama 3.1's RoPE scaling: long wavelengths slowed by `factor`, short ones kept, the band
    between blended smoothly."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_max_position_embeddings / low_freq_factor     # longer: scaled
    high_wavelen = original_max_position_embeddings / high_freq_factor   # shorter: kept
    smooth = ((original_max_position_embeddings / wavelen - low_freq_factor)
              / (high_freq_factor - low_freq_factor))
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    return torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), blended, scaled)


def apply_rope(x, cos, sin):
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) by the position's angle. x: (B, H, T, hd)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def rope(q, k, cos, sin):
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def project(x, linears, low_bits=None):
    """x through Linear layers that all read it -> their outputs (a tensor for one layer).
    low_bits: lowbit.py's copy of their weights, one pass over all of them where it serves x."""
    if low_bits is not None and low_bits.serves(x):
        return low_bits(x)
    outputs = [cpu_kernels.linear_rows(x, linear.weight) if cpu_kernels.serves_linear(x, linear) else linear(x)
               for linear in linears]
    return outputs if len(outputs) > 1 else outputs[0]


def swiglu(a, b):
    return F.silu(a) * b


def cross_entropy(logits, targets, loss_mask=None):
    """Mean cross-entropy over positions where loss_mask is true (all when None); targets where
    the mask is false are never read."""
    targets = targets.long()
    if loss_mask is not None:
        targets = targets.masked_fill(~loss_mask, -100)  # F.cross_entropy's ignore_index
    return F.cross_entropy(logits.float().flatten(0, -2), targets.reshape(-1))


def linear_cross_entropy(h, weight, targets, loss_mask=None):
    """cross_entropy of the logits h @ weight.T (the fused kernel never materialises them)."""
    return cross_entropy(F.linear(h, weight), targets, loss_mask)


TORCH_OPS = types.SimpleNamespace(rms_norm=rms_norm, add_rms_norm=add_rms_norm, rope=rope,
                                  swiglu=swiglu, linear_cross_entropy=linear_cross_entropy)


def kernel_ops(kernels, device):
    """The ops a model on `device` runs: triton_kernels.py's when asked for ('auto', 'triton') and
    possible (CUDA and an importable triton; or Triton's CPU interpreter, for tests), else the
    PyTorch references. kernels='triton' where it is not possible warns and runs PyTorch."""
    if kernels == 'torch':
        return TORCH_OPS
    if triton_kernels is not None and (device.type == 'cuda' or triton_kernels.INTERPRET):
        return triton_kernels
    if kernels == 'triton':
        warnings.warn("kernels='triton' but Triton is unavailable here: using PyTorch")
    return TORCH_OPS


@torch.compiler.disable
def embed_eagerly(embed, idx):
    """embed(idx), outside torch.compile. Inductor's backward of a lookup adds each token's
    gradient into its row with parallel atomic adds, in an order that changes from run to run:
    same seed, another result in the last bits. Eager's is deterministic, and no slower in the
    step (2026-12-03, A/B with bf16 compiled: 116 vs 114 ms)."""
    return embed(idx)


def padded_count(n):
    """n rounded up to one of a few sizes: at most 1/32 more, or 63 more below 2,048.

    Packed batches hold a different number of tokens every step, and oneDNN compiles a new
    bfloat16 matmul kernel for every new shape: ~3 ms a call on CPU, where the matmul itself takes
    0.5 ms. Rounded up, the shapes repeat and their kernels are reused.
    """
    step = 1 << max(6, n.bit_length() - 6)
    return -(-n // step) * step


class DialogLayout:
    """Packed rows laid out for training, one dialog per grid row; computed once per forward.

    Dialogs are sorted by length and cut into a few buckets; each bucket is a (dialogs x longest)
    grid, and the grids lie end to end as one (slots, C) tensor that every layer runs on. Attention
    views each grid as (dialogs, heads, longest, hd) and is causal along its rows, so it never
    crosses dialogs, needs no mask and no gather. The few padding slots after a dialog's end are
    never attended to by its real tokens and carry no loss: they cost a little compute, nothing else.
    So do the unused slots after the last grid that round the slot count up (padded_count).
    """

    n_buckets = 8  # more: less padding, more (smaller) attention calls

    # bookkeeping on indices, run eagerly under torch.compile: traced, its Python integer
    # arithmetic would be guarded on, and every new batch shape would compile again
    @torch.compiler.disable
    def __init__(self, doc_ids):
        B, T = doc_ids.shape
        flat = doc_ids.reshape(-1)
        self.token_index = (flat >= 0).nonzero().squeeze(1)                      # (N,) into B*T
        key = flat[self.token_index] + self.token_index // T * T  # unique per (row, dialog)
        starts = torch.ones_like(key, dtype=torch.bool)
        starts[1:] = key[1:] != key[:-1]
        dialog = starts.cumsum(0) - 1                                              # (N,)
        first_token = starts.nonzero().squeeze(1)                                  # (n_dialogs,)
        pos = torch.arange(len(key), device=key.device) - first_token[dialog]      # (N,)
        lengths = torch.bincount(dialog)                                           # (n_dialogs,)
        order = lengths.argsort()                                                  # short first
        edges = torch.linspace(0, len(order), self.n_buckets + 1).long().unique().tolist()
        first_slot = torch.empty_like(lengths)  # where each dialog's row starts
        self.grids, slot_pos = [], []           # (dialogs, longest) of each grid, in slot order
        n_slots = 0
        for lo, hi in zip(edges, edges[1:]):
            n, longest = hi - lo, int(lengths[order[hi - 1]])
            first_slot[order[lo:hi]] = n_slots + longest * torch.arange(n, device=key.device)
            slot_pos.append(torch.arange(longest, device=key.device).repeat(n))
            self.grids.append((n, longest))
            n_slots += n * longest
        # slots after the last grid; at least 2: torch.compile would specialise on a size of 0 or 1
        self.unused = padded_count(n_slots + 2) - n_slots
        slot_pos.append(torch.zeros(self.unused, dtype=torch.long, device=key.device))
        n_slots += self.unused
        self.pos = torch.cat(slot_pos)                      # (S,) position of each slot in its dialog
        self.token_slot = first_slot[dialog] + pos          # (N,) slot of each real token
        self.real = torch.zeros(n_slots, dtype=torch.bool, device=key.device)
        self.real[self.token_slot] = True
        # the flat token in each slot; padding slots repeat token 0 (never attended, no loss)
        self.slot_token = torch.zeros(n_slots, dtype=torch.long, device=key.device)
        self.slot_token[self.token_slot] = self.token_index

    def gather(self, t):
        """(B, T, ...) -> (S, ...): the value at each slot."""
        return t.reshape(-1, *t.shape[2:])[self.slot_token]

    @torch.compiler.disable
    def loss_rows(self, loss_mask):
        """The slots where loss_mask (S,) is true, then others up to a padded count (padded_count)."""
        n = min(padded_count(int(loss_mask.sum())), len(loss_mask))
        return torch.argsort(~loss_mask, stable=True)[:n]

    def attend(self, q, k, v):
        """q (S, nh, hd), k and v (S, nkv, hd) -> causal attention within each dialog, (S, nh*hd)."""
        dtype, on_cpu = q.dtype, not q.is_cuda
        if on_cpu:  # PyTorch's CPU attention is slow in bfloat16: attend in float32
            q, k, v = q.float(), k.float(), v.float()
        out, sizes = [], [n * longest for n, longest in self.grids] + [self.unused]
        # split, not slices: its backward is one cat, where each slice's would zero a full tensor
        for (n, longest), qb, kb, vb in zip(self.grids, q.split(sizes), k.split(sizes), v.split(sizes)):
            qb, kb, vb = (t.view(n, longest, t.size(1), t.size(2)).transpose(1, 2) for t in (qb, kb, vb))
            if kb.size(1) != qb.size(1):  # grouped-query attention: share each kv head
                kb = kb.repeat_interleave(qb.size(1) // kb.size(1), dim=1)
                vb = vb.repeat_interleave(qb.size(1) // vb.size(1), dim=1)
            with torch.autocast('cpu', enabled=False) if on_cpu else contextlib.nullcontext():
                yb = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)  # (n, nh, longest, hd)
            out.append(yb.transpose(1, 2).reshape(n * longest, -1))
        out.append(q.new_zeros(self.unused, q.size(1) * q.size(2)))  # unused slots attend to nothing
        return torch.cat(out).to(dtype)


# ----------------------------------------------------------------------------------------------
# Modules. Each module with math that has a fused version holds `ops` (TORCH_OPS or triton_kernels.py),
# set by GPT whenever its weights move to a device.

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.ops = eps, TORCH_OPS

    def forward(self, x):
        return self.ops.rms_norm(x, self.weight, self.eps)


def reuse(tensor, shape, device, dtype):
    """tensor if it has this shape, device and dtype, else a new empty one."""
    if (tensor is not None and tensor.shape == shape and tensor.dtype == dtype
            and tensor.device == torch.device(device)):
        return tensor
    return huge_pages(torch.empty(shape, device=device, dtype=dtype))


# Tokens a decode step runs through all blocks at once in the C loops' path (GPT._through_blocks).
# A prefill of 1024 prompts is ~33k tokens: their MLP's (33k, 256) activations, 34 MB, miss the
# CPU's caches and its products ran at ~60 GFLOP/s against ~170 at 1k rows (2 AMD EPYC cores).
GROUP_TOKENS = 1024


@dataclass
class DecodeStep:
    """Where the new tokens of one decode call go, computed once for every layer. The layers
    run on the N real tokens only, lane by lane (a lane given fewer than S leaves padding out);
    PyTorch's attention lays their queries out as a (B, S) grid over the lanes' cache rows."""
    slot: torch.Tensor       # (N,) each real token's place in the flattened (B, S) grid
    cache_row: torch.Tensor  # (N,) its lane's cache row
    cache_pos: torch.Tensor  # (N,) its position, where its key and value are written
    lengths: torch.Tensor    # (B,) each lane's cached tokens before these
    n_new: torch.Tensor      # (B,) its real new tokens: the first n_new[b] of its S
    rows: torch.Tensor       # (B,) the lanes' cache rows
    all_rows: bool           # rows is every cache row, in order
    ops: object              # norms and SwiGLU: cpu_kernels in a float32 step on a CPU they serve, else the model's
    attn_mask: torch.Tensor = None  # (B, 1, S, context) which cached keys each query of the grid
                                    # sees: PyTorch's attention only


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.q_proj = nn.Linear(config.n_embd, config.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=False)
        self.ops = TORCH_OPS
        self.k_cache = self.v_cache = None  # (lanes, n_kv_head, max_len, hd): setup_cache
        self.keys_in_tiles = False          # k_cache as cpu_kernels.attend keeps it (key_tiles_shape)
        self.low_bits_qkv = self.low_bits_out = None  # lowbit.py's copies, for decoding

    def forward(self, x, cos, sin, layout=None, step=None):
        """x (B, T, C): causal rows, or new tokens of cached lanes with `step`; or (S, C): the
        slots of a DialogLayout (packed training rows)."""
        if layout is not None:
            S, C = x.shape
            q = self.q_proj(x).view(S, self.n_head, self.head_dim)       # (S, nh, hd)
            k = self.k_proj(x).view(S, self.n_kv_head, self.head_dim)    # (S, nkv, hd)
            v = self.v_proj(x).view(S, self.n_kv_head, self.head_dim)
            q, k = self.ops.rope(q, k, cos, sin)
            return self.o_proj(layout.attend(q, k, v))
        if step is not None:  # (N, C): the real new tokens of cached lanes
            N, C = x.shape
            q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj), self.low_bits_qkv)
            if self.keys_in_tiles:  # rotation, cache writes and attention in one C loop
                y = cpu_kernels.attend(*(t.float() for t in (q, k, v, cos, sin)), self.k_cache, self.v_cache,
                                       step.rows, step.lengths, step.n_new)
            else:
                q = q.view(N, self.n_head, self.head_dim)
                k = k.view(N, self.n_kv_head, self.head_dim)
                v = v.view(N, self.n_kv_head, self.head_dim)
                q, k = self.ops.rope(q, k, cos, sin)
                y = self.attend_cache(q, k, v, step)
            return project(y.to(x.dtype), (self.o_proj,), self.low_bits_out)
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = self.ops.rope(q, k, cos, sin)
        y = F.scaled_dot_product_attention(q, self.share_kv(k), self.share_kv(v), is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))

    def share_kv(self, t):
        """Grouped-query attention: each kv head serves n_head / n_kv_head query heads."""
        group = self.n_head // self.n_kv_head
        return t if group == 1 else t.repeat_interleave(group, dim=1)

    def setup_cache(self, batch_size, max_len, device, dtype):
        shape = (batch_size, self.n_kv_head, max_len, self.head_dim)
        self.keys_in_tiles = cpu_kernels.attends(device, dtype, self.head_dim)
        k_shape = cpu_kernels.key_tiles_shape(*shape) if self.keys_in_tiles else shape
        # the last cache again where it fits: a new one's pages fault in as they are first
        # written (~65k faults for agent.py's 1024 lanes on CPU, ~5% of its batch)
        self.k_cache = reuse(self.k_cache, k_shape, device, dtype)
        self.v_cache = reuse(self.v_cache, shape, device, dtype)
        if not self.keys_in_tiles:  # PyTorch's attention reads whole rows, masking what no token
            self.k_cache.zero_()      # wrote; the C loop reads only what was written
            self.v_cache.zero_()

    def attend_cache(self, q, k, v, step):
        """Write the new keys and values (N, nkv, hd) into their lanes' cache rows, then attend
        over them from the queries (N, nh, hd) -> (N, nh * hd)."""
        self.k_cache[step.cache_row, :, step.cache_pos] = k.to(self.k_cache.dtype)
        self.v_cache[step.cache_row, :, step.cache_pos] = v.to(self.v_cache.dtype)
        B, _, S, context = step.attn_mask.shape
        if len(q) == B * S:  # every lane got S tokens: the queries are the grid
            grid = q
        else:  # padding queries are zeros; what they attend to is dropped below
            grid = q.new_zeros(B * S, self.n_head, self.head_dim)
            grid[step.slot] = q
        # under autocast the projections come out in bfloat16: attend in the cache's dtype
        grid = grid.view(B, S, self.n_head, self.head_dim).transpose(1, 2).to(self.v_cache.dtype)
        rows = slice(None) if step.all_rows else step.rows
        k, v = self.k_cache[rows, :, :context], self.v_cache[rows, :, :context]
        # CPU's attention serves each kv head to its query heads itself; CUDA's masked one copies
        shared = k.device.type == 'cpu' and self.n_head > self.n_kv_head
        if not shared:
            k, v = self.share_kv(k), self.share_kv(v)
        y = F.scaled_dot_product_attention(grid, k, v, attn_mask=step.attn_mask,
                                           enable_gqa=shared)                        # (B, nh, S, hd)
        y = y.transpose(1, 2).reshape(B * S, self.n_head * self.head_dim)
        return y if len(q) == B * S else y[step.slot]


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)
        self.ops = TORCH_OPS
        self.low_bits_gate_up = self.low_bits_down = None  # lowbit.py's copies, for decoding

    def forward(self, x, ops=None):
        gate, up = project(x, (self.gate_proj, self.up_proj), self.low_bits_gate_up)
        return project((ops or self.ops).swiglu(gate, up), (self.down_proj,), self.low_bits_down)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        self.ops = TORCH_OPS

    def forward(self, x, cos, sin, layout=None, step=None, keep=None):
        """keep: the rows whose output is needed (all when None); attention still reads every row."""
        ops = self.ops if step is None else step.ops
        y = self.attn(ops.rms_norm(x, self.attn_norm.weight, self.attn_norm.eps), cos, sin, layout, step)
        if keep is not None:
            x, y = x[keep], y[keep]
        x, h = ops.add_rms_norm(x, y, self.mlp_norm.weight, self.mlp_norm.eps)  # one pass over x
        return x + self.mlp(h, ops)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.low_bits_head = None  # lowbit.py's copy, for decoding
        self._transposed = None  # decode_blocks' copies of the weights, or False: _weights_in_caches
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_table(config.n_embd // config.n_head, config.block_size, config.rope_theta,
                              scaling=config.rope_scaling)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.ops = TORCH_OPS
        self.grad_checkpoint = False  # recompute each block's activations in backward (train.py sets it)
        self.init_weights()
        self._pick_ops()

    def init_weights(self, std=0.02):
        """nanoGPT's init: N(0, 0.02), residual projections scaled down by depth."""
        for name, p in self.named_parameters():
            if name.endswith('norm.weight'):
                nn.init.ones_(p)
            elif name.endswith(('o_proj.weight', 'down_proj.weight')):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, std=std)

    def _apply(self, fn, *args, **kwargs):
        """.to(), .cuda(), .cpu() all pass here: the weights moved, so pick the kernels again (and
        copy them again for decode_blocks)."""
        super()._apply(fn, *args, **kwargs)
        self._transposed = None
        self._pick_ops()
        return self

    def _pick_ops(self):
        ops = kernel_ops(self.config.kernels, self.embed.weight.device)
        for module in self.modules():
            if hasattr(module, 'ops'):
                module.ops = ops

    @classmethod
    def from_checkpoint(cls, path, device='cpu', kernels=None):
        """A trained model from out_dir (or its ckpt.pt) -> (model in eval mode, checkpoint).
        kernels: another choice than the saved one (the weights are the same either way)."""
        ckpt = load_checkpoint(path)
        args = {**ckpt['model_args'], **({'kernels': kernels} if kernels else {})}
        try:
            model = cls(GPTConfig(**args))
            model.load_state_dict(ckpt['model'])
        except (TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: its weights do not fit its model_args "
                                  f"({_first_line(e)})") from None
        return model.to(device).eval(), ckpt

    def num_params(self):
        """Every parameter, embeddings included (the number the paper reports)."""
        return sum(p.numel() for p in self.parameters())

    def _check_length(self, T):
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens, block_size is {self.config.block_size}")

    # ------------------------------------------------------------------------------------------
    # Training and scoring

    def forward(self, idx, targets=None, loss_mask=None, doc_ids=None):
        """idx (B, T) -> (logits (B, T, vocab), loss; None without targets).

        loss: the mean cross-entropy over positions where loss_mask is true (all when None).
        doc_ids (B, T): which dialog of its row each token belongs to, -1 for padding; attention
        then stays within dialogs, and padding gets zero logits and no loss.
        """
        B, T = idx.shape
        self._check_length(T)
        if doc_ids is None:
            x = self.embed(idx)
            for block in self.blocks:
                x = block(x, self.rope_cos[:T], self.rope_sin[:T])
            logits = self.lm_head(self.norm(x))
        else:
            layout = DialogLayout(doc_ids)
            x = self.norm(self._packed_blocks(idx, layout)[layout.token_slot])          # (N, C)
            logits = self.lm_head(x)
            logits = logits.new_zeros(B * T, logits.size(-1)).index_copy(0, layout.token_index, logits)
            logits = logits.view(B, T, -1)
            loss_mask = doc_ids >= 0 if loss_mask is None else loss_mask & (doc_ids >= 0)
        loss = None if targets is None else cross_entropy(logits, targets, loss_mask)
        return logits, loss

    def packed_loss(self, idx, targets, loss_mask, doc_ids):
        """forward's loss on packed rows, for training: no logits where there is no loss.

        The last block runs past its attention, and the output layer runs, at the loss positions
        only (and a few more, padded_count); on CUDA the fused cross-entropy never holds their
        logits either.
        """
        self._check_length(idx.size(1))
        layout = DialogLayout(doc_ids)
        loss_mask = layout.real if loss_mask is None else layout.gather(loss_mask) & layout.real  # (S,)
        keep = layout.loss_rows(loss_mask)
        x = self.norm(self._packed_blocks(idx, layout, keep))                          # (len(keep), C)
        return self.ops.linear_cross_entropy(x, self.lm_head.weight, layout.gather(targets)[keep],
                                             loss_mask[keep])

    def _packed_blocks(self, idx, layout, keep=None):
        """Every block over the layout's slots -> (S, C); the last one past its attention only
        at the slots in keep (all when None)."""
        x = embed_eagerly(self.embed, layout.gather(idx))                               # (S, C)
        cos, sin = self.rope_cos[layout.pos][:, None], self.rope_sin[layout.pos][:, None]  # (S, 1, hd/2)
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            block_keep = keep if i == len(self.blocks) - 1 else None
            if recompute:  # keep each block's input only; backward runs the block again
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, layout=layout, keep=block_keep,
                                                      use_reentrant=False)
            else:
                x = block(x, cos, sin, layout=layout, keep=block_keep)
        return x

    # ------------------------------------------------------------------------------------------
    # Generation with a KV cache: lanes of different lengths advance together

    def setup_cache(self, batch_size, max_len=None, dtype=None):
        """A KV cache for batch_size lanes of up to max_len tokens (block_size), held by the
        attention modules. Every lane starts empty; cache_lengths counts its tokens. The weights
        decoding reads are the weights as they are at the first decode after this call (C loops'
        copies are made then, see _weights_in_caches)."""
        self._transposed = None
        max_len = max_len or self.config.block_size
        self._check_length(max_len)
        weight = self.embed.weight
        for block in self.blocks:
            block.attn.setup_cache(batch_size, max_len, weight.device, dtype or weight.dtype)
        self.cache_lengths = torch.zeros(batch_size, dtype=torch.long, device=weight.device)
        self.cache_rows = torch.arange(batch_size, device=weight.device)  # each lane's cache row
        self.cache_max_len = max_len

    def keep_lanes(self, keep):
        """Drop the lanes where keep (bool per lane) is false: finished lanes cost nothing. The C
        attention finds a lane's row through cache_rows, so only that shrinks; PyTorch's reads
        the rows in order, so the kept ones are copied together."""
        self.cache_lengths, self.cache_rows = self.cache_lengths[keep], self.cache_rows[keep]
        if not self.blocks[0].attn.keys_in_tiles:
            for block in self.blocks:
                block.attn.k_cache, block.attn.v_cache = block.attn.k_cache[keep], block.attn.v_cache[keep]
            self.cache_rows = torch.arange(len(self.cache_rows), device=self.cache_rows.device)

    @torch.no_grad()
    def prefill(self, idx, lengths):
        """Start every lane anew with its prompt: idx (B, T) right-padded, lengths (B,) ->
        the next-token logits after each prompt (B, vocab)."""
        self.cache_lengths.zero_()
        return self.decode(idx, lengths)

    @torch.no_grad()
    def decode(self, idx, n_new=None, rows=None, every=False):
        """Append tokens to lanes -> the next-token logits after each lane's last new one (B, vocab),
        or with every=True after each new token (N, vocab), lane by lane, n_new[b] rows each: a
        draft checked in one pass.

        idx (B, S): lane b's first n_new[b] tokens are real (all S when None), the rest padding;
        a lane given none adds nothing. rows: which of the cache's lanes these B are (None: all),
        so splicing a tool's answer into a few lanes computes those lanes only. Lowering
        cache_lengths afterwards takes tokens back out: the next ones overwrite them.
        """
        B, S = idx.shape
        device = idx.device
        steps = torch.arange(S, device=device)
        n_new = torch.full((B,), S, device=device) if n_new is None else n_new
        lengths = self.cache_lengths if rows is None else self.cache_lengths[rows]
        context = int((lengths + n_new).max())
        if context > self.cache_max_len:
            raise ValueError(f"a lane would pass the cache's {self.cache_max_len} tokens")
        grid_pos = lengths[:, None] + steps                                           # (B, S)
        slot = (steps[None, :] < n_new[:, None]).flatten().nonzero().squeeze(1)      # (N,) real tokens
        lane, pos = slot // S, grid_pos.flatten()[slot]
        cache_rows = self.cache_rows if rows is None else self.cache_rows[rows]
        attn = self.blocks[0].attn
        in_c = (cpu_kernels.serves(device, self.embed.weight.dtype)  # float32 throughout, on CPU
                and not torch.is_autocast_enabled(device.type))
        sees = None  # which cached keys each query of the grid sees: PyTorch's attention only
        if not attn.keys_in_tiles:
            sees = (torch.arange(context, device=device)[None, None, :] <= grid_pos[:, :, None])[:, None]
        step = DecodeStep(slot=slot, cache_row=cache_rows[lane], cache_pos=pos, lengths=lengths, n_new=n_new,
                          rows=cache_rows, all_rows=rows is None and len(cache_rows) == len(attn.v_cache),
                          ops=cpu_kernels if in_c else self.ops, attn_mask=sees)
        cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]            # (N, 1, hd/2)
        x = self._through_blocks(self.embed(idx.flatten()[slot]), cos, sin, step)     # (N, C)
        if rows is None:
            self.cache_lengths += n_new
        else:
            self.cache_lengths[rows] += n_new
        norm = lambda x: step.ops.rms_norm(x, self.norm.weight, self.norm.eps)
        if every:
            return project(norm(x), (self.lm_head,))
        last = (n_new.cumsum(0) - 1).clamp(min=0)      # each lane's last real token (N >= 1)
        return project(norm(x[last]), (self.lm_head,), self.low_bits_head)

    def _through_blocks(self, x, cos, sin, step):
        """x (N, C), the new tokens of a decode step, through every block. In the C loops' step
        the lanes go in groups of ~GROUP_TOKENS tokens, all blocks a group at a time: its
        activations stay in the CPU's caches, and the matrix products run faster on those rows.
        (PyTorch's attention takes the whole (B, S) grid at once.)"""
        in_c = step.ops is cpu_kernels and self.blocks[0].attn.keys_in_tiles
        weights = self._weights_in_caches() if in_c else None
        if weights is not None:  # the paper's models: every block in one C call, lane groups a thread each
            attn = self.blocks[0].attn
            return cpu_kernels.decode_blocks(x, cos, sin, weights, [b.attn.k_cache for b in self.blocks],
                                             [b.attn.v_cache for b in self.blocks], step.rows, step.lengths,
                                             step.n_new, attn.n_head, self.config.norm_eps)
        if not in_c or len(x) <= GROUP_TOKENS:
            for block in self.blocks:
                x = block(x, cos, sin, step=step)
            return x
        starts = [0, *step.n_new.cumsum(0).tolist()]  # lane b's tokens: starts[b] .. starts[b + 1]
        cuts = [0]                                    # each group's first lane
        for b, start in enumerate(starts[:-1]):
            if start - starts[cuts[-1]] >= GROUP_TOKENS:
                cuts.append(b)
        cuts.append(len(starts) - 1)
        out = torch.empty_like(x)
        for l0, l1 in zip(cuts, cuts[1:]):
            t0, t1 = starts[l0], starts[l1]
            group = DecodeStep(slot=None, cache_row=None, cache_pos=None, lengths=step.lengths[l0:l1],
                               n_new=step.n_new[l0:l1], rows=step.rows[l0:l1], all_rows=False,
                               ops=step.ops)  # what the C loops read
            y = x[t0:t1]
            for block in self.blocks:
                y = block(y, cos[t0:t1], sin[t0:t1], step=group)
            out[t0:t1] = y
        return out

    def _weights_in_caches(self):
        """The blocks' weights as cpu_kernels.decode_blocks takes them (9 a block, the products'
        transposed), where they fit in a core's caches together (<= 1 MB: the paper's models, 512 KB)
        and the blocks are plain (no LoRA, no biases) -> a list, else None.

        Decided and copied once a generation (setup_cache drops both): at one lane, making the
        copies each step took as long as the step, and the checks ~45 us of its ~400. Not on the
        weights' versions: fused AdamW, which train.py steps between evaluations, changes weights
        without bumping them."""
        if self._transposed is not None:  # False: this model is not served
            return self._transposed or None
        c, attn = self.config, self.blocks[0].attn
        products = lambda block: (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.o_proj,
                                  block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj)
        linears = [m for block in self.blocks for m in products(block)]
        plain = all(type(m) is nn.Linear and m.bias is None for m in linears)
        small = sum(m.weight.numel() for m in linears) <= 2 ** 18  # float32 values: 1 MB
        shapes = (c.n_embd % 16 == 0 and c.mlp_hidden % 16 == 0 and attn.n_kv_head * attn.head_dim % 16 == 0
                  and attn.n_head * attn.head_dim == c.n_embd)
        self._transposed = False
        if plain and small and shapes:
            self._transposed = []
            for block in self.blocks:
                q, k, v, o, gate, up, down = (m.weight.t().contiguous() for m in products(block))
                self._transposed += [block.attn_norm.weight, q, k, v, o, block.mlp_norm.weight, gate, up, down]
        return self._transposed or None

    # ------------------------------------------------------------------------------------------
    # Training helpers

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on matrices (embeddings included), none on norm weights."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        fused = device_type in ('cuda', 'cpu')  # fused AdamW runs on both since torch 2.4
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention."""
        c = self.config
        matmul_params = self.num_params() - self.embed.weight.numel() * (not c.tie_embeddings)
        hd = c.n_embd // c.n_head
        attention = 12 * c.n_layer * c.n_head * hd * seq_len // 2  # causal: half the scores
        return 6 * matmul_params + attention

    def estimate_mfu(self, tokens_per_s, seq_len, peak_flops):
        """Model FLOPs utilisation: achieved FLOP/s over the device's peak."""
        return self.flops_per_token(seq_len) * tokens_per_s / peak_flops


# ----------------------------------------------------------------------------------------------
# Checkpoints: written by train.py, read here by everyone

class CheckpointError(ValueError):
    """A checkpoint that cannot be used; its message is one line naming the file."""


CHECKPOINT_KEYS = ('model', 'model_args', 'config', 'tokenizer')  # what any use of one needs


def _first_line(e):
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def load_checkpoint(path):
    """out_dir/ckpt.pt (or the file itself) as plain values, on the CPU, checked.

    weights_only: tensors, numbers, strings, lists and dicts, nothing else. A checkpoint is a
    file people share, and unpickling any other object can run code.
    """
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: train one with python train.py "
                              f"--out_dir={os.path.dirname(path) or '.'}")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the file holds, one line says so
        if 'Weights only load failed' in str(e):
            raise CheckpointError(f"{path} holds pickled Python objects, not just tensors, numbers "
                                  f"and strings: refused, since loading it could run code") from None
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {_first_line(e)}); it is "
                              f"corrupt or not a checkpoint") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a nano-itl checkpoint (missing {', '.join(missing)})")
    return ckpt
