"""
Train a GPT on the dialogs prepare_data.py wrote: one CPU, one GPU, or many with torchrun.

    python train.py config/quick.py --max_iters=500
    torchrun --standalone --nproc_per_node=8 train.py config/memory.py

Rows are packed with whole dialogs and attention never crosses from one dialog to another.
A step is gradient_accumulation_steps micro-batches of batch_size rows; with several processes
each takes its share of every micro-batch's rows, so a run makes the same updates on any number.
"""
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

import agent
import configurator
import finetune
from configurator import ConfigError
from cpu_kernels import cxx_compiler
from model import (DTYPES, GPT, KERNELS, CheckpointError, GPTConfig, autocast, check_device,
                   keep_freed_memory, load_checkpoint, resolve_device, resolve_dtype)
from prepare_data import DATASETS, ShardError, read_shard

DEFAULTS = dict(
    # I/O
    out_dir='out',            # checkpoint, config.json and metrics.jsonl go here
    init_from='scratch',      # 'scratch', 'resume' (out_dir/ckpt.pt), another run's out_dir, or a
                              # pretrained model: 'smollm2-135m', a .gguf file, a Hugging Face folder
    overwrite=False,          # let 'scratch' replace a checkpoint already in out_dir
    data_dir='data/default',  # where prepare_data.py wrote
    dataset='qatool',         # 'qatool' (in-tool), 'qa' (in-weight), 'bio', or 'bio:1,qa:3'
    max_iters=2000,           # optimizer steps
    log_interval=10,          # print and record a training line every this many steps
    eval_interval=250,        # validation loss (and recall, see eval_questions) every this many
    eval_iters=4,             # validation batches
    eval_questions=0,         # >0: recall on this many questions of each split at every eval
    stop_metric='',           # early stop on this eval metric (e.g. 'recall_min', 'val_loss')
    stop_value=0.0,           # ... once it reaches this (>= for recall, <= for a loss)
    ckpt_interval=1000,       # save out_dir/ckpt.pt every this many steps (and at the end)
    seed=1337,                # seeds the initialisation and the order of the batches
    wandb_log=False,          # also log to Weights & Biases (pip install wandb); metrics.jsonl stays the record
    wandb_project='nano-itl',  # ... into this project
    wandb_run_name='',        # ... as this run ('' : out_dir's name)
    # data and batch
    batch_size=128,           # rows per micro-batch, over all processes (each takes its share)
    block_size=256,           # tokens a row trains on (rows hold block_size + 1 tokens)
    gradient_accumulation_steps=1,  # micro-batches per optimizer step
    # model
    n_layer=2,                # transformer blocks
    n_head=2,                 # attention heads
    n_kv_head=0,              # key/value heads (grouped-query attention); 0: n_head
    n_embd=64,                # width of the residual stream
    mlp_hidden=0,             # SwiGLU hidden width; 0: 4 * n_embd
    tie_embeddings=False,     # share the input embedding with the output layer
    kernels='auto',           # 'auto' (Triton on CUDA, else PyTorch), 'triton' or 'torch'
    # fine-tuning (finetune.py): what trains
    lora_rank=0,              # >0: train low-rank adapters of this rank on lora_targets, weights frozen
    lora_alpha=16.0,          # the adapters' update is scaled by lora_alpha / lora_rank
    lora_targets='q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj',  # projections LoRA adapts
    freeze_embeddings=False,  # freeze the token embedding (and the output layer when they are tied)
    freeze_layers=0,          # freeze the first this many blocks (with LoRA: they get no adapters)
    grad_checkpoint=False,    # recompute each block's activations in backward: less memory, ~30% more compute
    # optimizer and schedule
    learning_rate=1e-3,       # peak AdamW learning rate, after warmup
    min_lr=0.0,               # the floor the schedule decays to
    lr_decay_iters=0,         # the decay ends here; 0: at max_iters
    lr_decay='cosine',        # 'cosine' or 'linear'
    warmup_iters=50,          # linear warmup from 0 over this many steps
    weight_decay=0.1,         # AdamW weight decay on matrices
    beta1=0.9,                # AdamW beta1
    beta2=0.95,               # AdamW beta2
    grad_clip=1.0,            # clip the gradient norm to this; 0 disables
    # system
    device='auto',            # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    dtype='auto',             # 'auto' (bfloat16 on CUDA and CPUs with bf16 instructions), 'float32', 'bfloat16'
    compile='auto',           # torch.compile: True, False, 'auto' (from scratch on CPU with a C++ compiler)
    threads=0,                # CPU threads per process, 0: cores / processes
    peak_tflops=0.0,          # for MFU; 0: looked up for known GPUs
)

MODEL_KEYS = ('n_layer', 'n_head', 'n_kv_head', 'n_embd', 'mlp_hidden', 'tie_embeddings')
EVAL_METRICS = ('val_loss', 'recall', 'recall_ood', 'recall_min')
PEAK_BF16_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'L4': 121.0}  # dense


def check_dataset(dataset):
    """None when dataset is a dataset name or a weighted mixture of them, else what is wrong."""
    try:
        mixture = parse_mixture(dataset)
    except ValueError:
        mixture = None
    if not mixture or not set(mixture) <= set(DATASETS):
        return f"name datasets of {', '.join(DATASETS)}, or a mixture such as 'bio:1,qa:3'"
    return None


def check_init_from(value):
    """None for 'scratch', 'resume', a folder holding a run's ckpt.pt or a pretrained model that
    is here, else what is valid."""
    if value in ('scratch', 'resume') or os.path.isfile(os.path.join(value, 'ckpt.pt')):
        return None
    if finetune.pretrained.is_model(value):
        return finetune.check_installed(value)
    return ("use 'scratch', 'resume', or the out_dir of another run (a folder holding its ckpt.pt), "
            f"or a pretrained model: {finetune.PRETRAINED}")


CHECKS = dict(init_from=check_init_from, dataset=check_dataset, device=check_device,
              dtype=DTYPES, compile=('auto', True, False), kernels=KERNELS, lr_decay=('cosine', 'linear'),
              stop_metric=('',) + EVAL_METRICS, lora_targets=finetune.check_targets,
              lora_rank=lambda r: None if r >= 0 else 'a rank >= 0 (0: no LoRA)',
              lora_alpha=lambda a: None if a > 0 else 'a positive scale',
              freeze_layers=lambda n: None if n >= 0 else 'a number of blocks >= 0')


class DataError(RuntimeError):
    """The data on disk is missing or does not fit the run."""


# ----------------------------------------------------------------------------------------------
# Data: rows packed with whole dialogs, in an order fixed by the seed

def parse_mixture(dataset):
    """'qa' -> {'qa': 1.0}; 'bio:1,qa:3' -> {'bio': 0.25, 'qa': 0.75}."""
    parts = dict((p.split(':') + ['1'])[:2] for p in dataset.split(','))
    weights = {name.strip(): float(w) for name, w in parts.items()}
    total = sum(weights.values())
    if any(w <= 0 for w in weights.values()):
        raise ValueError(f"dataset weights must be positive: {dataset!r}")
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
    tokens, mask, doc_ids = (torch.from_numpy(np.ascontiguousarray(a)) for a in rows)
    batch = tokens[:, :-1], tokens[:, 1:], mask[:, 1:], doc_ids[:, :-1]
    return [t.to(device, non_blocking=True) for t in batch]


def load_dataset_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(path):
        raise DataError(f"no dataset in {data_dir}: run python prepare_data.py --out_dir={data_dir}")
    with open(path) as f:
        return json.load(f)


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


TRAINING_KEYS = ('optimizer', 'step', 'best_val', 'data_state', 'rng_state')  # what resume adds


def check_compatible(ckpt, model_args, tokenizer_meta, path):
    """Refuse a checkpoint for another model shape or tokenizer, saying what differs."""
    diffs = [f"{k}: checkpoint {ckpt['model_args'][k]!r}, now {v!r}"
             for k, v in model_args.items() if ckpt['model_args'].get(k) != v and k != 'kernels']
    if ckpt['tokenizer'] != tokenizer_meta:
        diffs.append('tokenizer: the checkpoint was trained on data with another tokenizer')
    if diffs:
        raise CheckpointError(f"{path} is for another model or tokenizer ({'; '.join(diffs)}); "
                              f"use another out_dir or matching settings")


# ----------------------------------------------------------------------------------------------
# Setting up a run

def setup_device(cfg):
    """-> (device, dtype name, rank, world size); starts DDP when run by torchrun."""
    ddp = 'RANK' in os.environ
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    device = resolve_device(cfg.device)
    if ddp:
        if device.startswith('cuda'):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            check_enough_gpus(int(os.environ['LOCAL_RANK']), int(os.environ['LOCAL_WORLD_SIZE']))
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    if device == 'cpu':
        local = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // local))
        keep_freed_memory()
    return device, resolve_dtype(cfg.dtype, device, training=True), rank, world


def check_enough_gpus(local_rank, local_world):
    """torchrun --nproc_per_node=8 on a machine with fewer GPUs: one line (from the first
    process) instead of eight 'invalid device ordinal' tracebacks."""
    gpus = torch.cuda.device_count()
    if local_world > gpus:
        message = (f"error: torchrun started {local_world} processes on this machine, which has {gpus} "
                   f"GPU(s): use --nproc_per_node={gpus}, or --device=cpu to train on the CPU")
        raise SystemExit(message if local_rank == 0 else 1)


def check_options(cfg, world):
    """Combinations of options that cannot run, refused before any work, naming what to change."""
    if cfg.batch_size < world:
        raise ConfigError(f"batch_size {cfg.batch_size} rows cannot be shared by {world} processes: "
                          f"use --batch_size={world} or more")
    if cfg.stop_metric.startswith('recall') and not cfg.eval_questions:
        raise ConfigError(f"stop_metric={cfg.stop_metric!r} is measured on eval_questions, which is 0: "
                          f"set --eval_questions=200 (for example)")


def peak_flops(cfg, device):
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)
    return 0.0


def model_config(cfg, meta):
    """The GPTConfig of a new model of cfg's shape."""
    return GPTConfig(vocab_size=meta['vocab_size'], block_size=cfg.block_size, kernels=cfg.kernels,
                     **{k: getattr(cfg, k) for k in MODEL_KEYS})


def build(cfg, meta, device, model=None):
    """A model ready to train, and its optimizer -> (model, optimizer, model_args).

    `model`: weights from elsewhere (starting_weights, on the CPU); None: a new one of cfg's shape,
    initialised from its seed. Then finetune.py's adapters and frozen parts, and the device."""
    if model is None:
        torch.manual_seed(cfg.seed)
        model = GPT(model_config(cfg, meta))
    finetune.prepare(model, cfg)
    model = model.to(device)
    model.grad_checkpoint = cfg.grad_checkpoint
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate,
                                          (cfg.beta1, cfg.beta2), device.split(':')[0])
    return model, optimizer, asdict(model.config)


def start(cfg, meta, device):
    """-> (model, optimizer, what resume restores or None): a new model, one resumed exactly from
    out_dir/ckpt.pt, or a new run from a model's weights: another run's (init_from=ITS_OUT_DIR:
    in-weight first, then in-tool) or a pretrained model's (finetune.py)."""
    path = os.path.join(cfg.out_dir, 'ckpt.pt')
    if cfg.init_from != 'resume' and os.path.exists(path) and not cfg.overwrite:
        raise CheckpointError(f"{path} exists: --init_from=resume continues it, --overwrite "
                              f"replaces it")
    if cfg.init_from != 'resume':
        model, optimizer, _ = build(cfg, meta, device, starting_weights(cfg, meta))
        return model, optimizer, None
    ckpt = load_checkpoint(path)
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} cannot be resumed (it has no {', '.join(missing)})")
    finetune.check_resume(ckpt, cfg, path)
    model, optimizer, _ = build(cfg, meta, device, starting_weights(cfg, meta, ckpt))
    finetune.load_lora_state(model, ckpt, path)
    optimizer.load_state_dict(ckpt['optimizer'])
    resumed = {k: ckpt[k] for k in ('step', 'best_val', 'data_state', 'rng_state')}
    resumed['started_from'] = ckpt.get('started_from', 'scratch')  # 'scratch': its shape is cfg's
    return model, optimizer, resumed  # not ckpt: its tensors would stay alive beside the model's


def starting_weights(cfg, meta, ckpt=None):
    """The model a run starts from, on the CPU, its shape now cfg's: the checkpoint it resumes
    (ckpt), another run's, or a pretrained model's; None: a new one, from cfg's shape."""
    if cfg.init_from == 'scratch':
        return None
    source = os.path.join(cfg.out_dir if ckpt else cfg.init_from, 'ckpt.pt')
    if not ckpt and not os.path.isfile(source):  # check_init_from: then a pretrained model
        model = finetune.pretrained_model(cfg.init_from, meta, cfg.data_dir)
        take_shape(cfg, asdict(model.config), cfg.init_from)
        model.config.kernels = cfg.kernels
        return model
    ckpt = ckpt or load_checkpoint(source)
    if cfg.init_from == 'resume' and ckpt.get('started_from', 'scratch') == 'scratch':
        config = model_config(cfg, meta)  # resumed with its own shape flags, checked below
    else:  # a run from a model's weights takes that model's shape, and again when resumed
        take_shape(cfg, ckpt['model_args'], source, rows=ckpt['config']['block_size'])
        config = GPTConfig(**{**ckpt['model_args'], 'kernels': cfg.kernels})
    check_compatible(ckpt, asdict(config), agent.tokenizer_meta(meta), source)
    model = GPT(config)
    model.load_state_dict(ckpt['model'])
    return model


def take_shape(cfg, model_args, source, rows=None):
    """A run from a model's weights takes that model's shape (model_args); a flag that says
    otherwise (not left at its default) is refused. block_size stays the rows' length: by default
    `rows` (the length that model trained on), and never past the model's own block_size."""
    for key in MODEL_KEYS:
        theirs, ours = model_args[key], getattr(cfg, key)
        if ours not in (theirs, DEFAULTS[key]):
            raise ConfigError(f"--{key}={ours!r} contradicts {source}, whose model has {key}={theirs!r}: "
                              f"drop the flag")
        setattr(cfg, key, theirs)
    if rows and cfg.block_size == DEFAULTS['block_size']:
        cfg.block_size = rows
    if cfg.block_size > model_args['block_size']:
        raise ConfigError(f"--block_size={cfg.block_size} is longer than {source}'s model reads "
                          f"({model_args['block_size']} tokens): use --block_size={model_args['block_size']} or less")


class PackedLoss(torch.nn.Module):
    """GPT.packed_loss as a module's forward: DDP syncs gradients, and torch.compile compiles,
    through forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets, loss_mask, doc_ids):
        return self.model.packed_loss(idx, targets, loss_mask, doc_ids)


def training_forward(model, cfg, device, world=1, from_scratch=True):
    """What a training step calls: packed_loss, compiled if asked, wrapped for DDP."""
    step = PackedLoss(model)
    if compiles(cfg, device, from_scratch):
        step = compiled(step, device)
    if world > 1:
        step = torch.nn.parallel.DistributedDataParallel(
            step, device_ids=[int(device.split(':')[1])] if device.startswith('cuda') else None)
    return step


def compiles(cfg, device, from_scratch):
    """--compile as given, or for 'auto': models trained from scratch on CPU, where a C++
    compiler is found. There it pays (2026-12-05, 2-core AMD Zen 4, bf16: 144 vs 178 ms a step,
    ~30 s to compile). On CUDA the Triton kernels already fuse what compiling would; pretrained
    models stay eager, where compiling was not measured."""
    if cfg.compile != 'auto':
        return cfg.compile
    return device == 'cpu' and from_scratch and cxx_compiler() is not None


def compiled(model, device):
    """torch.compile with dynamic shapes: packed batches change shape every step, and one graph
    serves them all. On CPU inductor writes C++, so a compiler must be there."""
    if device == 'cpu' and not cxx_compiler():
        raise ConfigError("compile=True on CPU needs a C++ compiler (g++ or clang++, or $CXX): "
                          "install one, or run with --compile=False")
    return torch.compile(model, dynamic=True)


def _short(value):
    """Five significant digits for a float, a whole number from 1,000 on."""
    if not isinstance(value, float):
        return value
    return round(value) if abs(value) >= 1000 else float(f'{value:.5g}')


class RunLog:
    """A run's record: metrics.jsonl in out_dir (started anew by a new run, appended to by a
    resumed one), every row with its time; each row printed; and Weights & Biases when asked."""

    def __init__(self, cfg, append):
        self.file = open(os.path.join(cfg.out_dir, 'metrics.jsonl'), 'a' if append else 'w')
        self.wandb = None
        if cfg.wandb_log:
            import wandb  # only when asked: it is not a requirement
            self.wandb = wandb.init(project=cfg.wandb_project, config=vars(cfg),
                                    name=cfg.wandb_run_name or os.path.basename(os.path.abspath(cfg.out_dir)))

    def write(self, row, text=None):
        """One row: printed (as `text`, else as 'key value | ...'), then recorded."""
        row = {k: _short(v) for k, v in row.items()}
        print(text or ' | '.join(f'{k} {v}' for k, v in row.items()), flush=True)
        self.file.write(json.dumps({**row, 'time': round(time.time(), 3)}) + '\n')
        self.file.flush()
        if self.wandb:
            self.wandb.log(row, step=row['step'])

    def close(self):
        self.file.close()
        if self.wandb:
            self.wandb.finish()


# ----------------------------------------------------------------------------------------------
# Steps

def share_of_rows(n_rows, rank, world):
    """This process's rows of a micro-batch: contiguous, sizes differing by at most one."""
    return slice(rank * n_rows // world, (rank + 1) * n_rows // world)


def accumulate_gradients(forward, batches, cfg, device, dtype, rank=0, world=1):
    """Forward and backward over gradient_accumulation_steps micro-batches of batch_size rows.

    Every process reads the whole stream and runs its share of each micro-batch's rows. Its loss
    (a mean over its loss tokens) is weighted by its part of the micro-batch's loss tokens, so the
    gradients DDP averages are exactly one process's: the mean over every loss token of the
    micro-batch, averaged over the micro-batches. DDP syncs on the last micro-batch only.
    -> (loss of the step, whole dialogs, real tokens), the same on every process.
    """
    n_micro = cfg.gradient_accumulation_steps
    loss_sum, n_dialogs, n_tokens = 0.0, 0, 0
    for micro in range(n_micro):
        tokens, mask, doc_ids = batches.next_rows(cfg.batch_size)
        n_dialogs += int(doc_ids.max(axis=1).sum()) + len(doc_ids)  # ids are 0..k-1 per row
        n_tokens += int((doc_ids >= 0).sum())  # real tokens: padding costs nothing
        has_loss = mask[:, 1:] & (doc_ids[:, :-1] >= 0)  # every row holds a dialog with some
        share = share_of_rows(cfg.batch_size, rank, world)
        weight = float(has_loss[share].sum() / has_loss.sum()) * world / n_micro
        idx, targets, loss_mask, ids = to_batch((tokens[share], mask[share], doc_ids[share]), device)
        sync = forward.no_sync() if world > 1 and micro < n_micro - 1 else contextlib.nullcontext()
        with sync, autocast(device, dtype):
            loss = forward(idx, targets, loss_mask, ids)
            (loss * weight).backward()
        loss_sum += loss.item() * weight / world
    if world > 1:  # the step's loss: each process holds its weighted part
        total = torch.tensor(loss_sum, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        loss_sum = total.item()
    return loss_sum, n_dialogs, n_tokens


def optimizer_step(step, model, optimizer, forward, batches, cfg, device, dtype, rank, world):
    """One update at this step's learning rate -> what it did: loss, lr, gradient norm, speed."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group['lr'] = lr
    t0 = time.time()
    loss, n_dialogs, n_tokens = accumulate_gradients(forward, batches, cfg, device, dtype, rank, world)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float('inf')))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # the same on every process
        raise FloatingPointError(f"loss is {loss} at step {step}: stopped; the last good "
                                 f"checkpoint is kept in {cfg.out_dir}. Try a lower learning_rate")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dt = time.time() - t0
    return {'step': step + 1, 'loss': loss, 'lr': lr, 'grad_norm': grad_norm, 'step_ms': dt * 1000,
            'tokens_per_s': n_tokens / dt, 'dialogs_per_s': n_dialogs / dt}


@torch.no_grad()
def validation_loss(model, batches, cfg, device, dtype):
    """Mean loss over eval_iters fixed batches (the same rows at every evaluation)."""
    batches.load_state({'epoch': 0, 'pos': 0})
    losses = []
    for _ in range(cfg.eval_iters):
        idx, targets, mask, doc_ids = to_batch(batches.next_rows(cfg.batch_size), device)
        with autocast(device, dtype):
            losses.append(model.packed_loss(idx, targets, mask, doc_ids).item())
    return sum(losses) / len(losses)


def evaluate(model, cfg, meta, val_batches, device, dtype):
    """Validation loss, and recall through agent.py when eval_questions > 0, in agent.py's dtype
    (float32 on CPU, where training may run in bfloat16): the recall agent.py will report."""
    model.eval()
    metrics = {'val_loss': validation_loss(model, val_batches, cfg, device, dtype)}
    if cfg.eval_questions:
        with autocast(device, resolve_dtype(cfg.dtype, device)):
            metrics.update(agent.recall_metrics(model, cfg.data_dir, meta, cfg.dataset,
                                                cfg.eval_questions))
    model.train()
    return metrics


def reached(metrics, cfg):
    if not cfg.stop_metric or cfg.stop_metric not in metrics:
        return False
    value = metrics[cfg.stop_metric]
    return value <= cfg.stop_value if 'loss' in cfg.stop_metric else value >= cfg.stop_value


class Clock:
    """Time left: training steps and evaluations timed apart, so an evaluation's time does not
    land in one interval of steps and make the estimate jump."""

    def __init__(self, cfg, step):
        self.cfg, self.first_step = cfg, step
        self.train_s, self.eval_s, self.evals = 0.0, 0.0, 0

    def eta(self, step):
        steps_left = self.cfg.max_iters - step
        per_step = self.train_s / max(1, step - self.first_step)
        evals_left = self.cfg.max_iters // self.cfg.eval_interval - step // self.cfg.eval_interval
        per_eval = self.eval_s / self.evals if self.evals else 0.0
        return steps_left * per_step + evals_left * per_eval


# ----------------------------------------------------------------------------------------------
# Training

def train(cfg):
    """Run training as cfg says; returns the last metrics (rank 0) for scripts and tests."""
    device, dtype, rank, world = setup_device(cfg)
    master = rank == 0
    check_options(cfg, world)
    meta = load_dataset_meta(cfg.data_dir)
    mixture = parse_mixture(cfg.dataset)
    model, optimizer, resumed = start(cfg, meta, device)  # first: the rows' length may be the model's
    train_batches = PackedBatches(cfg.data_dir, mixture, 'train', cfg.block_size, cfg.seed, meta['vocab_size'])
    val_batches = PackedBatches(cfg.data_dir, mixture, 'ood', cfg.block_size, cfg.seed, meta['vocab_size'])
    step, best_val, started_from = 0, float('inf'), cfg.init_from
    if resumed:
        train_batches.load_state(resumed['data_state'])
        torch.set_rng_state(resumed['rng_state'])
        step, best_val, started_from = resumed['step'], resumed['best_val'], resumed['started_from']
    from_scratch = started_from == 'scratch'
    forward = training_forward(model, cfg, device, world, from_scratch)
    log = None
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(json.dumps({'config': vars(cfg), 'world_size': world, 'device': device, 'dtype': dtype,
                          'compiled': compiles(cfg, device, from_scratch), 'num_params': model.num_params(),
                          'trainable_params': trainable}))
        print(f"training {trainable:,} of {model.num_params():,} parameters "
              f"({100 * trainable / model.num_params():.3g}%)", flush=True)
        with open(os.path.join(cfg.out_dir, 'config.json'), 'w') as f:
            json.dump(vars(cfg), f, indent=2)
        log = RunLog(cfg, append=cfg.init_from == 'resume')

    def checkpoint():
        if master:
            # 'model': a plain GPT, LoRA merged; 'lora': what resume adds back (finetune.py)
            save_checkpoint(os.path.join(cfg.out_dir, 'ckpt.pt'), model=finetune.merged_state_dict(model),
                            lora=finetune.lora_state(model), started_from=started_from,
                            optimizer=optimizer.state_dict(), model_args=asdict(model.config),
                            config=vars(cfg), step=step, best_val=best_val,
                            data_state=train_batches.state(), rng_state=torch.get_rng_state(),
                            tokenizer=agent.tokenizer_meta(meta),
                            data_dir=os.path.relpath(cfg.data_dir, cfg.out_dir))  # moves with out_dir

    peak = peak_flops(cfg, device)
    clock, metrics, best_loss = Clock(cfg, step), {}, float('inf')  # best training loss of this run
    while step < cfg.max_iters:
        row = optimizer_step(step, model, optimizer, forward, train_batches, cfg, device, dtype, rank, world)
        step, best_loss = step + 1, min(best_loss, row['loss'])
        clock.train_s += row['step_ms'] / 1000
        if master and (step % cfg.log_interval == 0 or step == cfg.max_iters):
            if peak:
                row['mfu'] = model.estimate_mfu(row['tokens_per_s'], cfg.block_size, peak)
            log.write({**row, 'eta_s': round(clock.eta(step))})
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            t0 = time.time()
            metrics = evaluate(model, cfg, meta, val_batches, device, dtype) if master else {}
            clock.eval_s, clock.evals = clock.eval_s + time.time() - t0, clock.evals + 1
            best_val = min(best_val, metrics.get('val_loss', best_val))
            if master:
                log.write({'step': step, **metrics}, json.dumps({'step': step, **metrics}))
            if stop_everywhere(reached(metrics, cfg), world):
                if master:
                    print(f"early stop at step {step}: {cfg.stop_metric} reached {cfg.stop_value}")
                break
        if step % cfg.ckpt_interval == 0:
            checkpoint()
    checkpoint()
    if log:
        log.close()
    if world > 1:
        del forward     # DDP's reducer goes before its process group: torn down after, it can hang
        dist.barrier()  # every rank leaves together: gloo aborts if a peer tears down mid-call
        dist.destroy_process_group()
    return {'step': step, 'best_loss': best_loss, 'best_val': best_val,
            'num_params': model.num_params(), **metrics}


def stop_everywhere(stop, world):
    """Rank 0 decides (it evaluated); every process learns it."""
    flag = torch.tensor(float(stop))
    if world > 1:
        dist.broadcast(flag, 0)
    return bool(flag.item())


def main(argv):
    cfg = configurator.main_parse(DEFAULTS, argv, checks=CHECKS)
    try:
        train(cfg)
    except (ConfigError, DataError, ShardError, CheckpointError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == '__main__':
    main(sys.argv[1:])
