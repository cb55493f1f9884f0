"""sweep.py: the grid, resumption and the results schema (plot.py: test_plot.py)."""
import csv
import os

import pytest

import configurator
import sweep


def sweep_config(tmp_path, *flags):
    return configurator.parse(sweep.DEFAULTS, [f'--out_dir={tmp_path}', '--workers=1', *flags])


def fake_row(run, cfg, device='cpu'):
    """What train_run returns, without training: recall grows with width, params ~ width^2."""
    return {**{k: run[k] for k in sweep.GRID}, 'run_id': run['id'],
            'n_facts': 4 * run['n_people'], 'num_params': 100 * run['n_embd'] ** 2, 'steps': 1,
            'max_iters': 1, 'best_loss': 1.0, 'val_loss': 1.0, 'recall': min(1, run['n_embd'] / 64),
            'recall_ood': 0.0, 'eval_questions': 4, 'wall_s': 0.1}


def read_rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# sweep.py

def test_grid_is_the_product_of_the_lists_less_the_excluded(tmp_path):
    cfg = sweep_config(tmp_path, '--n_people=[4, 16, 64]', "--dataset=['qa', 'qatool']",
                       '--n_embd=[8, 16]', '--seed=[0, 1]', "--exclude=[{'dataset': 'qa', 'n_people': 64}]")
    runs = sweep.expand(cfg)
    assert len(runs) == 3 * 2 * 2 * 2 - 2 * 2
    assert len({r['id'] for r in runs}) == len(runs)
    assert 'qatool-N64-a1-w16-L2-H2-s1' in {r['id'] for r in runs}  # stable, readable ids
    assert not any(r['dataset'] == 'qa' and r['n_people'] == 64 for r in runs)
    assert [r['id'] for r in sweep.expand(cfg)] == [r['id'] for r in runs]
    with pytest.raises(SystemExit, match='exclude rule'):
        sweep.expand(sweep_config(tmp_path, "--exclude=[{'width': 8}]"))


def test_step_budget_grows_with_people_up_to_max_iters(tmp_path):
    cfg = sweep_config(tmp_path, '--min_iters=100', '--iters_per_person=2.0', '--max_iters=500')
    assert [sweep.max_iters_of(cfg, {'n_people': n, 'dataset': 'qa'}) for n in (4, 100, 1000)] == [108, 300, 500]


def test_train_config_caps_questions_and_keeps_shared_settings(tmp_path):
    cfg = sweep_config(tmp_path, '--eval_questions=64', '--learning_rate=0.01')
    run = sweep.expand(cfg)[0]
    tcfg = sweep.train_config(cfg, run, 'D', 'cpu')
    assert tcfg.eval_questions == min(64, 4 * run['n_people']) and tcfg.learning_rate == 0.01
    assert tcfg.out_dir == os.path.join(str(tmp_path), 'runs', run['id']) and tcfg.threads == 1


def test_learning_rate_scales_inversely_with_width(tmp_path):
    cfg = sweep_config(tmp_path, '--n_embd=[8, 64]', '--learning_rate=0.003', '--min_lr=0.0003',
                       '--lr_ref_width=64')
    by_width = {r['n_embd']: sweep.train_config(cfg, r, 'D', 'cpu') for r in sweep.expand(cfg)}
    assert by_width[64].learning_rate == pytest.approx(0.003)
    assert by_width[8].learning_rate == pytest.approx(0.024)
    assert by_width[8].min_lr == pytest.approx(0.0024)
    unscaled = sweep_config(tmp_path, '--n_embd=[8]', '--learning_rate=0.003')
    assert sweep.train_config(unscaled, sweep.expand(unscaled)[0], 'D', 'cpu').learning_rate == 0.003


def test_per_dataset_settings_override_the_shared_ones(tmp_path):
    cfg = sweep_config(tmp_path, '--n_people=[100]', "--dataset=['qa', 'qatool']", '--min_iters=500',
                       '--iters_per_person=1.0', '--max_iters=3000', '--batch_size=64',
                       "--per_dataset={'qatool': {'min_iters': 100, 'batch_size': 32, 'max_iters': 150}}")
    runs = {r['dataset']: r for r in sweep.expand(cfg)}
    assert sweep.max_iters_of(cfg, runs['qa']) == 600 and sweep.max_iters_of(cfg, runs['qatool']) == 150
    assert sweep.train_config(cfg, runs['qa'], 'D', 'cpu').batch_size == 64
    assert sweep.train_config(cfg, runs['qatool'], 'D', 'cpu').batch_size == 32
    for bad, match in [("{'qa': {'batchsize': 32}}", "cannot set \\['batchsize'\\]"),
                       ("{'qa': {'n_embd': 32}}", "cannot set \\['n_embd'\\]"),
                       ("{'qa': {'n_ood': 10}}", "cannot set \\['n_ood'\\]"),
                       ("{'qatol': {'batch_size': 32}}", "keys are datasets of the grid")]:
        with pytest.raises(SystemExit, match=match):
            sweep.expand(sweep_config(tmp_path, f"--per_dataset={bad}"))


def test_results_csv_has_one_header_and_survives_a_torn_line(tmp_path):
    path = tmp_path / 'results.csv'
    cfg = sweep_config(tmp_path)
    runs = sweep.expand(cfg)
    sweep.append_row(path, fake_row(runs[0], cfg))
    with open(path, 'a') as f:
        f.write('qa-N99-torn,99')  # a writer killed mid-line
    sweep.append_row(path, fake_row(runs[1], cfg))
    assert open(path).read().count('run_id') == 1
    assert list(read_rows(path)[0]) == list(sweep.COLUMNS)
    assert sweep.finished_ids(path) == {runs[0]['id'], runs[1]['id']}


def test_interrupted_sweep_runs_only_the_missing_runs(tmp_path):
    cfg = sweep_config(tmp_path, '--n_people=[4, 16]', '--n_embd=[8, 16, 32]')
    calls = []

    def interrupted(run, cfg, device):
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C during the 6th run
        calls.append(run['id'])
        return fake_row(run, cfg)

    with pytest.raises(KeyboardInterrupt):
        sweep.sweep(cfg, interrupted)
    assert len(read_rows(tmp_path / 'results.csv')) == 5

    def failing_once(run, cfg, device):
        calls.append(run['id'])
        if len(calls) == 6:
            raise RuntimeError('out of memory')  # reported, left missing, retried next time
        return fake_row(run, cfg)

    assert len(sweep.sweep(cfg, failing_once)) == 12 - 5 - 1
    assert len(calls) == 12 and len(set(calls)) == 12  # nothing ran twice
    rows = sweep.sweep(cfg, failing_once)
    assert len(rows) == 1 and rows[0]['run_id'] == calls[5]
    assert sweep.sweep(cfg, failing_once) == []
    assert sorted(r['run_id'] for r in read_rows(tmp_path / 'results.csv')) == sorted(calls[:12])


def test_pool_of_two_workers(tmp_path):
    cfg = sweep_config(tmp_path, '--workers=2', '--n_embd=[8, 16, 32]', "--dataset=['qa']")
    rows = sweep.sweep(cfg, fake_row)
    assert len(rows) == 6 == len(read_rows(tmp_path / 'results.csv'))


def test_emit_jobs_and_settings_guard(tmp_path):
    argv = ['config/sweep_cpu.py', f'--out_dir={tmp_path}', '--workers=2']
    cfg = sweep_config(tmp_path, f'--emit_jobs={tmp_path}/jobs.txt', '--n_embd=[8, 16]')
    sweep.sweep(cfg, fake_row, argv=argv)
    lines = open(tmp_path / 'jobs.txt').read().splitlines()
    assert len(lines) == len(sweep.expand(cfg)) == 8
    assert all(l.startswith('python sweep.py config/sweep_cpu.py') and '--workers=1 --only=' in l
               for l in lines)
    sweep.sweep(sweep_config(tmp_path, '--n_embd=[8]'), fake_row)
    with pytest.raises(SystemExit, match='max_iters: 2000 -> 10'):
        sweep.sweep(sweep_config(tmp_path, '--n_embd=[8]', '--max_iters=10'), fake_row)


def test_one_real_tiny_run(tmp_path):
    cfg = sweep_config(tmp_path, '--n_people=[4]', "--dataset=['qa']", '--n_embd=[8]', '--n_ood=4',
                       '--max_iters=30', '--eval_interval=30', '--batch_size=8', '--log_interval=10')
    [row] = sweep.sweep(cfg)
    assert row['num_params'] == 6248 and row['steps'] == 30 and row['n_facts'] == 16
    assert 0 <= row['recall'] <= 1 and 0 <= row['recall_ood'] <= 1 and row['eval_questions'] == 16
    assert os.path.exists(tmp_path / 'runs' / row['run_id'] / 'ckpt.pt')
    assert os.path.exists(tmp_path / 'data' / 'N4-ood4-a1-s0' / 'meta.json')


def tiny_chat_model(folder):
    """A small random Llama with a ChatML tokenizer of its own, as a Hugging Face folder: what the
    large-scale study fine-tunes, at test size."""
    import dialog
    import pretrained
    import tokenizer as tok
    from model import GPT, GPTConfig
    ranks = tok.train_bpe(['When was Ada Smith born? Ada Smith was born on 1/7/1975. SELECT birth_date '
                           'FROM people WHERE name = user assistant database'], 300)
    specials = {s: len(ranks) + i for i, s in enumerate(dialog.get('chatml').special_tokens)}
    tokenizer = tok.TiktokenTokenizer('tiny', ranks, pretrained.PRE_PATTERNS['smollm'], specials, appended=())
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=512, n_layer=1, n_head=2, n_embd=32))
    pretrained.export(model, tokenizer, str(folder), chat_template='{{ "<|im_start|>" }}')
    return str(folder)


def test_a_sweep_of_a_pretrained_model_fine_tunes_it_measures_its_drift_and_resumes(tmp_path):
    base = tiny_chat_model(tmp_path / 'base')
    cfg = sweep_config(tmp_path / 'sweep', f"--model=['{base}']", '--n_people=[4]', '--n_ood=4',
                       '--max_iters=3', '--eval_interval=3', '--batch_size=2', '--block_size=256',
                       '--learning_rate=0.01', '--drift_prompts=4', '--drift_tokens=4')
    rows = sweep.sweep(cfg)
    assert sorted(r['run_id'] for r in rows) == ['qa-N4-a1-base-s0', 'qatool-N4-a1-base-s0']
    for row in rows:
        assert row['model'] == base and row['n_embd'] == 32 and row['steps'] == 3  # the model's shape
        assert row['kl_base_tuned'] > 0 and row['tv'] > 0 and 0 <= row['top1_agree'] <= 1  # it moved
        assert os.path.exists(tmp_path / 'sweep' / 'runs' / row['run_id'] / 'drift.json')
    written = read_rows(tmp_path / 'sweep' / 'results.csv')
    assert [float(r['kl_base_tuned']) for r in written] == [r['kl_base_tuned'] for r in rows]
    assert os.path.exists(tmp_path / 'sweep' / 'data' / 'N4-ood4-a1-s0-base' / 'meta.json')
    assert len([f for f in os.listdir(tmp_path / 'sweep') if f.startswith('drift_base_')]) == 1  # once
    assert sweep.sweep(cfg) == []  # all done: a second call runs nothing
