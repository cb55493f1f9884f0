"""
Fine-tuning throughput on a pretrained model: train.py's step (packed dialogs, loss and logits
only where the assistant writes, fused AdamW), in full and with LoRA, side by side with a plain
PyTorch loop over the same rows (a Llama forward written out over the same weights: every
position, padding too, and its logits; a plain AdamW), in one run.

    python bench/finetune.py                                   # SmolLM2-135M, 8 rows x 128, float32
    python bench/finetune.py --lora_rank=8 --steps=5 --batch_size=4

Every method starts from the same weights and trains on the same rows, so their first-step losses
must agree. Prints one JSON line per method (median step time, real tokens/s, GFLOP/s counting
6 x parameters per real token, its ratio to the plain loop) after one line with the machine and
the float32 matmul rate measured at the model's shapes: the ceiling of a compute-bound step.
"""
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import configurator  # noqa: E402
import finetune  # noqa: E402
import prepare_data  # noqa: E402
import pretrained  # noqa: E402
import train  # noqa: E402

DEFAULTS = dict(
    init_from='smollm2-135m',  # the pretrained model: 'smollm2-135m', a .gguf file, a HF folder
    dataset='qatool',          # the dialogs trained on (written in the model's chat format)
    batch_size=8,              # rows a step
    block_size=128,            # tokens a row
    steps=4,                   # timed steps per method (the median is reported)
    warmup=1,                  # untimed steps first
    lora_rank=16,              # the LoRA method's rank (on every projection)
    learning_rate=1e-5,        # the same for every method
    threads=0,                 # CPU threads; 0: torch's default
)


def cpu_name():
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
        return next(line.split(':', 1)[1].strip() for line in out.splitlines() if line.startswith('Model name'))
    except (OSError, StopIteration):
        return platform.processor() or 'unknown'


def matmul_rate(rows, config, repeats=5):
    """Best float32 GFLOP/s of the model's own matmul shapes at `rows` tokens."""
    shapes = [(config.n_embd, config.mlp_hidden), (config.mlp_hidden, config.n_embd),
              (config.n_embd, config.n_embd), (config.n_embd, config.vocab_size)]
    best = 0.0
    for k, n in shapes:
        a, b = torch.randn(rows, k), torch.randn(k, n)
        a @ b
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * rows * k * n * repeats / (time.perf_counter() - t0) / 1e9)
    return best


def plain_loss(model, idx, targets, loss_mask, doc_ids):
    """A Llama forward written plainly over the model's weights, as a fine-tuning loop without
    model.py would: every position of every row (padding too) through every layer, a (rows,
    tokens, vocab) logits tensor, attention kept within each dialog by a mask, RoPE positions
    restarting at each dialog. Its loss is the yardstick of train.py's."""
    c = model.config
    B, T = idx.shape
    hd, group = c.n_embd // c.n_head, c.n_head // c.n_kv_head
    steps = torch.arange(T)
    starts = torch.where(torch.cat([torch.ones(B, 1, dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], 1),
                         steps, 0).cummax(1).values
    pos = steps - starts                                                   # (B, T) within its dialog
    cos, sin = model.rope_cos[pos][:, None], model.rope_sin[pos][:, None]  # (B, 1, T, hd/2)
    same = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (steps[:, None] >= steps[None, :])
    mask = (same | torch.eye(T, dtype=torch.bool))[:, None]                 # (B, 1, T, T)

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * weight

    def rotate(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

    x = model.embed.weight[idx]
    for block in model.blocks:
        a, m = block.attn, block.mlp
        h = norm(x, block.attn_norm.weight)
        q = (h @ a.q_proj.weight.T).view(B, T, c.n_head, hd).transpose(1, 2)
        k = (h @ a.k_proj.weight.T).view(B, T, c.n_kv_head, hd).transpose(1, 2)
        v = (h @ a.v_proj.weight.T).view(B, T, c.n_kv_head, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(rotate(q), rotate(k).repeat_interleave(group, 1),
                                           v.repeat_interleave(group, 1), attn_mask=mask)
        x = x + y.transpose(1, 2).reshape(B, T, c.n_embd) @ a.o_proj.weight.T
        h = norm(x, block.mlp_norm.weight)
        x = x + (F.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    logits = norm(x, model.norm.weight) @ model.lm_head.weight.T            # (B, T, vocab)
    keep = loss_mask & (doc_ids >= 0)
    return F.cross_entropy(logits[keep], targets[keep])


def plain_step(model, optimizer, rows):
    """The plain loop: plain_loss, backward, clipping, AdamW without its fused kernel."""
    loss = plain_loss(model, *train.to_batch(rows, 'cpu'))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def time_method(name, step, cfg, n_params, tokens):
    """Run warmup + steps -> the method's JSON line (its first step's loss included)."""
    losses, times = [], []
    for i in range(cfg.warmup + cfg.steps):
        t0 = time.perf_counter()
        losses.append(step(i))
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {'method': name, 'first_loss': round(losses[0], 5), 'step_s': round(seconds, 3),
            'tokens_per_s': round(tokens / seconds, 1),
            'gflops': round(6 * n_params * tokens / seconds / 1e9, 1)}


def main(argv):
    cfg = configurator.main_parse(DEFAULTS, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base, _, _ = pretrained.load(cfg.init_from)
    base.train()
    with tempfile.TemporaryDirectory() as data_dir:  # a small dataset in the model's tokens
        flags = [f'--out_dir={data_dir}', '--n_people=64', '--n_ood=8', '--overwrite=True',
                 f'--tokenizer={cfg.init_from}']
        with open(os.devnull, 'w') as quiet, contextlib.redirect_stdout(quiet):
            meta = prepare_data.prepare(configurator.parse(prepare_data.DEFAULTS, flags))
        batches = lambda: train.PackedBatches(data_dir, {cfg.dataset: 1.0}, 'train', cfg.block_size, 0)  # noqa: E731
        stream = batches()
        all_rows = [stream.next_rows(cfg.batch_size) for _ in range(cfg.warmup + cfg.steps)]
        tokens = int(statistics.median(int((r[2] >= 0).sum()) for r in all_rows))
        n_params = base.num_params()
        print(json.dumps({'cpu': cpu_name(), 'threads': torch.get_num_threads(), 'model': cfg.init_from,
                          'num_params': n_params, 'rows': cfg.batch_size, 'block_size': cfg.block_size,
                          'real_tokens_per_step': tokens, 'dtype': 'float32',
                          'matmul_gflops': round(matmul_rate(tokens, base.config), 1)}), flush=True)

        model = copy.deepcopy(base)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95),
                                      weight_decay=0.0, foreach=False, fused=False)
        plain = time_method('plain', lambda i: plain_step(model, optimizer, all_rows[i]), cfg, n_params, tokens)
        print(json.dumps(plain), flush=True)
        del model, optimizer
        for name, rank in (('ours_full', 0), ('ours_lora', cfg.lora_rank)):
            tcfg = configurator.parse(train.DEFAULTS, [
                f'--init_from={cfg.init_from}', f'--data_dir={data_dir}', f'--dataset={cfg.dataset}',
                f'--batch_size={cfg.batch_size}', f'--block_size={cfg.block_size}',
                f'--learning_rate={cfg.learning_rate}', f'--lora_rank={rank}', '--weight_decay=0.0',
                '--warmup_iters=0', '--lr_decay=linear', f'--max_iters={10**6}'])
            model, optimizer, _ = train.build(tcfg, meta, 'cpu', copy.deepcopy(base))
            forward = train.training_forward(model, tcfg, 'cpu', from_scratch=False)
            stream = batches()
            line = time_method(name, lambda i: train.optimizer_step(
                i, model, optimizer, forward, stream, tcfg, 'cpu', 'float32', 0, 1)['loss'],
                cfg, n_params, tokens)
            line['speedup'] = round(plain['step_s'] / line['step_s'], 2)
            line['trainable_params'] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(json.dumps(line), flush=True)
            del model, optimizer, forward


if __name__ == '__main__':
    main(sys.argv[1:])
