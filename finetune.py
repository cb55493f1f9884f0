"""
Fine-tuning: start from a pretrained chat model, and train all of it, part of it, or low-rank
adapters (LoRA) on its weights. train.py calls these; its options say which.

    python prepare_data.py --tokenizer=smollm2-135m --out_dir=data/smollm2   # the model's tokens
    python train.py config/finetune_smollm2.py                               # LoRA on SmolLM2-135M
    python train.py config/finetune_smollm2.py --lora_rank=0 --freeze_layers=20  # the top 10 blocks

LoRA (Hu et al. 2021, arXiv 2106.09685) leaves a layer's weight W frozen and learns a low-rank
update beside it: y = x W^T + (alpha / rank) (x A^T) B^T, A (rank, in), B (out, rank). No gradient
is computed for W (no x^T dy matmul per layer) and W needs no optimizer state: that is where the
time and memory go. B starts at zero, so step 0 computes exactly what the base model does. The
adapted layer keeps W under its own name, so model.py's forward, the kernels, DDP and
torch.compile see the model they always see; a saved checkpoint holds W + (alpha / rank) B A,
a plain GPT that every script loads.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import pretrained
from configurator import ConfigError
from model import CheckpointError

# Every projection of a block. Adapting attention alone (the LoRA paper's q and v) trails full
# fine-tuning; adapting every linear layer matches it (QLoRA, arXiv 2305.14314), for adapters that
# stay ~1-2% of a small model's parameters at rank 8. What we teach (a new turn, SQL, the
# database's answers) is a new skill more than a new style, so every layer gets a say.
LORA_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
# the forms of a pretrained model init_from takes, for messages
PRETRAINED = f"{', '.join(map(repr, pretrained.SHIPPED))}, a .gguf file or a Hugging Face folder (config.json)"
# what a resumed run must share with the run it continues (the optimizer holds their parameters)
FINETUNE_KEYS = ('lora_rank', 'lora_alpha', 'lora_targets', 'freeze_embeddings', 'freeze_layers')


def check_targets(value):
    """None when value is a comma list of LORA_TARGETS (configurator check), else what is valid."""
    names = [n.strip() for n in value.split(',')]
    if all(names) and set(names) <= set(LORA_TARGETS):
        return None
    return f"name projections of {', '.join(LORA_TARGETS)}, comma-separated"


def check_installed(source):
    """None when a pretrained model's file is here; a shipped one whose wheel is missing says
    how to install it."""
    try:
        pretrained.resolve(source)
    except FileNotFoundError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------------------------
# Starting from a pretrained model

def pretrained_model(source, meta, data_dir):
    """model.py's GPT holding a pretrained model's weights (on the CPU, in training mode), for
    training on data_dir: refused unless that data was written in the model's own tokens."""
    tokenizer, _ = pretrained.read_tokenizer(source)  # the weights only once the data fits
    check_tokenizer(meta, tokenizer, source, data_dir)
    model, _, _ = pretrained.read_model(pretrained.resolve(source))
    return model


def check_tokenizer(meta, tokenizer, source, data_dir):
    """The data's token ids must mean what the model's embedding rows mean. A tokenizer's name is
    a label (its file's name): the vocabulary, split pattern and special tokens must agree."""
    ours = {k: v for k, v in meta['tokenizer'].items() if k != 'name'}
    theirs = {k: v for k, v in tokenizer.describe().items() if k != 'name'}
    if ours != theirs:
        used = meta['tokenizer'].get('name', meta['tokenizer']['kind'])
        raise ConfigError(f"{data_dir} was written with the tokenizer {used!r}, not {source}'s: write "
                          f"it with the model's: python prepare_data.py --tokenizer={source} "
                          f"--out_dir=DATA_DIR, then --data_dir=DATA_DIR")


# ----------------------------------------------------------------------------------------------
# LoRA

class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update: y = x W^T + (alpha / rank) (x A^T) B^T.

    `weight` is the base layer's own Parameter (same state-dict key, never copied), frozen.
    `lora_a` (rank, in) starts as nn.Linear's own init (kaiming-uniform, as PEFT does), `lora_b`
    (out, rank) at zero: the layer starts as the base layer, bit for bit.
    """

    def __init__(self, base, rank, alpha, generator):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)
        self.register_parameter('bias', None)  # model.py's layers have none
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, dtype=self.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, dtype=self.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5), generator=generator)
        self.scale = alpha / rank

    def forward(self, x):
        # scaled at rank width (N, r), the narrowest point, not at the output's (N, out)
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_a) * self.scale, self.lora_b)

    def merged_weight(self):
        return (self.weight + self.scale * self.lora_b @ self.lora_a).detach()


def add_lora(model, rank, alpha, targets, seed, first_block=0):
    """Swap the named projections of blocks[first_block:] for LoRALinear layers, in place.
    Their A matrices come from a generator seeded by `seed`, in module order: the same on every
    process and on every run with that seed."""
    generator = torch.Generator().manual_seed(seed)
    for block in model.blocks[first_block:]:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if name in targets and type(child) is nn.Linear:
                    setattr(parent, name, LoRALinear(child, rank, alpha, generator))


def lora_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


# ----------------------------------------------------------------------------------------------
# What trains

def prepare(model, cfg):
    """Adapters and frozen parts as cfg says, on a model still on the CPU -> the number of
    parameters that train. The optimizer then takes those only (GPT.configure_optimizer), and
    DDP syncs those only: a frozen parameter is never in its reducer, and every trainable one is
    used by every forward, so DDP needs no find_unused_parameters.

    lora_rank > 0: only the adapters train (embeddings, norms and every weight frozen); blocks
    under freeze_layers get none. On a model from scratch this trains a low-rank update of random
    weights: allowed (it runs, and tests use it) but rarely what you want.
    Else: everything trains but the embeddings (freeze_embeddings; with tie_embeddings that is
    the output layer too, the same tensor) and the first freeze_layers blocks.
    """
    n_layer = model.config.n_layer
    if cfg.freeze_layers > n_layer:
        raise ConfigError(f"--freeze_layers={cfg.freeze_layers}, but the model has {n_layer} blocks")
    if cfg.lora_rank:
        model.requires_grad_(False)
        targets = [n.strip() for n in cfg.lora_targets.split(',')]
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, targets, cfg.seed, cfg.freeze_layers)
    else:
        model.embed.weight.requires_grad_(not cfg.freeze_embeddings)
        for block in model.blocks[:cfg.freeze_layers]:
            block.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not trainable:
        raise ConfigError(f"nothing left to train: freeze_layers={cfg.freeze_layers} freezes every block"
                          f"{' and LoRA adapts none' if cfg.lora_rank else ''}; lower it")
    return trainable


# ----------------------------------------------------------------------------------------------
# Checkpoints: merged for every reader, exact for resume

def merged_state_dict(model):
    """model.state_dict() with each adapter merged into its weight: a plain GPT's state dict."""
    state = model.state_dict()
    for name, layer in lora_layers(model):
        state[f'{name}.weight'] = layer.merged_weight()
        del state[f'{name}.lora_a'], state[f'{name}.lora_b']
    return state


def lora_state(model):
    """What resume needs beyond the merged weights: each adapted layer's frozen weight and its
    adapters ({} without LoRA).

    Resume must continue bit for bit, and the merged W + s B A minus s B A is not W bit for bit,
    so the frozen W is stored as it is. Storing it, not reloading it from init_from, keeps a run
    resumable where the base has moved or changed (another run's out_dir that went on training,
    a file deleted) and keeps out_dir movable, as every checkpoint is. It costs the adapted
    weights once more on disk (~0.4 GB for SmolLM2-135M in float32): less than the optimizer
    state that full fine-tuning stores (two floats per parameter), which LoRA does not.
    """
    return {key: value for name, layer in lora_layers(model)
            for key, value in layer.state_dict(prefix=f'{name}.').items()}


def check_resume(ckpt, cfg, path):
    """A resumed run must adapt and freeze what the run it continues did."""
    before = ckpt['config']
    off = {'lora_rank': 0, 'freeze_embeddings': False, 'freeze_layers': 0}  # before these existed
    keys = FINETUNE_KEYS if cfg.lora_rank or before.get('lora_rank') else tuple(off)
    diffs = [f"{k}: checkpoint {before.get(k, off.get(k))!r}, now {getattr(cfg, k)!r}"
             for k in keys if before.get(k, off.get(k)) != getattr(cfg, k)]
    if diffs:
        raise CheckpointError(f"{path} trained other parameters ({'; '.join(diffs)}): resume with "
                              f"its settings, or start anew from its weights (--init_from=ITS_OUT_DIR)")


def load_lora_state(model, ckpt, path):
    """Put back the frozen weights and adapters lora_state() saved."""
    state, expected = ckpt.get('lora', {}), lora_state(model)
    if set(state) != set(expected):
        raise CheckpointError(f"{path} holds no adapters for this model's LoRA layers: it cannot be resumed")
    model.load_state_dict(state, strict=False)
