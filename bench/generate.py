"""
Decode speed of our generation (model.py's KV cache: prefill, then one decode call a token, the
loop agent.py runs) side by side with transformers' `generate` on the same pretrained model, the
same ChatML question prompts, greedy, float32, the same number of new tokens for both.

    python bench/generate.py                                      # SmolLM2-135M, batch 1 and 32
    python bench/generate.py --new_tokens=64 --batch_sizes=[1,8,32] --repeats=5

End of turn is ignored by both (every lane writes new_tokens tokens; after <|im_end|> both go on
feeding what they wrote), so the outputs can be compared token for token. transformers reads the
model as pretrained.export writes it (the same float32 weights; its default attention, left
padding with an attention mask, its own KV cache). Ours decodes a lone lane from a byte-per-value
copy of the weights where they are a GGUF file's low-bit blocks (lowbit.py: the same values in a
third of the bytes; --low_bits=False times the float32 weights instead). Timings alternate
between the two, a median of `repeats` runs each, after an untimed warm-up. Prints one JSON line
for the machine, one per method and batch size (tokens_per_s: new tokens over the wall time of
the whole call, prefill included; decode_tokens_per_s: the tokens after the first over the time
after a prefill, timed alone) and one per batch size comparing them: both ratios (ours over
theirs) and whether the greedy tokens are identical, with the first divergence if not.
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

# the project's root instead of bench/: transformers imports a package named `kernels` when it
# finds one, and bench/kernels.py is not it
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import configurator  # noqa: E402
import dialog  # noqa: E402
import lowbit  # noqa: E402
import pretrained  # noqa: E402
from model import check_device, resolve_device  # noqa: E402

DEFAULTS = dict(
    init_from='smollm2-135m',  # the pretrained model: 'smollm2-135m', a .gguf file, a Hugging Face folder
    batch_sizes=[1, 32],       # lanes generated together, one comparison each
    new_tokens=32,             # tokens every lane writes (end of turn ignored)
    repeats=3,                 # timed runs of each method at each batch size (the median is printed)
    warmup_tokens=4,           # an untimed run of this many tokens first, for each method and batch size
    low_bits=True,             # ours decodes batch 1 from the weights' low-bit blocks where they are some (lowbit.py)
    reference=True,            # also time transformers' generate (pip install transformers)
    device='auto',             # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    threads=0,                 # CPU threads; 0: torch's default (every core)
)
CHECKS = dict(device=check_device, new_tokens=lambda n: None if n >= 2 else 'at least 2 (prefill writes the first)',
              repeats=lambda n: None if n >= 1 else 'at least 1')
# ChatML questions of different lengths: lane i asks TEMPLATES[i % 4] about TOPICS[i // 4 % 8]
TEMPLATES = ('What is the capital of {}?', 'Describe the climate of {} in two sentences.',
             'Name three famous people from {} and say what each is known for.', 'What do people eat in {}?')
TOPICS = ('France', 'Japan', 'Brazil', 'Kenya', 'Canada', 'India', 'Norway', 'Peru')


def cpu_model():
    """lscpu's Model name (the processor's own name elsewhere)."""
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
        names = [line.split(':', 1)[1].strip() for line in out.splitlines() if line.startswith('Model name:')]
        if names:
            return names[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def prompts(tokenizer, fmt, batch_size):
    """-> the token ids of batch_size question prompts."""
    questions = [TEMPLATES[i % len(TEMPLATES)].format(TOPICS[i // len(TEMPLATES) % len(TOPICS)])
                 for i in range(batch_size)]
    return [tokenizer.encode(fmt.prompt(q)) for q in questions]


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def generate_ours(model, ids, new_tokens):
    """Greedy generation through model.py's KV cache, as agent.py runs it: prompts right-padded in
    one prefill, then one decode call per token for every lane -> (B, new_tokens) token ids."""
    device = model.embed.weight.device
    lengths = torch.tensor([len(p) for p in ids], device=device)
    idx = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long, device=device)
    for b, p in enumerate(ids):
        idx[b, :len(p)] = torch.tensor(p)
    model.setup_cache(len(ids), idx.size(1) + new_tokens)
    logits = model.prefill(idx, lengths)
    out = []
    for i in range(new_tokens):
        out.append(logits.argmax(-1))
        if i + 1 < new_tokens:
            logits = model.decode(out[-1][:, None])
    return torch.stack(out, 1)


def generate_theirs(model, ids, new_tokens):
    """transformers' greedy generate on the same prompts, left-padded with an attention mask, no
    end-of-sequence token (so it writes new_tokens tokens) -> (B, new_tokens) token ids."""
    from transformers import GenerationConfig
    device = model.device
    T = max(map(len, ids))
    idx = torch.zeros(len(ids), T, dtype=torch.long, device=device)
    mask = torch.zeros(len(ids), T, dtype=torch.long, device=device)
    for b, p in enumerate(ids):
        idx[b, T - len(p):], mask[b, T - len(p):] = torch.tensor(p), 1
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        return model.generate(input_ids=idx, attention_mask=mask, generation_config=config)[:, T:]


def divergence(ours, theirs):
    """The first (lane, token) where two (B, n) greedy outputs differ, with both tokens; None when equal."""
    differ = (ours != theirs).nonzero()
    if not len(differ):
        return None
    lane = int(differ[0, 0])
    token = int((ours[lane] != theirs[lane]).nonzero()[0])
    return {'lane': lane, 'token': token, 'ours': int(ours[lane, token]), 'theirs': int(theirs[lane, token]),
            'lanes_identical': int((ours == theirs).all(1).sum())}


def timed_runs(methods, ids, cfg, device):
    """-> ({method: {'whole': seconds of each run, 'prefill': seconds of each first-token-only
    run}}, {method: its (B, new_tokens) greedy tokens}), after an untimed warm-up of each."""
    for net, generate in methods.values():
        generate(net, ids, cfg.warmup_tokens)
    runs, outputs = {name: {'whole': [], 'prefill': []} for name in methods}, {}
    for _ in range(cfg.repeats):  # alternating, so a drifting machine slows both alike
        for name, (net, generate) in methods.items():
            for what, n in (('prefill', 1), ('whole', cfg.new_tokens)):
                sync(device)
                t0 = time.perf_counter()
                outputs[name] = generate(net, ids, n).cpu()
                sync(device)
                runs[name][what].append(time.perf_counter() - t0)
    return runs, outputs


def main(argv):
    cfg = configurator.main_parse(DEFAULTS, argv, checks=CHECKS)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        t0 = time.perf_counter()
        model, tokenizer, fmt = pretrained.load(cfg.init_from, device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    load_s = time.perf_counter() - t0
    low_bit_weights = lowbit.keep_low_bits(model) if cfg.low_bits else 0
    fmt = dialog.get(fmt)
    methods = {'ours': (model, generate_ours)}
    machine = {'cpu': cpu_model(), 'device': device, 'threads': torch.get_num_threads(), 'torch': torch.__version__}
    if device.startswith('cuda'):
        machine['gpu'] = torch.cuda.get_device_name(device)
    if cfg.reference:
        try:
            import transformers
        except ImportError:
            raise SystemExit("error: the reference is transformers': pip install transformers "
                             "(or --reference=False)") from None
        with tempfile.TemporaryDirectory() as folder:  # our weights as a Hugging Face folder
            pretrained.export(model, tokenizer, folder)
            theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        methods['transformers'] = (theirs.to(device).eval(), generate_theirs)
        machine.update(transformers=transformers.__version__, attn_implementation=theirs.config._attn_implementation)
    print(json.dumps({'machine': machine, 'model': cfg.init_from, 'num_params': model.num_params(),
                      'dtype': 'float32', 'load_s': round(load_s, 1), 'low_bit_weights': low_bit_weights}),
          flush=True)
    for batch_size in cfg.batch_sizes:
        ids = prompts(tokenizer, fmt, batch_size)
        for net, generate in methods.values():
            generate(net, ids, cfg.warmup_tokens)
        runs, outputs = timed_runs(methods, ids, cfg, device)
        rate, decode_rate = {}, {}
        for name in methods:
            whole, prefill = statistics.median(runs[name]['whole']), statistics.median(runs[name]['prefill'])
            rate[name] = batch_size * cfg.new_tokens / whole
            decode_rate[name] = batch_size * (cfg.new_tokens - 1) / max(whole - prefill, 1e-9)
            print(json.dumps({'method': name, 'batch_size': batch_size, 'new_tokens': cfg.new_tokens,
                              'prompt_tokens': [min(map(len, ids)), max(map(len, ids))],
                              'seconds': round(whole, 3), 'tokens_per_s': round(rate[name], 1),
                              'prefill_ms': round(1000 * prefill, 1),
                              'decode_ms_per_step': round(1000 * (whole - prefill) / max(cfg.new_tokens - 1, 1), 1),
                              'decode_tokens_per_s': round(decode_rate[name], 1)}), flush=True)
        if cfg.reference:
            first = divergence(outputs['ours'], outputs['transformers'])
            print(json.dumps({'batch_size': batch_size, 'cpu': machine['cpu'],
                              'ratio': round(rate['ours'] / rate['transformers'], 2),
                              'decode_ratio': round(decode_rate['ours'] / decode_rate['transformers'], 2),
                              'identical': first is None, 'first_divergence': first,
                              'sample': tokenizer.decode(outputs['ours'][0].tolist())[:120]}), flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
