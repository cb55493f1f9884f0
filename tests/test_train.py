"""train.py on real shards: packing, learning, exact resume, DDP, and its error messages."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import configurator
import train
from configurator import ConfigError
from model import CheckpointError, cpu_has_bf16, load_checkpoint
from conftest import prepare_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return prepare_dataset(tmp_path_factory.mktemp('data'), 40, 12)


def config(data_dir, out_dir, *flags):
    return configurator.parse(train.DEFAULTS, [
        f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--n_embd=32', '--n_head=2', '--batch_size=6',
        '--warmup_iters=2', '--learning_rate=3e-3', '--log_interval=1', '--eval_interval=1000',
        '--eval_iters=1', '--device=cpu', '--threads=1', *flags])


def final_params(out_dir):
    return load_checkpoint(str(out_dir))['model']


def test_rows_hold_whole_dialogs_in_seeded_order(data_dir):
    batches = train.PackedBatches(data_dir, {'qa': 1.0}, 'train', 255, seed=3)
    tokens, mask, doc_ids = batches.next_rows(4)
    eod = 259
    for row, docs in zip(tokens, doc_ids):
        real = docs >= 0
        assert real[0] and not real[np.argmin(real):].any()  # dialogs first, then padding
        assert row[0] == 256  # a row starts at a dialog start (<|user|>)
        ends = np.flatnonzero(row == eod)
        assert ends[-1] == real.sum() - 1 and len(ends) == docs.max() + 1 > 1  # packed, whole
        assert 256 - real.sum() < 100  # the next dialog (<= 102 tokens) did not fit
    again = train.PackedBatches(data_dir, {'qa': 1.0}, 'train', 255, seed=3).next_rows(4)
    other = train.PackedBatches(data_dir, {'qa': 1.0}, 'train', 255, seed=4).next_rows(4)
    assert np.array_equal(tokens, again[0]) and not np.array_equal(tokens, other[0])


def test_mixture_draws_from_each_dataset_by_weight(data_dir):
    batches = train.PackedBatches(data_dir, train.parse_mixture('bio:1,qa:3'), 'train', 255, seed=0)
    shard_of = batches.order[:, 0]
    assert abs((shard_of == 1).mean() - 0.75) < 0.02


def test_training_drives_the_loss_down(data_dir, tmp_path):
    result = train.train(config(data_dir, tmp_path, '--max_iters=40'))
    rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
    losses = [r['loss'] for r in rows if 'loss' in r]
    assert losses[-1] < 0.7 * losses[0]
    assert result['val_loss'] < 0.7 * np.log(260)
    assert json.load(open(tmp_path / 'config.json'))['n_embd'] == 32


def test_evaluations_during_training_read_the_weights_of_their_step(data_dir, tmp_path, monkeypatch):
    """train.py's recall evaluations generate from the weights as they are at that step, on a model
    whose decode steps run in one C call from copies of its weights (width 64, heads of 32): fused
    AdamW changes weights without bumping their versions, and copies kept by version went stale."""
    import model as model_py
    prefill, agreed = model_py.GPT.prefill, []

    def checked(self, idx, lengths):  # each generation's first logits against a plain forward pass
        logits = prefill(self, idx, lengths)
        full, _ = self(idx)
        agreed.append(torch.allclose(logits, full[torch.arange(len(idx)), lengths - 1], rtol=1e-4, atol=1e-4))
        return logits
    monkeypatch.setattr(model_py.GPT, 'prefill', checked)
    train.train(config(data_dir, tmp_path, '--max_iters=4', '--eval_interval=2', '--eval_questions=4',
                       '--n_embd=64', '--dtype=float32', '--compile=False'))
    assert len(agreed) >= 4 and all(agreed), agreed


def test_resumed_run_matches_uninterrupted_run_bitwise(data_dir, tmp_path):
    schedule = ['--lr_decay_iters=8', '--warmup_iters=2']
    train.train(config(data_dir, tmp_path / 'full', '--max_iters=8', *schedule))
    train.train(config(data_dir, tmp_path / 'split', '--max_iters=3', *schedule))
    train.train(config(data_dir, tmp_path / 'split', '--max_iters=8', '--init_from=resume', *schedule))
    full, split = final_params(tmp_path / 'full'), final_params(tmp_path / 'split')
    assert all(torch.equal(full[k], split[k]) for k in full)


def test_resume_refuses_another_model_shape(data_dir, tmp_path):
    train.train(config(data_dir, tmp_path, '--max_iters=1'))
    with pytest.raises(CheckpointError, match='n_embd: checkpoint 32, now 64'):
        train.train(config(data_dir, tmp_path, '--max_iters=2', '--init_from=resume', '--n_embd=64'))
    with pytest.raises(CheckpointError, match='--init_from=resume'):
        train.train(config(data_dir, tmp_path, '--max_iters=2'))  # would overwrite the checkpoint


@pytest.mark.parametrize('n_proc, flags', [(2, []), (4, ['--gradient_accumulation_steps=2'])])
def test_torchrun_on_a_shipped_config_makes_the_updates_of_one_process(data_dir, tmp_path, n_proc, flags):
    """config/quick.py as shipped (64 rows a step), made tiny by flags that do not touch the
    batch: each process takes its share of every micro-batch, weighted by its loss tokens. Both
    in float32, eager (as conftest.py sets for this process): the sums are then comparable."""
    flags = ['config/quick.py', f'--data_dir={data_dir}', '--dtype=float32', '--compile=False',
             '--n_embd=32', '--max_iters=3', '--warmup_iters=1',
             '--eval_interval=1000', '--eval_iters=1', '--eval_questions=0', '--stop_metric=',
             '--log_interval=1', '--device=cpu', '--threads=1', *flags]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    ddp = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                          f'--nproc_per_node={n_proc}', 'train.py', *flags, f'--out_dir={tmp_path}/ddp'],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    train.train(configurator.parse(train.DEFAULTS, [*flags, f'--out_dir={tmp_path}/single']))
    a, b = final_params(tmp_path / 'ddp'), final_params(tmp_path / 'single')
    for k in a:  # all-reduce sums gradients in another order than one process: a few ulps
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    logged = [json.loads(l) for l in open(tmp_path / 'ddp' / 'metrics.jsonl')]
    single = [json.loads(l) for l in open(tmp_path / 'single' / 'metrics.jsonl')]
    loss = lambda rows: [r['loss'] for r in rows if 'loss' in r]  # the step's loss, all processes'
    assert len(loss(logged)) == 3 and loss(logged) == pytest.approx(loss(single), rel=1e-4)


def test_a_batch_too_small_to_share_is_refused_naming_the_option(data_dir, tmp_path):
    with pytest.raises(ConfigError, match='batch_size 3 rows cannot be shared by 4 processes: use --batch_size=4'):
        train.check_options(config(data_dir, tmp_path, '--batch_size=3'), world=4)


def test_missing_data_and_mismatched_shards_name_the_fix(tmp_path, data_dir):
    with pytest.raises(train.DataError, match='python prepare_data.py --out_dir='):
        train.train(config(tmp_path / 'nothing', tmp_path / 'out', '--max_iters=1'))
    with pytest.raises(train.DataError, match='vocab of 260, the model has 300'):
        train.open_shard(data_dir, 'qa_train', vocab_size=300)
    with pytest.raises(train.DataError, match='raise block_size'):
        train.PackedBatches(data_dir, {'qatool': 1.0}, 'train', 100, seed=0)


def test_command_line_errors_are_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, 'train.py', '--lerning_rate=1', f'--out_dir={tmp_path}'],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.startswith("error: unknown config key 'lerning_rate'")
    assert 'learning_rate' in r.stderr and 'Traceback' not in r.stderr
    r = subprocess.run([sys.executable, 'train.py', f'--data_dir={tmp_path}/none', f'--out_dir={tmp_path}'],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and 'prepare_data.py' in r.stderr and 'Traceback' not in r.stderr


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = configurator.parse(train.DEFAULTS, ['--warmup_iters=10', '--max_iters=110', '--min_lr=1e-4'])
    lrs = [train.lr_at(s, cfg) for s in range(111)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[110] == pytest.approx(1e-4)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    forward, calls = train.GPT.packed_loss, []

    def nan_after_five(self, *args, **kwargs):
        loss = forward(self, *args, **kwargs)
        calls.append(1)
        return loss * float('nan') if len(calls) > 5 and self.training else loss

    monkeypatch.setattr(train.GPT, 'packed_loss', nan_after_five)
    with pytest.raises(FloatingPointError, match='last good checkpoint'):
        train.train(config(data_dir, tmp_path, '--max_iters=10', '--ckpt_interval=4'))
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt['step'] == 4 and all(torch.isfinite(p).all() for p in ckpt['model'].values())


def test_corrupt_checkpoint_is_named_and_refused(data_dir, tmp_path):
    train.train(config(data_dir, tmp_path, '--max_iters=1'))
    path = tmp_path / 'ckpt.pt'
    path.write_bytes(path.read_bytes()[:1000])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match=f'{path} cannot be read'):
        train.train(config(data_dir, tmp_path, '--max_iters=2', '--init_from=resume'))


def test_compile_on_cpu_without_a_compiler_says_what_to_install(monkeypatch):
    import cpu_kernels
    monkeypatch.setattr(cpu_kernels.shutil, 'which', lambda name: None)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match='needs a C\\+\\+ compiler.*--compile=False'):
        train.compiled(model, 'cpu')


def test_more_processes_than_gpus_is_one_line_from_the_first_process(monkeypatch):
    """torchrun --nproc_per_node=8 on a one-GPU machine: process 0 names the fix, the others
    exit quietly, before any of them touches a GPU that is not there."""
    monkeypatch.setattr(train.torch.cuda, 'device_count', lambda: 1)
    with pytest.raises(SystemExit) as first:
        train.check_enough_gpus(0, 8)
    assert str(first.value) == ('error: torchrun started 8 processes on this machine, which has 1 GPU(s): '
                                'use --nproc_per_node=1, or --device=cpu to train on the CPU')
    with pytest.raises(SystemExit) as other:
        train.check_enough_gpus(5, 8)
    assert other.value.code == 1
    train.check_enough_gpus(0, 1)  # one process a GPU: on its way


@pytest.mark.skipif(train.cxx_compiler() is None, reason='no C++ compiler')
def test_compiled_model_matches_eager_on_packed_batches_of_changing_shape(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, '--n_layer=1')  # compiling takes most of this test: keep it small
    meta = train.load_dataset_meta(data_dir)
    model, _, _ = train.build(cfg, meta, 'cpu')
    eager = train.PackedLoss(model)
    fast = train.compiled(eager, 'cpu')
    batches = train.PackedBatches(data_dir, {'qatool': 1.0}, 'train', cfg.block_size, 0, meta['vocab_size'])
    for n_rows in (6, 3):  # two shapes, one graph
        idx, targets, mask, doc_ids = train.to_batch(batches.next_rows(n_rows), 'cpu')
        losses, grads = [], []
        for m in (eager, fast):
            model.zero_grad()
            loss = m(idx, targets, mask, doc_ids)
            loss.backward()
            losses.append(loss.item())
            grads.append([p.grad.clone() for p in model.parameters()])
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(train.cxx_compiler() is None, reason='no C++ compiler')
def test_compiled_training_on_full_batches_compiles_once(data_dir, tmp_path):
    """Every batch has another shape; past the first, none may compile again (~10 s each)."""
    from torch._dynamo.utils import counters
    cfg = config(data_dir, tmp_path, '--n_layer=1', '--batch_size=128')
    meta = train.load_dataset_meta(data_dir)
    model, _, _ = train.build(cfg, meta, 'cpu')
    fast = train.compiled(train.PackedLoss(model), 'cpu')
    batches = train.PackedBatches(data_dir, {'qatool': 1.0}, 'train', cfg.block_size, 0, meta['vocab_size'])
    graphs, shapes = [], set()
    for _ in range(6):
        idx, targets, mask, doc_ids = train.to_batch(batches.next_rows(cfg.batch_size), 'cpu')
        loss = fast(idx, targets, mask, doc_ids)
        loss.backward()
        shapes.add((int((doc_ids >= 0).sum()), int(mask.sum())))
        graphs.append(counters['stats']['unique_graphs'])
    assert len(shapes) > 1 and graphs[1:] == graphs[:1] * 5


def test_the_default_path_as_users_run_it_resumes_bitwise(data_dir, tmp_path):
    """`python train.py config/memory.py` with dtype and compile left at 'auto', at a tiny size:
    bfloat16 where the CPU has bf16 instructions, compiled where a C++ compiler is found."""
    def run(out_dir, *flags):
        done = subprocess.run([sys.executable, 'train.py', 'config/memory.py', f'--data_dir={data_dir}',
                               f'--out_dir={out_dir}', '--n_embd=16', '--batch_size=8', '--warmup_iters=2',
                               '--lr_decay_iters=6', '--eval_interval=1000', '--eval_questions=4',
                               '--log_interval=1', *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return next(json.loads(l) for l in done.stdout.splitlines() if l.startswith('{"config"'))
    setup = run(tmp_path / 'full', '--max_iters=6')
    assert setup['dtype'] == ('bfloat16' if cpu_has_bf16() else 'float32')
    assert setup['compiled'] == (train.cxx_compiler() is not None)
    run(tmp_path / 'split', '--max_iters=3')
    run(tmp_path / 'split', '--max_iters=6', '--init_from=resume')
    full, split = final_params(tmp_path / 'full'), final_params(tmp_path / 'split')
    assert all(torch.equal(full[k], split[k]) for k in full)


MMAPPED_BYTES = """
import ctypes, sys, types, torch
sys.path.insert(0, '.')
import train
if sys.argv[1] == 'train':
    train.setup_device(types.SimpleNamespace(device='cpu', threads=1, dtype='auto'))
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost'.split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblkhd  # bytes in blocks glibc mmapped: unmapped again when freed
x = torch.ones(5 << 20)  # 20 MB, the size of a hidden activation at batch 128
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not hasattr(__import__('ctypes').CDLL(None), 'mallinfo2'), reason='not glibc >= 2.33')
def test_cpu_training_keeps_freed_activations_for_reuse():
    def mmapped(mode):
        out = subprocess.run([sys.executable, '-c', MMAPPED_BYTES, mode], capture_output=True, text=True,
                             check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return int(out.stdout)
    assert mmapped('default') >= 20 << 20  # glibc's default: such blocks are mmapped, faulted in anew
    assert mmapped('train') == 0            # kept: they come from the heap and are reused


def test_metrics_file_starts_anew_on_overwrite_and_grows_on_resume(data_dir, tmp_path):
    rows = lambda: [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
    train.train(config(data_dir, tmp_path, '--max_iters=3'))
    first = rows()
    assert [r['step'] for r in first] == [1, 2, 3, 3] and all(r['time'] > 1.7e9 for r in first)
    train.train(config(data_dir, tmp_path, '--max_iters=2', '--overwrite=True'))
    assert [r['step'] for r in rows()] == [1, 2, 2]  # the old run's rows are gone
    train.train(config(data_dir, tmp_path, '--max_iters=4', '--init_from=resume'))
    assert [r['step'] for r in rows()] == [1, 2, 2, 3, 4, 4]
    assert all(a['time'] <= b['time'] for a, b in zip(rows(), rows()[1:]))


def test_wandb_logging_when_asked(data_dir, tmp_path, monkeypatch):
    pytest.importorskip('wandb', reason='wandb is optional and not installed')
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_DIR', str(tmp_path))
    train.train(config(data_dir, tmp_path, '--max_iters=2', '--wandb_log=True', '--wandb_run_name=t'))
    assert list((tmp_path / 'wandb').glob('offline-run-*'))
    assert len(open(tmp_path / 'metrics.jsonl').readlines()) == 3  # the JSONL stays the record


def test_a_run_starts_from_another_runs_weights_and_shape(data_dir, tmp_path):
    """In-weight first, then in-tool from its weights: the shape comes from the checkpoint."""
    train.train(config(data_dir, tmp_path / 'qa', '--dataset=qa', '--max_iters=3', '--n_embd=48', '--n_head=3'))
    cfg = configurator.parse(train.DEFAULTS, [
        f'--data_dir={data_dir}', f'--out_dir={tmp_path}/tool', f'--init_from={tmp_path}/qa', '--max_iters=0',
        '--eval_iters=1', '--device=cpu', '--threads=1', '--batch_size=6'], checks=train.CHECKS)
    train.train(cfg)
    first, second = final_params(tmp_path / 'qa'), final_params(tmp_path / 'tool')
    assert all(torch.equal(first[k], second[k]) for k in first)  # its weights, no step taken yet
    assert load_checkpoint(str(tmp_path / 'tool'))['model_args']['n_embd'] == 48
    with pytest.raises(ConfigError, match=r"--n_embd=32 contradicts .*n_embd=48: drop the flag"):
        train.train(config(data_dir, tmp_path / 'other', f'--init_from={tmp_path}/qa', '--max_iters=1'))


def test_a_run_from_another_runs_weights_resumes_exactly_without_its_shape_flags(data_dir, tmp_path):
    """Its shape came from the other run's model: resume takes it from the checkpoint again."""
    train.train(config(data_dir, tmp_path / 'qa', '--dataset=qa', '--max_iters=2', '--n_embd=48', '--n_head=3'))
    parse = lambda *flags: configurator.parse(train.DEFAULTS, [
        f'--data_dir={data_dir}', '--eval_iters=1', '--eval_interval=1000', '--device=cpu', '--threads=1',
        '--batch_size=6', '--warmup_iters=1', '--lr_decay_iters=4', *flags], checks=train.CHECKS)
    train.train(parse(f'--out_dir={tmp_path}/full', f'--init_from={tmp_path}/qa', '--max_iters=4'))
    train.train(parse(f'--out_dir={tmp_path}/split', f'--init_from={tmp_path}/qa', '--max_iters=2'))
    train.train(parse(f'--out_dir={tmp_path}/split', '--init_from=resume', '--max_iters=4'))
    full, split = final_params(tmp_path / 'full'), final_params(tmp_path / 'split')
    assert all(torch.equal(full[k], split[k]) for k in full)
    assert load_checkpoint(str(tmp_path / 'split'))['model_args']['n_embd'] == 48
