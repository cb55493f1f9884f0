"""
A Llama-style GPT, small enough to read in one sitting.

token embedding -> n_layer x [RMSNorm -> causal self-attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> output projection. No biases.

Several dialogs may share a row: `doc_ids` (B, T) says which dialog each token belongs to, and
attention never crosses from one to another. RoPE makes attention depend only on relative
positions, so a dialog packed at offset 100 of a row computes exactly what it would at offset 0.

The PyTorch functions below are the reference; kernels.py holds fused Triton versions of the
same math, used on CUDA when `kernels` is 'auto' or 'triton'. Both paths share every parameter.
"""
import contextlib
import copy
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import kernels as triton_kernels  # needs triton; absent or broken -> PyTorch everywhere
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
    norm_eps: float = 1e-5
    kernels: str = 'auto'      # 'auto' | 'triton' | 'torch'

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd {self.n_embd} must split into {self.n_head} heads of even size")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        if self.kernels not in ('auto', 'triton', 'torch'):
            raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {self.kernels!r}")


# ----------------------------------------------------------------------------------------------
# PyTorch reference functions (kernels.py must match these)

def rms_norm(x, weight, eps):
    """x / rms(x) * weight, computed in float32 and cast back (the numerical spec)."""
    xf = x.float()
    return (xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rope_table(head_dim, length, theta, device=None):
    """cos, sin of shape (length, head_dim // 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) by the position's angle. x: (B, H, T, hd)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def swiglu(a, b):
    return F.silu(a) * b


def masked_cross_entropy(h, weight, targets, loss_mask):
    """Mean cross-entropy of (h @ weight.T) over positions where loss_mask is true (all when
    None), and the logits (..., vocab). Targets where the mask is false are never read."""
    logits = F.linear(h, weight)
    targets = targets.long()
    if loss_mask is not None:
        targets = targets.masked_fill(~loss_mask, -100)  # F.cross_entropy's ignore_index
    return F.cross_entropy(logits.float().flatten(0, -2), targets.reshape(-1)), logits


def padded_count(n):
    """n rounded up to one of a few sizes, at most 1/32 more.

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
# Modules

_warned = set()


def pick_device(name):
    """'auto' -> 'cuda' when a GPU is there, else 'cpu'; any other name as given."""
    return name if name != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')


def use_triton(kernels, x):
    """Triton when asked for (or 'auto') and possible: a CUDA tensor and an importable triton."""
    if kernels == 'torch':
        return False
    ok = triton_kernels is not None and (x.is_cuda or triton_kernels.INTERPRET)
    if not ok and kernels == 'triton' and 'triton' not in _warned:
        _warned.add('triton')
        warnings.warn("kernels='triton' but Triton is unavailable here: using PyTorch")
    return ok


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, kernels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.kernels = eps, kernels

    def forward(self, x):
        if use_triton(self.kernels, x):
            return triton_kernels.rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


class KVCache:
    """Keys and values of every lane, shape (B, n_kv_head, max_len + 1, hd) per layer.

    Slot max_len is a dump: padding tokens of a lane that appends fewer tokens than the others
    are written there and never read, so every lane's cache stays exact.
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        hd = config.n_embd // config.n_head
        shape = (batch_size, config.n_kv_head, max_len + 1, hd)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.q_proj = nn.Linear(config.n_embd, config.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=False)
        self.kernels = config.kernels

    def forward(self, x, cos, sin, attn_mask=None, layout=None, cache=None, layer=0, write_pos=None):
        """x (B, T, C), or (S, C): the slots of a DialogLayout, for packed training rows."""
        if layout is not None:
            S, C = x.shape
            q = self.q_proj(x).view(S, self.n_head, self.head_dim)       # (S, nh, hd)
            k = self.k_proj(x).view(S, self.n_kv_head, self.head_dim)    # (S, nkv, hd)
            v = self.v_proj(x).view(S, self.n_kv_head, self.head_dim)
            q, k = self.rope(q, k, cos, sin)
            return self.o_proj(layout.attend(q, k, v))
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, k, cos, sin)
        if cache is not None:  # write this step's keys/values, then attend over the whole cache
            index = write_pos[:, None, :, None].expand(B, self.n_kv_head, T, self.head_dim)
            cache.k[layer].scatter_(2, index, k.to(cache.k[layer].dtype))
            cache.v[layer].scatter_(2, index, v.to(cache.v[layer].dtype))
            context = attn_mask.size(-1)
            k, v = cache.k[layer][:, :, :context], cache.v[layer][:, :, :context]
            q = q.to(k.dtype)  # under autocast the projections come out in bfloat16
        if self.n_kv_head != self.n_head:  # grouped-query attention: share each kv head
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).to(x.dtype)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))

    def rope(self, q, k, cos, sin):
        if use_triton(self.kernels, q):
            return triton_kernels.rope(q, k, cos, sin)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)
        self.kernels = config.kernels

    def forward(self, x):
        a, b = self.gate_proj(x), self.up_proj(x)
        h = triton_kernels.swiglu(a, b) if use_triton(self.kernels, x) else swiglu(a, b)
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps, config.kernels)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps, config.kernels)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask=None, keep=None, **kwargs):
        """keep: the rows whose output is needed (all when None); attention still reads every row."""
        y = self.attn(self.attn_norm(x), cos, sin, attn_mask, **kwargs)
        if keep is not None:
            x, y = x[keep], y[keep]
        if use_triton(self.mlp_norm.kernels, x):  # residual add and norm fused: one pass over x
            x, h = triton_kernels.add_rms_norm(x, y, self.mlp_norm.weight, self.mlp_norm.eps)
        else:
            x = x + y
            h = self.mlp_norm(x)
        return x + self.mlp(h)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps, config.kernels)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_table(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.init_weights()

    def init_weights(self, std=0.02):
        """nanoGPT's init: N(0, 0.02), residual projections scaled down by depth."""
        for name, p in self.named_parameters():
            if name.endswith('norm.weight'):
                nn.init.ones_(p)
            elif name.endswith(('o_proj.weight', 'down_proj.weight')):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, std=std)

    def num_params(self):
        """Every parameter, embeddings included (the number the paper reports)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, loss_mask=None, doc_ids=None):
        """idx (B, T) -> (logits, loss).

        doc_ids (B, T): which dialog of its row each token belongs to, -1 for padding; attention
        then stays within dialogs and padding is skipped. Without targets: logits (B, T, vocab)
        (zeros at padding). With targets: the mean cross-entropy over positions where loss_mask
        is true (all real positions when None), and logits: (B, T, vocab) without doc_ids; with
        them (n, vocab) of just the loss positions and a few others that round n up, in no
        particular order, since the last block and the output layer run on those rows only.
        None when the fused kernel never materialises them.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens, block_size is {self.config.block_size}")
        if doc_ids is None:  # one sequence per row: plain causal attention
            layout, x = None, self.embed(idx)
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]                       # (T, hd/2)
        else:
            layout = DialogLayout(doc_ids)
            x = self.embed(layout.gather(idx))                                    # (S, C)
            cos, sin = self.rope_cos[layout.pos][:, None], self.rope_sin[layout.pos][:, None]  # (S, 1, hd/2)
        keep = None  # slots the last block computes past its attention: all, or those with a loss
        if targets is not None and layout is not None:  # padding slots carry no loss
            loss_mask = layout.real if loss_mask is None else layout.gather(loss_mask) & layout.real
            keep = layout.loss_rows(loss_mask)
            targets, loss_mask = layout.gather(targets)[keep], loss_mask[keep]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, layout=layout, keep=keep if i == len(self.blocks) - 1 else None)
        x = self.norm(x)
        if targets is None:
            if layout is None:
                return self.lm_head(x), None
            logits = self.lm_head(x[layout.token_slot])
            return logits.new_zeros(B * T, logits.size(-1)).index_copy(0, layout.token_index, logits).view(B, T, -1), None
        if use_triton(self.config.kernels, x):
            return None, triton_kernels.linear_cross_entropy(x, self.lm_head.weight, targets, loss_mask)
        loss, logits = masked_cross_entropy(x, self.lm_head.weight, targets, loss_mask)
        return logits, loss

    # ------------------------------------------------------------------------------------------
    # Inference with a KV cache: lanes of different lengths advance together

    def new_cache(self, batch_size, max_len=None, device=None, dtype=None):
        p = self.embed.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size,
                       device or p.device, dtype or p.dtype)

    @torch.no_grad()
    def extend(self, idx, cache, lengths, n_new, rows=None):
        """Append tokens to each lane and return the logits after each lane's last new token.

        idx (B, S): new tokens, lane b's first n_new[b] are real, the rest padding.
        lengths (B,): tokens already in lane b's cache. Prefill is lengths = 0, decoding S = 1,
        splicing a tool's answer into a few lanes is S = the longest answer with rows = the
        cache rows of those lanes (the others are not computed at all).
        Returns logits (B, vocab); the caller advances lengths by n_new.
        """
        if rows is not None:  # work on a copy of these lanes' cache rows, then put it back
            part = copy.copy(cache)
            part.k, part.v = [k[rows] for k in cache.k], [v[rows] for v in cache.v]
            logits = self.extend(idx, part, lengths, n_new)
            for full, updated in zip(cache.k + cache.v, part.k + part.v):
                full[rows] = updated
            return logits
        B, S = idx.shape
        steps = torch.arange(S, device=idx.device)
        if int((lengths + n_new).max()) > cache.max_len:
            raise ValueError(f"a lane would pass the cache's {cache.max_len} tokens")
        # absolute positions; a padding token's is clamped: it only ever lands in the dump slot
        pos = (lengths[:, None] + steps).clamp(max=cache.max_len - 1)   # (B, S)
        real = steps[None, :] < n_new[:, None]
        write_pos = torch.where(real, pos, cache.max_len)  # padding goes to the dump slot
        context = int((lengths + n_new).max())
        keys = torch.arange(context, device=idx.device)
        attn_mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # (B, 1, S, context)
        cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # (B, 1, S, hd/2)
        x = self.embed(idx)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, attn_mask, cache=cache, layer=layer, write_pos=write_pos)
        last = x[torch.arange(B, device=idx.device), (n_new - 1).clamp(min=0)]  # (B, C)
        return self.lm_head(self.norm(last))

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
