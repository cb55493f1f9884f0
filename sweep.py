"""
A grid of training runs from a config file, run by a pool of worker processes; every finished run
appends one row to DIR/results.csv, and running the sweep again runs only what is missing.

    python sweep.py config/sweep_cpu.py --out_dir=sweeps/cpu          # run (or finish) the grid
    python sweep.py config/sweep_cpu.py --emit_jobs=jobs.txt          # one command line per run
    python sweep.py config/sweep_cpu.py --only=qa-N32-a1-w32-L2-H2-s0 # just that run, in-process
    python plot.py --results=sweeps/cpu/results.csv --out_dir=sweeps/cpu
    python sweep.py config/sweep_finetune_cpu.py                      # the large-scale study

The grid is every combination of the list-valued keys (n_people, dataset, model, n_embd, n_layer,
n_head, seed, alpha). model 'scratch' trains a new model of the grid's shape (the controlled
study); any other value is a pretrained model (smollm2-135m, a .gguf, a Hugging Face folder)
fine-tuned on data written in its tokens, whose shape is its own; its row adds the drift
figures of drift.py (KL and TV from the base model on general prompts, HellaSwag if given).
Every other train.py key may be set too, as one value shared by all runs, or for one dataset
only through per_dataset (e.g. shorter budgets for the in-tool runs).
A run's seed seeds both its people and its model. Datasets are prepared once per (n_people,
n_ood, alpha, seed) under DIR/data and shared by the qa and qatool runs that need them. A run
interrupted midway starts over; only its final checkpoint is kept, in DIR/runs/RUN_ID.
"""
import contextlib
import csv
import fcntl
import io
import itertools
import json
import multiprocessing as mp
import os
import shlex
import shutil
import sys
import time
import traceback

import torch

import configurator
import dialog
import prepare_data
import pretrained
import train
from model import GPT, autocast, resolve_dtype

GRID = ('n_people', 'dataset', 'model', 'n_embd', 'n_layer', 'n_head', 'seed', 'alpha')
SWEEP = dict(
    out_dir='sweeps/default',  # results.csv, runs/RUN_ID/ (checkpoint, log), data/, sweep.json
    # the grid: one run per combination
    n_people=[16, 64],
    dataset=['qa', 'qatool'],  # in-weight, in-tool
    model=['scratch'],         # 'scratch' (a new model of the grid's shape) or pretrained models
    n_embd=[16, 32],
    n_layer=[2],
    n_head=[2],
    seed=[0],
    alpha=[1.0],
    exclude=[],                # grid points to skip: [{'dataset': 'qa', 'n_people': 4096}, ...]
    # per-run choices that depend on the grid point
    n_ood=200,                 # never-trained people in every dataset (for recall_ood)
    eval_questions=256,        # cap: a run evaluates min(4 * n_people, this) questions per split
    iters_per_person=0.0,      # a run's step budget: min(max_iters, min_iters + this * n_people)
    min_iters=0,               # the step budget's floor (see iters_per_person)
    lr_ref_width=0,            # >0: learning_rate and min_lr are for this width, scaled by
                               # lr_ref_width / n_embd for the others (Adam's lr ~ 1 / width)
    stop_metric={'qa': 'recall', 'qatool': 'recall_min'},  # early stop: in-weight on own people,
                                                           # in-tool on both populations
    per_dataset={},            # settings for one dataset only: {'qatool': {'min_iters': 400}}
    # what fine-tuning cost a pretrained model (drift.py), measured on each run's final weights
    drift_prompts=0,           # the first this many general prompts; 0: all
    drift_tokens=32,           # the base model's completion of each, at most
    hellaswag='',              # HellaSwag's JSONL: acc_norm of base and tuned; '' skips it
    hellaswag_n=500,           # its first this many examples
    # running
    compile=False,             # runs are short (median 91 s in config/sweep_cpu.py): compiling each costs ~30 s
    workers=0,                 # processes; 0: one per GPU if CUDA, else one per CPU core
    only='',                   # run just this RUN_ID in this process (for cluster arrays)
    emit_jobs='',              # write the pending runs' command lines to this file, run nothing
)
# train.py keys set per run by the sweep, and settings that cannot change a run's result
PER_RUN = ('out_dir', 'data_dir', 'dataset', 'n_embd', 'n_layer', 'n_head', 'seed', 'overwrite',
           'init_from', 'max_iters', 'eval_questions', 'stop_metric')
# settings of the whole sweep, which per_dataset cannot change (data is shared by both datasets)
SWEEP_WIDE = ('out_dir', 'data_dir', 'overwrite', 'init_from', 'stop_metric', 'per_dataset', 'exclude',
              'n_ood', 'workers', 'threads', 'device', 'only', 'emit_jobs', 'drift_prompts',
              'drift_tokens', 'hellaswag', 'hellaswag_n')
NOT_RESULTS = ('device', 'threads', 'compile', 'kernels', 'log_interval', 'ckpt_interval',
               'workers', 'only', 'emit_jobs', 'out_dir', 'exclude') + GRID
DEFAULTS = {**train.DEFAULTS, 'threads': 1, 'stop_value': 0.95, 'eval_interval': 200,
            'ckpt_interval': 10**9, **SWEEP}
CHECKS = {**{k: v for k, v in train.CHECKS.items() if k not in GRID + ('stop_metric',)},
          'dataset': lambda names: next((f'{n!r}: {train.check_dataset(n)}' for n in names
                                         if train.check_dataset(n)), None),
          'model': lambda models: next((f"{m!r}: 'scratch' or a pretrained model ('smollm2-135m', a "
                                        f".gguf file, a Hugging Face folder)" for m in models
                                        if m != 'scratch' and not pretrained.is_model(m)), None)}
COLUMNS = ('run_id', 'n_people', 'n_facts', 'dataset', 'seed', 'n_embd', 'n_layer', 'n_head',
           'alpha', 'num_params', 'steps', 'max_iters', 'best_loss', 'val_loss', 'recall',
           'recall_ood', 'eval_questions', 'wall_s', 'model', 'trainable_params', 'kl_base_tuned',
           'kl_tuned_base', 'tv', 'top1_agree', 'hellaswag_base', 'hellaswag_tuned')
DRIFT_COLUMNS = ('kl_base_tuned', 'kl_tuned_base', 'tv', 'top1_agree')
FACTS_PER_PERSON = len(prepare_data.ATTRIBUTES)


# ----------------------------------------------------------------------------------------------
# The grid and the results file

def run_id(run):
    """A stable, readable name for a grid point: qatool-N64-a1-w32-L2-H2-s0, or for a pretrained
    model (whose shape is its own) qatool-N64-a1-smollm2-135m-s0."""
    shape = (f"w{run['n_embd']}-L{run['n_layer']}-H{run['n_head']}" if is_scratch(run)
             else model_tag(run['model']))
    return f"{run['dataset']}-N{run['n_people']}-a{run['alpha']:g}-{shape}-s{run['seed']}"


def is_scratch(run):
    return run.get('model', 'scratch') == 'scratch'


def model_tag(model):
    """'smollm2-135m', '/models/Llama-3.2-1B/' -> 'Llama-3.2-1B', 'x/y.Q8_0.gguf' -> 'y.Q8_0'."""
    name = os.path.basename(os.path.normpath(model))
    return name[:-len('.gguf')] if name.endswith('.gguf') else name


def expand(cfg):
    """Every combination of the grid lists, less the excluded ones -> runs (dicts with an 'id')."""
    for rule in cfg.exclude:
        if not isinstance(rule, dict) or set(rule) - set(GRID):
            raise SystemExit(f"error: exclude rule {rule!r}: a dict of grid keys {GRID}")
    check_per_dataset(cfg)
    runs = {}
    for values in itertools.product(*(getattr(cfg, k) for k in GRID)):
        run = dict(zip(GRID, values))
        if not any(all(run[k] == v for k, v in rule.items()) for rule in cfg.exclude):
            runs.setdefault(run_id(run), {'id': run_id(run), **run})
    return list(runs.values())


def setting(cfg, run, key):
    """A setting's value for this run: per_dataset's value for its dataset, else the shared one."""
    return cfg.per_dataset.get(run['dataset'], {}).get(key, getattr(cfg, key))


def check_per_dataset(cfg):
    """per_dataset names datasets of the grid, and settings that exist (a typo is not ignored)."""
    for dataset, overrides in cfg.per_dataset.items():
        if dataset not in cfg.dataset or not isinstance(overrides, dict):
            raise SystemExit(f"error: per_dataset[{dataset!r}]: keys are datasets of the grid "
                             f"{cfg.dataset}, values dicts of settings")
        unknown = (set(overrides) - set(DEFAULTS)) | (set(overrides) & set(GRID + SWEEP_WIDE))
        if unknown:
            raise SystemExit(f"error: per_dataset[{dataset!r}] cannot set {sorted(unknown)}; it takes "
                             f"train.py's and sweep.py's shared settings (max_iters, batch_size, ...)")


def max_iters_of(cfg, run):
    """The step budget: larger datasets get more steps, up to max_iters."""
    max_iters, min_iters, per_person = (setting(cfg, run, k) for k in
                                        ('max_iters', 'min_iters', 'iters_per_person'))
    if not per_person:
        return max_iters
    return min(max_iters, min_iters + round(per_person * run['n_people']))


def finished_ids(path):
    """Run ids with a complete row in results.csv (a torn last line does not count)."""
    if not os.path.exists(path):
        return set()
    with open(path, newline='') as f:
        return {r['run_id'] for r in csv.DictReader(f) if r.get('wall_s') not in (None, '')}


def append_row(path, row):
    """One row per write, under an exclusive lock: safe for a pool or a Slurm array of writers.
    The header is written by whoever finds the file empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, extrasaction='ignore', lineterminator='\n')
    with open(path, 'a+', newline='') as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            writer.writeheader()
        else:
            f.seek(end - 1)
            if f.read(1) != '\n':  # a writer died mid-line: start a fresh line
                buf.write('\n')
        writer.writerow(row)
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


def check_settings(cfg):
    """Rows of one results.csv must come from one set of training settings: refuse to mix."""
    settings = {k: v for k, v in sorted(vars(cfg).items()) if k not in NOT_RESULTS}
    path = os.path.join(cfg.out_dir, 'sweep.json')
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [f'{k}: {old.get(k)!r} -> {v!r}' for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise SystemExit(f"error: {cfg.out_dir} holds runs made with other settings "
                             f"({'; '.join(diff)}): use another --out_dir")
    else:  # written whole, then renamed: tasks of an array may race here harmlessly
        with open(f'{path}.tmp{os.getpid()}', 'w') as f:
            json.dump(settings, f, indent=2)
        os.replace(f.name, path)


# ----------------------------------------------------------------------------------------------
# One run

def ensure_data(cfg, n_people, alpha, seed, model='scratch'):
    """The dataset for these people (in a pretrained model's tokens and chat format, for one),
    prepared once. Written to a private folder and renamed into place, so concurrent workers
    never see half a dataset (same seed, same bytes: any one wins)."""
    root = os.path.join(cfg.out_dir, 'data')
    tokens = '' if model == 'scratch' else f'-{model_tag(model)}'
    path = os.path.join(root, f'N{n_people}-ood{cfg.n_ood}-a{alpha:g}-s{seed}{tokens}')
    if os.path.isdir(path):
        return path
    tmp = f'{path}.tmp{os.getpid()}'
    flags = [f'--out_dir={tmp}', f'--n_people={n_people}', f'--n_ood={cfg.n_ood}',
             f'--alpha={alpha}', f'--seed={seed}', '--overwrite=True']
    flags += [] if model == 'scratch' else [f'--tokenizer={model}']
    with contextlib.redirect_stdout(io.StringIO()):
        prepare_data.prepare(configurator.parse(prepare_data.DEFAULTS, flags))
    try:
        os.rename(tmp, path)
    except OSError:  # another worker renamed its copy first
        shutil.rmtree(tmp)
    return path


def train_config(cfg, run, data_dir, device):
    """train.py's config for one run: the sweep's shared settings plus the grid point."""
    tcfg = configurator.parse(train.DEFAULTS, [])
    vars(tcfg).update({k: setting(cfg, run, k) for k in train.DEFAULTS if k not in PER_RUN})
    vars(tcfg).update({k: run[k] for k in ('dataset', 'seed')})
    if is_scratch(run):  # a pretrained model's shape is its own
        vars(tcfg).update({k: run[k] for k in ('n_embd', 'n_layer', 'n_head')})
    else:
        tcfg.init_from = run['model']
    vars(tcfg).update(out_dir=os.path.join(cfg.out_dir, 'runs', run['id']), data_dir=data_dir,
                      overwrite=True, device=device, max_iters=max_iters_of(cfg, run),
                      stop_metric=cfg.stop_metric.get(run['dataset'], 'recall'),
                      eval_questions=min(FACTS_PER_PERSON * run['n_people'],
                                         setting(cfg, run, 'eval_questions')))
    ref_width = setting(cfg, run, 'lr_ref_width')
    if ref_width and is_scratch(run):  # narrow models learn too slowly at a wide one's learning rate
        scale = ref_width / run['n_embd']
        tcfg.learning_rate, tcfg.min_lr = tcfg.learning_rate * scale, tcfg.min_lr * scale
    return tcfg


def train_run(run, cfg, device='cpu'):
    """Prepare the data if needed, train (from scratch, or fine-tune a pretrained model and
    measure its drift), and return the run's results row."""
    t0 = time.time()
    data_dir = ensure_data(cfg, run['n_people'], run['alpha'], run['seed'], run.get('model', 'scratch'))
    tcfg = train_config(cfg, run, data_dir, device)
    os.makedirs(tcfg.out_dir, exist_ok=True)
    with open(os.path.join(tcfg.out_dir, 'log.txt'), 'w') as log, contextlib.redirect_stdout(log):
        result = train.train(tcfg)
        drift = {} if is_scratch(run) else measure_drift(cfg, run, tcfg.out_dir, device)
    return {**{k: run[k] for k in GRID}, 'run_id': run['id'], **drift,
            **{k: getattr(tcfg, k) for k in ('n_embd', 'n_layer', 'n_head')},  # the model's own
            'n_facts': FACTS_PER_PERSON * run['n_people'], 'num_params': result['num_params'],
            'steps': result['step'], 'max_iters': tcfg.max_iters,
            'best_loss': round(result['best_loss'], 5), 'val_loss': round(result['val_loss'], 5),
            'recall': result.get('recall', ''), 'recall_ood': result.get('recall_ood', ''),
            'trainable_params': result.get('trainable_params', ''), 'eval_questions': tcfg.eval_questions, 'wall_s': round(time.time() - t0, 1)}


_bases = {}  # a worker's pretrained base models, loaded once: (model, tokenizer, format)


def measure_drift(cfg, run, out_dir, device):
    """drift.py's figures for a fine-tuned run against its base model -> columns of its row.
    The base's completions of the general prompts are written once for the whole sweep."""
    import drift  # imports pretrained.py: only a sweep of pretrained models needs it
    if run['model'] not in _bases:
        model, tokenizer, fmt = pretrained.load(run['model'], device)
        _bases[run['model']] = model, tokenizer, dialog.get(fmt)
    base, tokenizer, fmt = _bases[run['model']]
    tuned, _ = GPT.from_checkpoint(out_dir, device)
    prompts = drift.read_prompts('', cfg.drift_prompts)
    dtype = resolve_dtype('auto', device)
    with autocast(device, dtype):
        completions, _, _ = drift.base_completions(base, tokenizer, fmt, prompts, cfg.drift_tokens,
                                                   32, cfg.out_dir, dtype)
        report = drift.measure(tuned, base, tokenizer, fmt, prompts, cfg.drift_tokens, seed=run['seed'],
                               completions=completions)
        row = {k: round(report[k], 5) for k in DRIFT_COLUMNS}
        if cfg.hellaswag:
            examples = drift.read_hellaswag(cfg.hellaswag, cfg.hellaswag_n)
            for name, model in (('base', base), ('tuned', tuned)):
                row[f'hellaswag_{name}'] = round(drift.multiple_choice(model, tokenizer, examples)['acc_norm'], 4)
    with open(os.path.join(out_dir, 'drift.json.tmp'), 'w') as f:
        json.dump(report, f, indent=2)
    os.replace(f.name, os.path.join(out_dir, 'drift.json'))
    return row


# ----------------------------------------------------------------------------------------------
# The pool: each worker takes a device once, then trains runs one after another

_worker = {}


def _init_worker(devices, run_fn, threads):
    """devices: a queue of the pool's devices (one each), or the device itself."""
    torch.set_num_threads(max(1, threads))
    _worker.update(device=devices if isinstance(devices, str) else devices.get(), run_fn=run_fn)


def _work(job):
    run, cfg = job
    try:
        return run, _worker['run_fn'](run, cfg, _worker['device']), None
    except Exception:
        return run, None, traceback.format_exc()


def pick_devices(cfg):
    """-> (number of workers, device of each worker)."""
    cuda = cfg.device.startswith('cuda') or (cfg.device == 'auto' and torch.cuda.is_available())
    n_gpu = torch.cuda.device_count() if cuda else 0
    workers = cfg.workers or n_gpu or os.cpu_count() or 1
    return workers, [f'cuda:{i % n_gpu}' if n_gpu else 'cpu' for i in range(workers)]


def emit_jobs(path, argv, runs):
    """One shell line per run: `sed -n "${SLURM_ARRAY_TASK_ID}p" jobs.txt | bash` in an array."""
    keep = [a for a in argv if not a.startswith(('--emit_jobs=', '--only=', '--workers='))]
    base = ' '.join(shlex.quote(a) for a in ['python', 'sweep.py', *keep, '--workers=1'])
    with open(path, 'w') as f:
        f.writelines(f'{base} --only={run["id"]}\n' for run in runs)
    print(f"wrote {len(runs)} job lines to {path}")


def sweep(cfg, run_fn=train_run, argv=()):
    """Run every grid point not yet in results.csv; returns the rows finished by this call."""
    runs = expand(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    results = os.path.join(cfg.out_dir, 'results.csv')
    done = finished_ids(results)
    if cfg.only:
        runs = [r for r in runs if r['id'] == cfg.only]
        if not runs:
            raise SystemExit(f"error: no run {cfg.only!r} in this grid; see --emit_jobs")
    todo = [r for r in runs if r['id'] not in done]
    # the biggest runs first: with runs of very different lengths that ends the sweep sooner
    todo.sort(key=lambda r: (r['n_people'] * r['n_embd'] ** 2, r['id']), reverse=True)
    if cfg.emit_jobs:
        emit_jobs(cfg.emit_jobs, argv, todo)
        return []
    check_settings(cfg)
    workers, devices = pick_devices(cfg)
    workers = min(workers, len(todo)) or 1
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // workers)  # 0: the cores shared out
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already in {results}, {len(todo)} to run "
          f"on {workers} worker(s)", flush=True)
    rows, failed, t0, pool = [], 0, time.time(), None
    if workers == 1:  # in this process: no pickling, and easy to debug
        _init_worker(devices[0], run_fn, threads)
        finished = map(_work, ((r, cfg) for r in todo))
    else:
        ctx = mp.get_context('spawn')  # fresh interpreters: no forked torch or CUDA state
        queue = ctx.Queue()
        for device in devices[:workers]:
            queue.put(device)
        pool = ctx.Pool(workers, _init_worker, (queue, run_fn, threads))
        finished = pool.imap_unordered(_work, [(r, cfg) for r in todo])
    try:
        for i, (run, row, error) in enumerate(finished, 1):
            if row is None:
                failed += 1
                print(f"FAILED {run['id']} (left missing: a rerun retries it)\n{error}", flush=True)
            else:
                append_row(results, row)
                rows.append(row)
            elapsed = max(time.time() - t0, 1e-6)
            status = (f"recall {row['recall']} ood {row['recall_ood']} params {row['num_params']} "
                      f"steps {row['steps']} {row['wall_s']}s" if row else 'failed')
            print(f"[{i}/{len(todo)} | {i / elapsed * 60:.2f} runs/min | eta "
                  f"{elapsed / i * (len(todo) - i) / 60:.1f} min] {run['id']}: {status}", flush=True)
    finally:  # every task done, or interrupted: stop the workers either way
        if pool:
            pool.terminate()
    print(f"done: {len(rows)} runs in {(time.time() - t0) / 60:.1f} min, {failed} failed; "
          f"results in {results}")
    return rows


def main(argv):
    sweep(configurator.main_parse(DEFAULTS, argv, checks=CHECKS), argv=argv)


if __name__ == '__main__':
    main(sys.argv[1:])
