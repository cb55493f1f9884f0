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
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


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
    """Mean cross-entropy of (h @ weight.T) over masked positions, and those logits.

    Only masked positions go through the output layer: the others would be thrown away.
    """
    select = loss_mask.reshape(-1) if loss_mask is not None else slice(None)
    h, targets = h.reshape(-1, h.size(-1))[select], targets.reshape(-1)[select]
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.float(), targets.long()), logits


class DialogLayout:
    """Where the real tokens of packed rows sit; computed once per forward from doc_ids (B, T).

    Training runs every layer on the N real tokens only, flattened to (N, C): padding costs
    nothing. Attention alone needs dialogs side by side, so it scatters q, k, v into grids with
    one dialog per row, runs causal attention there, and gathers back: attention can never cross
    dialogs, and needs no (T, T) mask. Dialogs are sorted by length into a few buckets, each grid
    padded to its own longest dialog, so the grids hold little padding.
    """

    def __init__(self, doc_ids, n_buckets=4):
        B, T = doc_ids.shape
        flat = doc_ids.reshape(-1)
        self.token_index = (flat >= 0).nonzero().squeeze(1)                      # (N,) into B*T
        row = self.token_index // T
        key = flat[self.token_index] + row * T               # unique per (row, dialog)
        starts = torch.ones_like(key, dtype=torch.bool)
        starts[1:] = key[1:] != key[:-1]
        dialog = starts.cumsum(0) - 1                                              # (N,)
        first_token = starts.nonzero().squeeze(1)                                  # (n_dialogs,)
        self.pos = torch.arange(len(key), device=key.device) - first_token[dialog]  # (N,)
        lengths = torch.bincount(dialog)                                           # (n_dialogs,)
        order = lengths.argsort()                                                  # short first
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=order.device)
        token_rank = rank[dialog]                                                  # (N,)
        self.buckets = []  # (tokens in the bucket, their slot in its grid, dialogs, longest)
        edges = torch.linspace(0, len(order), n_buckets + 1).long().unique().tolist()
        for lo, hi in zip(edges, edges[1:]):
            longest = int(lengths[order[hi - 1]])
            tokens = ((token_rank >= lo) & (token_rank < hi)).nonzero().squeeze(1)
            slot = (token_rank[tokens] - lo) * longest + self.pos[tokens]
            self.buckets.append((tokens, slot, hi - lo, longest))

    def attend(self, q, k, v):
        """q (N, nh, hd), k and v (N, nkv, hd) -> causal attention within each dialog, (N, nh*hd)."""
        dtype, on_cpu = q.dtype, not q.is_cuda
        if on_cpu:  # PyTorch's CPU attention is slow in bfloat16: attend in float32
            q, k, v = q.float(), k.float(), v.float()
        y = q.new_zeros(q.size(0), q.size(1) * q.size(2))
        for tokens, slot, n_dialogs, longest in self.buckets:
            def grid(t):  # (N, h, hd) -> (n_dialogs, h, longest, hd), zeros after each dialog's end
                out = t.new_zeros(n_dialogs * longest, t.size(1), t.size(2))
                out = out.index_copy(0, slot, t.index_select(0, tokens))
                return out.view(n_dialogs, longest, t.size(1), t.size(2)).transpose(1, 2)
            qb, kb, vb = grid(q), grid(k), grid(v)
            if kb.size(1) != qb.size(1):  # grouped-query attention: share each kv head
                kb = kb.repeat_interleave(qb.size(1) // kb.size(1), dim=1)
                vb = vb.repeat_interleave(qb.size(1) // vb.size(1), dim=1)
            with torch.autocast('cpu', enabled=False) if on_cpu else contextlib.nullcontext():
                yb = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)  # (n, nh, longest, hd)
            yb = yb.transpose(1, 2).reshape(n_dialogs * longest, -1)
            y = y.index_copy(0, tokens, yb.index_select(0, slot))
        return y.to(dtype)


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
        """x (B, T, C), or (N, C) with a DialogLayout for packed training rows."""
        if layout is not None:
            N, C = x.shape
            q = self.q_proj(x).view(N, self.n_head, self.head_dim)       # (N, nh, hd)
            k = self.k_proj(x).view(N, self.n_kv_head, self.head_dim)    # (N, nkv, hd)
            v = self.v_proj(x).view(N, self.n_kv_head, self.head_dim)
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

    def forward(self, x, cos, sin, attn_mask=None, **kwargs):
        y = self.attn(self.attn_norm(x), cos, sin, attn_mask, **kwargs)
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
        is true (all real positions when None), and the logits of just those positions,
        (N, vocab), or None when the fused kernel never materialises them.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens, block_size is {self.config.block_size}")
        if doc_ids is None:  # one sequence per row: plain causal attention
            layout, x = None, self.embed(idx)
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]                       # (T, hd/2)
        else:
            layout = DialogLayout(doc_ids)
            x = self.embed(idx.reshape(-1)[layout.token_index])                   # (N, C)
            cos, sin = self.rope_cos[layout.pos][:, None], self.rope_sin[layout.pos][:, None]  # (N, 1, hd/2)
        for block in self.blocks:
            x = block(x, cos, sin, layout=layout)
        x = self.norm(x)
        if targets is None:
            if layout is None:
                return self.lm_head(x), None
            logits = self.lm_head(x)
            return logits.new_zeros(B * T, logits.size(-1)).index_copy(0, layout.token_index, logits).view(B, T, -1), None
        if layout is not None:  # targets and mask of the real tokens only
            targets = targets.reshape(-1)[layout.token_index]
            loss_mask = loss_mask.reshape(-1)[layout.token_index] if loss_mask is not None else None
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
