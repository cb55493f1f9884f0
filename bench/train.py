"""
Training throughput: train.py's step (packed whole dialogs, padding skipped, fused AdamW; its
dtype and compile as train.py would choose them) side by side with the paper's way (eager PyTorch
in float32 whatever --dtype says, one padded dialog per row, masked cross-entropy, AdamW), a fixed
yardstick; `speedup` is dialogs/s over the yardstick's.

    python bench/train.py config/memory.py --max_iters=25 --device=cpu     # the default path
    python bench/train.py config/memory.py --dtype=float32 --compile=False  # plain eager float32
    python bench/train.py config/memory.py --dataset=qa --dtype=bfloat16
    python bench/train.py config/memory.py --n_layer=12 --n_head=12 --n_embd=768 \
        --block_size=1024 --batch_size=8 --synthetic_vocab=50304          # GPT-2 small, GPU

Prints one JSON line per method: step_ms (median), tokens_per_s (real tokens), dialogs_per_s
(whole dialogs trained on per second), MFU on GPU, peak memory.
"""
import json
import os
import resource
import statistics
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import configurator  # noqa: E402
import train  # noqa: E402

DEFAULTS = {**train.DEFAULTS,
            'max_iters': 20,          # timed steps
            'warmup': 3,              # untimed steps first
            'reference': True,        # also time the paper's way
            'synthetic_vocab': 0}     # >0: random full-row dialogs of this vocab (no data needed)


class SyntheticRows:
    """Rows that are each one dialog of block_size + 1 random tokens, all trained on."""

    def __init__(self, vocab, block_size, seed):
        self.vocab, self.row_len = vocab, block_size + 1
        self.rng = np.random.default_rng(seed)

    def next_rows(self, n):
        tokens = self.rng.integers(0, self.vocab, (n, self.row_len))
        return tokens, np.ones((n, self.row_len), bool), np.zeros((n, self.row_len), np.int64)


def one_dialog_per_row(batches, n):
    """The paper's batches: each row is one dialog, padded to the row length."""
    tokens, mask, doc_ids = batches.next_rows(n)
    first = doc_ids == 0
    return np.where(first, tokens, 0), mask & first, np.where(first, 0, -1)


def time_steps(step, cfg, device):
    for _ in range(cfg.warmup):
        step()
    if device.startswith('cuda'):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, dialogs, tokens = [], 0, 0
    for _ in range(cfg.max_iters):
        t0 = time.perf_counter()
        n_dialogs, n_tokens = step()
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        dialogs, tokens = dialogs + n_dialogs, tokens + n_tokens
    total = sum(times)
    result = {'step_ms': round(statistics.median(times) * 1000, 2), 'tokens_per_s': round(tokens / total),
              'dialogs_per_s': round(dialogs / total, 1)}
    if device.startswith('cuda'):
        result['peak_mem_gb'] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    else:  # the process's peak resident memory so far (the packed step runs first)
        result['peak_rss_gb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)
    return result


def main(argv):
    cfg = configurator.main_parse(DEFAULTS, argv, checks=train.CHECKS)
    device, dtype, _, _ = train.setup_device(cfg)
    if cfg.synthetic_vocab:
        meta = {'vocab_size': cfg.synthetic_vocab}
        batches = SyntheticRows(cfg.synthetic_vocab, cfg.block_size, cfg.seed)
    else:
        meta = train.load_dataset_meta(cfg.data_dir)
        batches = train.PackedBatches(cfg.data_dir, train.parse_mixture(cfg.dataset), 'train',
                                      cfg.block_size, cfg.seed, meta['vocab_size'])
    model, optimizer, _ = train.build(cfg, meta, device)
    fwd = train.training_forward(model, cfg, device)
    peak = train.peak_flops(cfg, device)

    def ours():  # train.py's own step
        _, n_dialogs, n_tokens = train.accumulate_gradients(fwd, batches, cfg, device, dtype)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return n_dialogs, n_tokens

    ref_model, _, _ = train.build(types.SimpleNamespace(**{**vars(cfg), 'kernels': 'torch'}), meta, device)  # plain PyTorch
    ref_optimizer = torch.optim.AdamW(ref_model.parameters(), lr=cfg.learning_rate,
                                      weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))

    def reference():
        rows = one_dialog_per_row(batches, cfg.batch_size)
        idx, targets, mask, _ = train.to_batch(rows, device)
        logits, _ = ref_model(idx)  # every position, padding included, in float32
        losses = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction='none')
        loss = (losses * mask.reshape(-1)).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), cfg.grad_clip)
        ref_optimizer.step()
        ref_optimizer.zero_grad(set_to_none=True)
        return len(rows[0]), int((rows[2] >= 0).sum())

    methods = [('packed', ours)] + ([('paper_reference', reference)] if cfg.reference else [])
    results = {name: time_steps(step, cfg, device) for name, step in methods}
    if cfg.reference:
        results['packed']['speedup'] = round(results['packed']['dialogs_per_s']
                                             / results['paper_reference']['dialogs_per_s'], 2)
    ours_setup = {'dtype': dtype, 'kernels': cfg.kernels, 'compile': train.compiles(cfg, device, from_scratch=True)}
    for name, result in results.items():
        if peak:
            result['mfu'] = round(model.estimate_mfu(result['tokens_per_s'], cfg.block_size, peak), 4)
        setup = ours_setup if name == 'packed' else {'dtype': 'float32', 'kernels': 'torch', 'compile': False}
        print(json.dumps({'method': name, 'device': device, **setup, 'threads': torch.get_num_threads(),
                          'dataset': f'synthetic:{cfg.synthetic_vocab}' if cfg.synthetic_vocab else cfg.dataset,
                          'batch_size': cfg.batch_size, 'block_size': cfg.block_size,
                          'n_layer': cfg.n_layer, 'n_head': cfg.n_head, 'n_embd': cfg.n_embd,
                          'num_params': model.num_params(), **result}), flush=True)

if __name__ == '__main__':
    main(sys.argv[1:])
