"""
Train a GPT on the dialogs prepare_data.py wrote: one CPU, one GPU, or many with torchrun.

    python train.py config/quick.py --max_iters=500
    torchrun --standalone --nproc_per_node=8 train.py config/memory.py

Rows are packed with whole dialogs and attention never crosses from one dialog to another.
"""
import contextlib
import ctypes
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

import configurator
from model import GPT, GPTConfig, pick_device
from prepare_data import ShardError, read_shard

DEFAULTS = dict(
    # I/O
    out_dir='out',
    init_from='scratch',      # 'scratch' or 'resume' (from out_dir/ckpt.pt)
    overwrite=False,          # let 'scratch' replace a checkpoint already in out_dir
    data_dir='data/default',  # where prepare_data.py wrote
    dataset='qatool',         # 'qatool' (in-tool), 'qa' (in-weight), 'bio', or 'bio:1,qa:3'
    max_iters=2000,
    log_interval=10,
    eval_interval=250,        # validation loss (and recall, see eval_questions) every this many
    eval_iters=4,             # validation batches
    eval_questions=0,         # >0: recall on this many questions of each split at every eval
    stop_metric='',           # early stop on this eval metric (e.g. 'recall_min', 'val_loss')
    stop_value=0.0,           # ... once it reaches this (>= for recall, <= for a loss)
    ckpt_interval=1000,
    seed=1337,
    # data and batch
    batch_size=128,           # rows per micro-batch
    block_size=256,           # tokens a row trains on (rows hold block_size + 1 tokens)
    gradient_accumulation_steps=1,  # micro-batches per optimizer step, over all processes
    # model
    n_layer=2,
    n_head=2,
    n_kv_head=0,
    n_embd=64,
    mlp_hidden=0,
    tie_embeddings=False,
    kernels='auto',
    # optimizer and schedule
    learning_rate=1e-3,
    min_lr=0.0,               # the floor the schedule decays to
    lr_decay_iters=0,         # the decay ends here; 0: at max_iters
    lr_decay='cosine',        # 'cosine' or 'linear'
    warmup_iters=50,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,            # 0 disables
    # system
    device='auto',            # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    dtype='auto',             # 'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'bfloat16'
    compile=False,
    threads=0,                # CPU threads per process, 0: cores / processes
    peak_tflops=0.0,          # for MFU; 0: looked up for known GPUs
)

MODEL_KEYS = ('n_layer', 'n_head', 'n_kv_head', 'n_embd', 'mlp_hidden', 'tie_embeddings')
PEAK_BF16_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'L4': 121.0}  # dense


class DataError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# Data: rows packed with whole dialogs, in an order fixed by the seed

def parse_mixture(dataset):
    """'qa' -> {'qa': 1.0}; 'bio:1,qa:3' -> {'bio': 0.25, 'qa': 0.75}."""
    parts = dict((p.split(':') + ['1'])[:2] for p in dataset.split(','))
    weights = {name.strip(): float(w) for name, w in parts.items()}
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


def open_shard(data_dir, name, vocab_size=None):
    path = os.path.join(data_dir, f'{name}.bin')
    if not os.path.exists(path):
        raise DataError(f"missing {path}: run python prepare_data.py --out_dir={data_dir} first")
    tokens, mask, starts, header = read_shard(path)
    if vocab_size is not None and header['vocab_size'] != vocab_size:
        raise DataError(f"{path} was tokenized with a vocab of {header['vocab_size']}, the model "
                        f"has {vocab_size}: re-run prepare_data.py with the model's tokenizer")
    return tokens, mask, np.append(starts, len(tokens))  # bounds: dialog i is [b[i], b[i+1])


class PackedBatches:
    """An endless, seeded stream of dialogs packed greedily into rows of block_size + 1 tokens.

    A row starts at a dialog boundary and holds whole dialogs only; the dialog that does not fit
    starts the next row. state() / load_state() make the stream resumable exactly.
    """

    def __init__(self, data_dir, mixture, split, block_size, seed, vocab_size=None):
        self.shards = [open_shard(data_dir, f'{name}_{split}', vocab_size) for name in mixture]
        self.weights = list(mixture.values())
        self.row_len, self.seed = block_size + 1, seed
        longest = max(int(np.diff(b).max()) for _, _, b in self.shards)
        if longest > self.row_len:
            raise DataError(f"a dialog of {longest} tokens does not fit rows of {self.row_len}: "
                            f"raise block_size to at least {longest - 1}")
        self.epoch, self.pos = 0, 0
        self.order = self._epoch_order(0)

    def _epoch_order(self, epoch):
        """(shard, dialog) pairs of one epoch: each shard's share by weight, shuffled."""
        rng = np.random.default_rng([self.seed, epoch])
        total = sum(len(b) - 1 for _, _, b in self.shards)
        picks = []
        for s, ((_, _, bounds), w) in enumerate(zip(self.shards, self.weights)):
            n = len(bounds) - 1
            count = n if len(self.shards) == 1 else max(1, round(w * total))
            ids = np.concatenate([rng.permutation(n) for _ in range(-(-count // n))])[:count]
            picks.append(np.stack([np.full(count, s), ids], axis=1))
        order = np.concatenate(picks)
        return order[rng.permutation(len(order))]

    def _next_dialog(self):
        if self.pos == len(self.order):
            self.epoch, self.pos = self.epoch + 1, 0
            self.order = self._epoch_order(self.epoch)
        return self.order[self.pos]

    def next_rows(self, n_rows):
        """-> tokens (n, row_len) int64, loss mask (n, row_len) bool, dialog ids (n, row_len)."""
        tokens = np.zeros((n_rows, self.row_len), dtype=np.int64)
        mask = np.zeros((n_rows, self.row_len), dtype=bool)
        doc_ids = np.full((n_rows, self.row_len), -1, dtype=np.int64)  # -1: padding
        for r in range(n_rows):
            filled, doc = 0, 0
            while True:
                s, d = self._next_dialog()
                shard_tokens, shard_mask, bounds = self.shards[s]
                lo, hi = bounds[d], bounds[d + 1]
                if filled + hi - lo > self.row_len:
                    break  # stays first in the stream for the next row
                tokens[r, filled:filled + hi - lo] = shard_tokens[lo:hi]
                mask[r, filled:filled + hi - lo] = shard_mask[lo:hi]
                doc_ids[r, filled:filled + hi - lo] = doc
                filled, doc, self.pos = filled + hi - lo, doc + 1, self.pos + 1
        return tokens, mask, doc_ids

    def state(self):
        return {'epoch': self.epoch, 'pos': self.pos}

    def load_state(self, state):
        self.epoch, self.pos = state['epoch'], state['pos']
        self.order = self._epoch_order(self.epoch)


def to_batch(rows, device):
    """Packed rows -> model inputs: idx, targets, loss mask (on targets), dialog ids."""
    tokens, mask, doc_ids = (torch.from_numpy(a) for a in rows)
    batch = tokens[:, :-1], tokens[:, 1:], mask[:, 1:], doc_ids[:, :-1]
    return [t.to(device, non_blocking=True) for t in batch]


# ----------------------------------------------------------------------------------------------
# Schedule, checkpoints

def lr_at(step, cfg):
    """Linear warmup, then cosine or linear decay from learning_rate to min_lr at lr_decay_iters."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_decay == 'cosine' else 1 - progress
    return cfg.min_lr + shape * (cfg.learning_rate - cfg.min_lr)


def save_checkpoint(path, **state):
    torch.save(state, path + '.tmp')
    os.replace(path + '.tmp', path)  # a crash mid-write never leaves a checkpoint that loads


CHECKPOINT_KEYS = ('model', 'optimizer', 'model_args', 'config', 'step', 'best_val', 'data_state',
                   'rng_state', 'tokenizer')


def load_checkpoint(path, device):
    """A checkpoint written by save_checkpoint; DataError naming the file if it is not one."""
    if not os.path.exists(path):
        raise DataError(f"--init_from=resume but there is no {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        raise DataError(f"{path} cannot be read ({type(e).__name__}: {e}); it is corrupt or not a "
                        f"checkpoint: start again with --init_from=scratch --overwrite=True") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise DataError(f"{path} is not a nano-itl checkpoint (missing {', '.join(missing)})")
    return ckpt


def check_compatible(ckpt, model_args, tokenizer_meta, path):
    """Refuse a checkpoint for another model shape or tokenizer, saying what differs."""
    diffs = [f"{k}: checkpoint {ckpt['model_args'][k]!r}, now {v!r}"
             for k, v in model_args.items() if ckpt['model_args'].get(k) != v and k != 'kernels']
    if ckpt['tokenizer'] != tokenizer_meta:
        diffs.append(f"tokenizer: checkpoint {ckpt['tokenizer']}, data {tokenizer_meta}")
    if diffs:
        raise DataError(f"{path} is for another model or tokenizer ({'; '.join(diffs)}); "
                        f"use another out_dir or matching settings")


def load_dataset_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(path):
        raise DataError(f"no dataset in {data_dir}: run python prepare_data.py --out_dir={data_dir}")
    with open(path) as f:
        meta = json.load(f)
    return meta


# ----------------------------------------------------------------------------------------------
# Training

def setup_device(cfg):
    """-> (device, autocast context, rank, world size); starts DDP when run by torchrun."""
    ddp = 'RANK' in os.environ
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    device = pick_device(cfg.device)
    if ddp:
        if device.startswith('cuda'):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    if device == 'cpu':
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get('LOCAL_WORLD_SIZE', 1))))
        keep_freed_memory()
    dtype = cfg.dtype if cfg.dtype != 'auto' else ('bfloat16' if device.startswith('cuda') else 'float32')
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if dtype == 'bfloat16'
                else contextlib.nullcontext())
    return device, autocast, rank, world


def keep_freed_memory():
    """Make glibc keep freed blocks of up to 32 MB for reuse instead of unmapping them.

    A CPU step frees and reallocates the same ~20 MB activations; by default glibc hands many back
    to the OS and the next step page-faults them in again (20-120k faults a step): 8-10% of a
    step on 2 cores. Memory stays at the peak, as with PyTorch's CUDA caching allocator.
    Not glibc (macOS, musl): nothing to do.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks under 32 MB (its maximum) from the heap
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: return the heap's top only past 1 GB free
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        pass


def peak_flops(cfg, device):
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)
    return 0.0


def build(cfg, meta, device):
    model_args = {k: getattr(cfg, k) for k in MODEL_KEYS}
    gpt_config = GPTConfig(vocab_size=meta['vocab_size'], block_size=cfg.block_size,
                           kernels=cfg.kernels, **model_args)
    torch.manual_seed(cfg.seed)
    model = GPT(gpt_config).to(device)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate,
                                          (cfg.beta1, cfg.beta2), device.split(':')[0])
    return model, optimizer, asdict(gpt_config)


def compiled(model, device):
    """torch.compile with dynamic shapes: packed batches change shape every step, and one graph
    serves them all. On CPU inductor writes C++, so a compiler must be there."""
    if device == 'cpu' and not any(shutil.which(c) for c in (os.environ.get('CXX', 'g++'), 'g++', 'clang++')):
        raise DataError("compile=True on CPU needs a C++ compiler (g++ or clang++, or $CXX): "
                        "install one, or run with --compile=False")
    return torch.compile(model, dynamic=True)


@torch.no_grad()
def validation_loss(model, batches, cfg, device, autocast):
    """Mean loss over eval_iters fixed batches (the same rows at every evaluation)."""
    batches.load_state({'epoch': 0, 'pos': 0})
    losses = []
    for _ in range(cfg.eval_iters):
        idx, targets, mask, doc_ids = to_batch(batches.next_rows(cfg.batch_size), device)
        with autocast:
            losses.append(model(idx, targets, mask, doc_ids)[1].item())
    return sum(losses) / len(losses)


def evaluate(model, cfg, meta, val_batches, device, autocast):
    """Validation loss, and recall through agent.py when eval_questions > 0."""
    model.eval()
    metrics = {'val_loss': validation_loss(model, val_batches, cfg, device, autocast)}
    if cfg.eval_questions:
        import agent  # only needed here, and it needs train.py's model: import late
        with autocast:
            metrics.update(agent.recall_metrics(model, cfg.data_dir, meta, cfg.dataset,
                                                cfg.eval_questions, device))
    model.train()
    return metrics


def reached(metrics, cfg):
    if not cfg.stop_metric or cfg.stop_metric not in metrics:
        return False
    value = metrics[cfg.stop_metric]
    return value <= cfg.stop_value if 'loss' in cfg.stop_metric else value >= cfg.stop_value


def accumulate_gradients(model, batches, cfg, device, autocast, rank, world):
    """Forward and backward over gradient_accumulation_steps micro-batches, shared among the ranks.

    -> (mean loss, whole dialogs, real tokens) of this rank's micro-batches. DDP syncs gradients
    on the last micro-batch only.
    """
    local_micro = cfg.gradient_accumulation_steps // world
    loss_sum, n_dialogs, n_tokens = 0.0, 0, 0
    for micro in range(cfg.gradient_accumulation_steps):
        rows = batches.next_rows(cfg.batch_size)  # every rank reads the whole stream,
        if micro % world != rank:                 # and keeps its own micro-batches
            continue
        idx, targets, mask, doc_ids = to_batch(rows, device)
        n_dialogs += int(rows[2].max(axis=1).sum()) + len(rows[2])  # ids are 0..k-1 per row
        n_tokens += int((rows[2] >= 0).sum())  # real tokens: padding costs nothing
        last = micro + world >= cfg.gradient_accumulation_steps
        sync = model.no_sync() if world > 1 and not last else contextlib.nullcontext()
        with sync, autocast:
            _, loss = model(idx, targets, mask, doc_ids)
            (loss / local_micro).backward()
        loss_sum += loss.item() / local_micro
    return loss_sum, n_dialogs, n_tokens


def train(cfg):
    """Run training as cfg says; returns the last metrics (rank 0) for scripts and tests."""
    device, autocast, rank, world = setup_device(cfg)
    master = rank == 0
    if cfg.gradient_accumulation_steps % world:
        raise DataError(f"gradient_accumulation_steps {cfg.gradient_accumulation_steps} must be a "
                        f"multiple of the {world} processes")
    meta = load_dataset_meta(cfg.data_dir)
    mixture = parse_mixture(cfg.dataset)
    train_batches = PackedBatches(cfg.data_dir, mixture, 'train', cfg.block_size, cfg.seed, meta['vocab_size'])
    val_batches = PackedBatches(cfg.data_dir, mixture, 'ood', cfg.block_size, cfg.seed, meta['vocab_size'])
    model, optimizer, model_args = build(cfg, meta, device)
    ckpt_path = os.path.join(cfg.out_dir, 'ckpt.pt')
    step, best_val = 0, float('inf')
    tokenizer_meta = {'tokenizer': meta['tokenizer'], 'special_tokens': meta['special_tokens']}
    if cfg.init_from == 'resume':
        ckpt = load_checkpoint(ckpt_path, device)
        check_compatible(ckpt, model_args, tokenizer_meta, ckpt_path)
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        train_batches.load_state(ckpt['data_state'])
        torch.set_rng_state(ckpt['rng_state'])
        step, best_val = ckpt['step'], ckpt['best_val']
    elif cfg.init_from != 'scratch':
        raise DataError(f"init_from must be 'scratch' or 'resume', got {cfg.init_from!r}")
    elif os.path.exists(ckpt_path) and not cfg.overwrite:
        raise DataError(f"{ckpt_path} exists: --init_from=resume continues it, --overwrite=True "
                        f"replaces it")
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(json.dumps({'config': vars(cfg), 'world_size': world, 'device': device,
                          'num_params': model.num_params()}))
        with open(os.path.join(cfg.out_dir, 'config.json'), 'w') as f:
            json.dump(vars(cfg), f, indent=2)
    raw_model = model
    if cfg.compile:
        model = compiled(model, device)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[int(device.split(':')[1])]
                                                           if device.startswith('cuda') else None)

    def checkpoint():
        if master:
            save_checkpoint(ckpt_path, model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                            model_args=model_args, config=vars(cfg), step=step, best_val=best_val,
                            data_state=train_batches.state(), rng_state=torch.get_rng_state(),
                            tokenizer=tokenizer_meta)

    peak = peak_flops(cfg, device)
    metrics_file = open(os.path.join(cfg.out_dir, 'metrics.jsonl'), 'a') if master else None
    metrics, t_last, best_loss = {}, time.time(), float('inf')  # best training loss of this run
    while step < cfg.max_iters:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr
        t0 = time.time()
        loss_sum, n_dialogs, n_tokens = accumulate_gradients(model, train_batches, cfg, device,
                                                             autocast, rank, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float('inf'))
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):  # grads agree on all ranks
            raise FloatingPointError(f"loss is {loss_sum} at step {step}: stopped; the last good "
                                     f"checkpoint is kept in {cfg.out_dir}. Try a lower learning_rate")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        best_loss = min(best_loss, loss_sum)
        dt = time.time() - t0
        if master and (step % cfg.log_interval == 0 or step == cfg.max_iters):
            tokens_per_s = n_tokens * world / dt
            row = {'step': step, 'loss': round(loss_sum, 5), 'lr': lr, 'grad_norm': round(float(grad_norm), 4),
                   'step_ms': round(dt * 1000, 2), 'tokens_per_s': round(tokens_per_s),
                   'dialogs_per_s': round(n_dialogs * world / dt, 1)}
            if peak:
                row['mfu'] = round(raw_model.estimate_mfu(tokens_per_s, cfg.block_size, peak), 4)
            eta = (time.time() - t_last) / cfg.log_interval * (cfg.max_iters - step)
            print(' | '.join(f'{k} {v}' for k, v in row.items()) + f' | eta {eta:.0f}s', flush=True)
            metrics_file.write(json.dumps(row) + '\n')
            metrics_file.flush()
            t_last = time.time()
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            metrics = evaluate(raw_model, cfg, meta, val_batches, device, autocast) if master else {}
            best_val = min(best_val, metrics.get('val_loss', best_val))
            if master:
                print(json.dumps({'step': step, **metrics}), flush=True)
                metrics_file.write(json.dumps({'step': step, **metrics}) + '\n')
                metrics_file.flush()
            stop = torch.tensor(float(reached(metrics, cfg)))
            if world > 1:
                dist.broadcast(stop, 0)
            if stop.item():
                if master:
                    print(f"early stop at step {step}: {cfg.stop_metric} reached {cfg.stop_value}")
                break
        if step % cfg.ckpt_interval == 0:
            checkpoint()
    checkpoint()
    if metrics_file:
        metrics_file.close()
    if world > 1:
        dist.barrier()  # every rank leaves together: gloo aborts if a peer tears down mid-call
        dist.destroy_process_group()
    return {'step': step, 'best_loss': best_loss, 'best_val': best_val,
            'num_params': raw_model.num_params(), **metrics}


def main(argv):
    cfg = configurator.main_parse(DEFAULTS, argv)
    try:
        train(cfg)
    except (DataError, ShardError, FloatingPointError, ValueError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == '__main__':
    main(sys.argv[1:])
