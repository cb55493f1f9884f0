"""
What fine-tuning cost a pretrained model: how far its next-token distributions drifted from its
base model's on general prompts, and its general ability on multiple choice (HellaSwag), both
before and after.

    python drift.py --out_dir=out/smollm2_qatool --base=smollm2-135m
    python drift.py --out_dir=out/ft --base=smollm2-135m --hellaswag=hellaswag_val.jsonl --hellaswag_n=1000
    python drift.py --out_dir=sweeps/ft/runs/RUN --base=smollm2-135m --base_cache=sweeps/ft

Drift: the base model writes greedy completions of general prompts (prompts/general.jsonl:
factual questions, instructions and creative writing, math and logic), each opened as a user turn
of its chat format. Both models then read the same tokens (prompt + the base's completion) and at
every completion position we compare their next-token distributions p (base) and q (tuned):
KL(p||q), KL(q||p), total variation 0.5 sum |p - q|, and whether their argmaxes agree.
Each prompt's score is its mean per token; the report gives the mean over prompts with a 95%
bootstrap interval over prompts, and the mean per kind of prompt.

HellaSwag (--hellaswag=FILE, its own JSONL; never downloaded) is scored as lm-eval and nanoGPT
score it: raw text, no chat template; each ending's log-likelihood given the context.
"""
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import configurator
import dialog
import pretrained
import tokenizer as tok
from agent import Progress
from model import DTYPES, GPT, autocast, check_device, resolve_device, resolve_dtype

ROOT = os.path.dirname(os.path.realpath(__file__))
DEFAULTS = dict(
    out_dir='out',             # the fine-tuned model (out_dir/ckpt.pt)
    base='smollm2-135m',       # the model it started from: 'smollm2-135m', a .gguf file, a Hugging
                               # Face folder, or another run's out_dir
    prompts='',                # JSONL of {"kind", "prompt"}; '' = the shipped prompts/general.jsonl
    n_prompts=0,               # the first this many prompts; 0: all
    max_new_tokens=32,         # the base model's greedy completion of each prompt, at most
    batch_size=32,             # prompts (or endings) generated and scored together
    base_cache='',             # folder for the base model's completions; '' = out_dir
    hellaswag='',              # HellaSwag's JSONL (e.g. hellaswag_val.jsonl); '' skips it
    hellaswag_n=0,             # its first this many examples; 0: all
    seed=1337,                 # seeds the bootstrap of the 95% intervals
    device='auto',             # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    dtype='auto',              # 'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'bfloat16'
)


def _at_least(n):
    return lambda v: None if v >= n else f'a number >= {n}'


def check_base(value):
    """None for a run's out_dir or a pretrained model that is here, else what is valid."""
    if os.path.isfile(os.path.join(value, 'ckpt.pt')) or pretrained.is_model(value):
        return None
    return ("use a pretrained model ('smollm2-135m', a .gguf file, a Hugging Face folder) or the "
            "out_dir of a run (a folder holding its ckpt.pt)")


CHECKS = dict(base=check_base, n_prompts=_at_least(0), max_new_tokens=_at_least(1),
              batch_size=_at_least(1), hellaswag_n=_at_least(0), device=check_device, dtype=DTYPES,
              hellaswag=lambda p: None if not p or os.path.isfile(p) else 'no such file')
LOGITS = 2**26     # logits held at once when scoring (256 MB in float32): rows per forward follow
BOOTSTRAP = 2000   # resamples of the prompts for the 95% intervals


# ----------------------------------------------------------------------------------------------
# Reading: the prompts, HellaSwag

def read_jsonl(path, n, parse, what):
    """The first n (0: all) rows of a JSONL file through parse(row); a bad line fails naming it."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(parse(json.loads(line)))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                reason = f'no field {e}' if isinstance(e, KeyError) else str(e).splitlines()[0]
                raise ValueError(f"{path} line {number}: not {what} ({reason})") from None
            if len(rows) == n:
                break
    return rows


def parse_prompt(row):
    if not isinstance(row['prompt'], str) or not isinstance(row['kind'], str):
        raise ValueError('kind and prompt must be strings')
    return {'kind': row['kind'], 'prompt': row['prompt']}


def parse_hellaswag(row):
    """-> (context, 4 endings, label). nanoGPT's (and llm.c's) rendering: the context is `ctx`
    (that is ctx_a + ' ' + ctx_b), no activity label and no WikiHow clean-up, as lm-eval adds."""
    ctx = row['ctx'] if 'ctx' in row else row['ctx_a'] + ' ' + row['ctx_b']
    endings, label = row['endings'], int(row['label'])
    if not (isinstance(ctx, str) and isinstance(endings, list) and len(endings) == 4
            and all(isinstance(e, str) and e for e in endings) and 0 <= label < 4):
        raise ValueError('ctx a string, endings 4 non-empty strings, label 0-3')
    return ctx, endings, label


def read_prompts(path='', n=0):
    return read_jsonl(path or os.path.join(ROOT, 'prompts', 'general.jsonl'), n, parse_prompt,
                      'a prompt {"kind", "prompt"}')


def read_hellaswag(path, n=0):
    return read_jsonl(path, n, parse_hellaswag, 'a HellaSwag example (ctx, endings, label)')


# ----------------------------------------------------------------------------------------------
# Generation and scoring

@torch.no_grad()
def complete(model, tokenizer, fmt, prompts, max_new_tokens=32, batch_size=32, cache_dtype=None):
    """The model's greedy completion of each prompt (a string), opened as a user turn -> token
    ids per prompt, ending with the end-of-turn token or after max_new_tokens."""
    end_id, device = dialog.single_token(tokenizer, fmt.end), model.embed.weight.device
    progress, out = Progress(len(prompts), 'prompts completed'), []
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer.encode(fmt.prompt(p)) for p in prompts[i:i + batch_size]]
        lengths = torch.tensor([len(x) for x in ids], device=device)
        T = int(lengths.max())
        if T + max_new_tokens > model.config.block_size:
            raise ValueError(f"a prompt of {T} tokens + max_new_tokens={max_new_tokens} pass the "
                             f"model's block_size {model.config.block_size}")
        idx = torch.zeros(len(ids), T, dtype=torch.long, device=device)   # right-padded
        for b, x in enumerate(ids):
            idx[b, :len(x)] = torch.tensor(x)
        model.setup_cache(len(ids), T + max_new_tokens, dtype=cache_dtype)
        logits = model.prefill(idx, lengths)
        live, written = torch.ones(len(ids), dtype=torch.bool, device=device), []
        for _ in range(max_new_tokens):
            new = logits.argmax(-1)                             # (B,)
            written.append(torch.where(live, new, -1))          # -1: the lane had ended
            live &= new != end_id
            if not live.any():
                break
            logits = model.decode(new[:, None], live.long())    # an ended lane adds nothing
        out += [[t for t in row if t >= 0] for row in torch.stack(written, 1).tolist()]
        progress.update(len(out))
    return out


@torch.no_grad()
def logits_at(model, seqs, starts, max_rows=32):
    """Score token sequences, right-padded in chunks of similar length -> yields (i, float32
    logits (len(seqs[i]) - starts[i], vocab)): the distributions that predict seqs[i][starts[i]:].
    A forward's (rows, T, vocab) logits stay under LOGITS floats; only these positions are kept."""
    device, V = model.embed.weight.device, model.config.vocab_size
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))   # stable: the same every time
    lo = 0
    while lo < len(order):
        hi = lo + 1
        while hi < len(order) and hi - lo < max_rows and (hi - lo + 1) * len(seqs[order[hi]]) * V <= LOGITS:
            hi += 1
        chunk = order[lo:hi]
        idx = torch.zeros(len(chunk), len(seqs[chunk[-1]]), dtype=torch.long)   # (rows, T)
        for r, i in enumerate(chunk):
            idx[r, :len(seqs[i])] = torch.tensor(seqs[i])
        logits, _ = model(idx.to(device))   # causal: the padding after a row changes nothing in it
        for r, i in enumerate(chunk):
            yield i, logits[r, starts[i] - 1:len(seqs[i]) - 1].float()
        lo = hi


def divergences(base_logits, tuned_logits):
    """Logits (n, vocab) of both models at the same positions -> per position KL(base||tuned),
    KL(tuned||base), total variation, and whether the argmaxes agree; in float64."""
    lp, lq = F.log_softmax(base_logits.double(), -1), F.log_softmax(tuned_logits.double(), -1)
    p, q, log_ratio = lp.exp(), lq.exp(), lp - lq
    return ((p * log_ratio).sum(-1), -(q * log_ratio).sum(-1), 0.5 * (p - q).abs().sum(-1),
            base_logits.argmax(-1) == tuned_logits.argmax(-1))


def bootstrap(values, seed, n=BOOTSTRAP):
    """95% percentile-bootstrap interval of the mean of values (one per prompt), seeded."""
    values = np.asarray(values)
    means = values[np.random.default_rng(seed).integers(0, len(values), (n, len(values)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def measure(tuned, base, tokenizer, fmt, prompts, max_new_tokens=32, batch_size=32, seed=1337,
            completions=None, cache_dtype=None):
    """The drift of `tuned` from `base` (same tokenizer) on prompts ([{'kind', 'prompt'}]) -> dict.

    completions: the base's (complete(); base_completions() caches them), written when None.
    Per metric: the mean over prompts of each prompt's mean per token, and its 95% interval;
    top1_agree: the fraction of all completion positions where both argmaxes agree; by_kind: the
    means over each kind's prompts."""
    if completions is None:
        completions = complete(base, tokenizer, fmt, [p['prompt'] for p in prompts], max_new_tokens,
                               batch_size, cache_dtype)
    prompt_ids = [tokenizer.encode(fmt.prompt(p['prompt'])) for p in prompts]
    seqs = [p + c for p, c in zip(prompt_ids, completions)]
    starts = [len(p) for p in prompt_ids]
    names = ('kl_base_tuned', 'kl_tuned_base', 'tv')
    per_prompt, agree = np.zeros((len(seqs), 3)), np.zeros(len(seqs))   # means per prompt; agreements
    progress = Progress(len(seqs), 'prompts scored')
    for n, ((i, p), (j, q)) in enumerate(zip(logits_at(base, seqs, starts, batch_size),
                                             logits_at(tuned, seqs, starts, batch_size)), 1):
        *kls, same = divergences(p, q)
        per_prompt[i] = [float(x.mean()) for x in kls]
        agree[i] = float(same.sum())
        progress.update(n)
    out = {'prompts': len(seqs), 'tokens': sum(map(len, completions))}
    for k, name in enumerate(names):
        out[name] = float(per_prompt[:, k].mean())
        out[f'{name}_95'] = bootstrap(per_prompt[:, k], seed)
    out['top1_agree'] = float(agree.sum() / out['tokens'])
    kinds = [p['kind'] for p in prompts]
    out['by_kind'] = {kind: {'prompts': kinds.count(kind), **{
        name: float(per_prompt[[k == kind for k in kinds], c].mean()) for c, name in enumerate(names)}}
        for kind in dict.fromkeys(kinds)}
    out['interval'] = f'95% percentile bootstrap over prompts, {BOOTSTRAP} resamples, seed {seed}'
    return out


def choice_loglikelihoods(model, tokenizer, examples, batch_size=32):
    """Each example's 4 endings -> the sum of their tokens' log-probabilities given the context,
    (examples, 4). Raw text, no chat template; ' ' + ending after the context (both
    rendered and tokenized apart, as nanoGPT's hellaswag.py); a context too long for block_size
    loses its start (as lm-eval)."""
    seqs, starts, block = [], [], model.config.block_size
    for ctx, endings, _ in examples:
        context = tokenizer.encode_ordinary(ctx)
        for ending in endings:
            ids = context + tokenizer.encode_ordinary(' ' + ending)
            cut = max(0, len(ids) - block)
            seqs.append(ids[cut:])
            starts.append(max(1, len(context) - cut))
    sums, progress = np.zeros(len(seqs)), Progress(len(seqs), 'endings scored')
    for n, (i, logits) in enumerate(logits_at(model, seqs, starts, batch_size), 1):
        targets = torch.tensor(seqs[i][starts[i]:], device=logits.device)
        sums[i] = float(F.log_softmax(logits.double(), -1).gather(1, targets[:, None]).sum())
        progress.update(n)
    return sums.reshape(len(examples), 4)


def multiple_choice(model, tokenizer, examples, batch_size=32):
    """-> {'n', 'acc', 'acc_norm'}: acc takes the ending of highest log-likelihood; acc_norm
    divides it by the ending's length in characters first (lm-eval's acc_norm, its len(choice):
    bytes for HellaSwag's ASCII text), where nanoGPT divides by the ending's token count."""
    sums = choice_loglikelihoods(model, tokenizer, examples, batch_size)
    labels = np.array([label for _, _, label in examples])
    lengths = np.array([[len(e) for e in endings] for _, endings, _ in examples])
    return {'n': len(examples), 'acc': float((sums.argmax(1) == labels).mean()),
            'acc_norm': float(((sums / lengths).argmax(1) == labels).mean())}


# ----------------------------------------------------------------------------------------------
# The base model's completions, cached
#
# They depend only on the base model, the prompts, max_new_tokens (and the dtype it ran in), so a
# sweep of runs over one base writes them once: they are kept in base_cache/drift_base_KEY.json,
# KEY a hash of all of these. The base is hashed by its weights and tokenizer, not by its name or
# path: a folder moved or a run retrained in place still hits or misses the cache rightly, for a
# second of hashing (540 MB for SmolLM2-135M). By default the folder is out_dir (one run); a sweep
# points every run at one folder (--base_cache=SWEEP_DIR). Each file is written to a temporary name
# and renamed: two runs writing the same file at once write the same bytes.

def cache_key(base, tokenizer, fmt, prompts, max_new_tokens, dtype):
    h = hashlib.sha256(json.dumps([tokenizer.describe(), fmt.name, [p['prompt'] for p in prompts],
                                   max_new_tokens, dtype]).encode())
    for name, tensor in base.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def base_completions(base, tokenizer, fmt, prompts, max_new_tokens, batch_size, cache_dir, dtype='float32'):
    """complete() of the base model, read from cache_dir when there -> (completions, the cache
    file, whether it was read)."""
    key = cache_key(base, tokenizer, fmt, prompts, max_new_tokens, dtype)
    path = os.path.join(cache_dir, f'drift_base_{key[:16]}.json')
    try:
        with open(path) as f:
            cached = json.load(f)
        if cached['key'] == key:
            return cached['completions'], path, True
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or damaged: written anew
    completions = complete(base, tokenizer, fmt, [p['prompt'] for p in prompts], max_new_tokens,
                           batch_size, getattr(torch, dtype))
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        json.dump({'key': key, 'max_new_tokens': max_new_tokens, 'completions': completions}, f)
    os.replace(tmp, path)
    return completions, path, False


# ----------------------------------------------------------------------------------------------
# The command line

def load_base(source):
    """-> (model on the CPU, tokenizer, format name) of a run's out_dir or a pretrained model."""
    if os.path.isfile(os.path.join(source, 'ckpt.pt')):
        model, ckpt = GPT.from_checkpoint(source)
        return model, tok.from_meta(ckpt['tokenizer']['tokenizer']), ckpt['tokenizer'].get('format', 'itl')
    return pretrained.load(source)


def check_same_tokenizer(tuned_tokenizer, base_tokenizer, out_dir, base):
    """The two models must read the same token ids (a tokenizer's name is only a label)."""
    ours, theirs = ({k: v for k, v in t.describe().items() if k != 'name'}
                    for t in (tuned_tokenizer, base_tokenizer))
    if ours != theirs:
        def say(t):
            return f"{t.describe().get('name', t.describe()['kind'])}, {t.vocab_size} tokens"
        raise ValueError(f"{out_dir}'s tokenizer ({say(tuned_tokenizer)}) is not {base}'s "
                         f"({say(base_tokenizer)}): it was not fine-tuned from that model")


def main(argv):
    cfg = configurator.main_parse(DEFAULTS, argv, checks=CHECKS)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    t0 = time.time()
    try:
        prompts = read_prompts(cfg.prompts, cfg.n_prompts)
        examples = read_hellaswag(cfg.hellaswag, cfg.hellaswag_n) if cfg.hellaswag else None
        tuned, ckpt = GPT.from_checkpoint(cfg.out_dir, device)
        tokenizer = tok.from_meta(ckpt['tokenizer']['tokenizer'])
        base, base_tokenizer, fmt = load_base(cfg.base)
        check_same_tokenizer(tokenizer, base_tokenizer, cfg.out_dir, cfg.base)
        if tuned.config.vocab_size != base.config.vocab_size:
            raise ValueError(f"{cfg.out_dir}'s model has {tuned.config.vocab_size} output rows, "
                             f"{cfg.base}'s {base.config.vocab_size}")
        base, fmt = base.to(device), dialog.get(fmt)  # the base's format: it writes the completions
        with autocast(device, dtype):
            completions, cache, cached = base_completions(
                base, tokenizer, fmt, prompts, cfg.max_new_tokens, cfg.batch_size,
                cfg.base_cache or cfg.out_dir, dtype)
    except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
        raise SystemExit(f"error: {e}")
    with autocast(device, dtype):
        report = {'out_dir': cfg.out_dir, 'base': cfg.base, 'max_new_tokens': cfg.max_new_tokens,
                  **measure(tuned, base, tokenizer, fmt, prompts, cfg.max_new_tokens, cfg.batch_size,
                            cfg.seed, completions),
                  'base_cache': cache, 'base_cache_hit': cached}
        if examples is None:
            report['hellaswag'] = 'skipped (pass --hellaswag=PATH)'
        else:
            scores = {name: multiple_choice(model, tokenizer, examples, cfg.batch_size)
                      for name, model in (('base', base), ('tuned', tuned))}
            report['hellaswag'] = {'n': len(examples), **{f'{name}_{k}': s[k] for name, s in scores.items()
                                                          for k in ('acc', 'acc_norm')},
                                   **{f'{k}_drop': scores['base'][k] - scores['tuned'][k]
                                      for k in ('acc', 'acc_norm')}}
    report['seconds'] = round(time.time() - t0, 1)
    print(json.dumps(report))


if __name__ == '__main__':
    main(sys.argv[1:])
