"""plot.py: reading results (ours, minimal ones, the authors' grid4.csv), the fits, the figures."""
import csv
import json
import os

import pytest

import configurator
import plot

FIGURES = ('params_vs_facts', 'recall_vs_params', 'ood_recall', 'compressibility')
# the columns: what any results CSV must be able to get by with (no run_id, no max_iters)
MINIMAL = ('n_people', 'n_facts', 'dataset', 'seed', 'n_embd', 'n_layer', 'n_head', 'alpha',
           'num_params', 'steps', 'best_loss', 'recall', 'recall_ood', 'wall_s')
# a sweep's results.csv (README, sweep.COLUMNS), written here so that plot's tests need no torch
SWEEP = ('run_id', 'n_people', 'n_facts', 'dataset', 'seed', 'n_embd', 'n_layer', 'n_head', 'alpha',
         'num_params', 'steps', 'max_iters', 'best_loss', 'val_loss', 'recall', 'recall_ood',
         'eval_questions', 'wall_s')
# the authors' results/grid4.csv header, unnamed pandas index column first, as released
PAPER = ('', 'loss_best', 'accuracy_best', 'data.nb_data', 'data.key', 'data.seed', 'model.emb_dim',
         'model.nb_layers', 'model.block.nb_heads', 'nb_params')


def write_csv(path, columns, rows):
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return str(path)


def known_grid(people, qa_per_fact, tool_level):
    """(n_people, dataset, params, seed, recall): the smallest in-weight model that passes has
    qa_per_fact params per fact exactly, the in-tool one tool_level params at every N. Two seeds,
    one missing; a config whose seeds average below the threshold fails."""
    for n in people:
        for ds in ('qa', 'qatool'):
            needed = qa_per_fact * 4 * n if ds == 'qa' else tool_level
            for params in (needed // 2, needed, needed * 4):
                for seed in (0, 1):
                    if ds == 'qatool' and params == needed * 4 and seed == 1:
                        continue  # a missing seed
                    recall = 1.0 if params >= needed else 0.3
                    if params == needed // 2 and seed == 0:
                        recall = 0.98  # one lucky seed: the mean, 0.64, still fails
                    yield n, ds, params, seed, recall


def synthetic_results(path):
    """known_grid(3 params per fact, in-tool 5000) as a sweep's results.csv: n_embd stands in for
    the params; in-tool OOD recall switches on at 64 people."""
    rows = [dict(run_id=f'{ds}-N{n}-w{params}-s{seed}', n_people=n, n_facts=4 * n, dataset=ds,
                 seed=seed, n_embd=params, n_layer=2, n_head=2, alpha=1.0, num_params=params,
                 steps=1, max_iters=1, best_loss=1.0, val_loss=1.0, recall=recall,
                 recall_ood=0.0 if ds == 'qa' else float(n >= 64), eval_questions=4, wall_s=0.1)
            for n, ds, params, seed, recall in known_grid((4, 16, 64, 256), 3, 5000)]
    return write_csv(path, SWEEP, [[r[k] for k in SWEEP] for r in rows])


def paper_grid(path):
    """known_grid in the authors' grid4.csv format: 3 params per fact, in-tool 7000, other N."""
    rows = [(i, 1e-3, recall, n, ds, seed, params, 2, 2, params)
            for i, (n, ds, params, seed, recall) in enumerate(known_grid((2, 8, 32, 128), 3, 7000))]
    return write_csv(path, PAPER, rows)


# ----------------------------------------------------------------------------------------------
# Our results, from a sweep

def test_fit_recovers_the_known_slope(tmp_path):
    synthetic_results(tmp_path / 'results.csv')
    cfg = configurator.parse(plot.DEFAULTS, [f'--results={tmp_path}/results.csv'])
    _, summary = plot.summarize(plot.load(cfg.results), cfg)
    qa, tool = summary['datasets']['qa'], summary['datasets']['qatool']
    assert qa['min_params'] == {'16': 48, '64': 192, '256': 768, '1024': 3072}
    assert summary['in_weight_loglog_exponent'] == pytest.approx(1.0, abs=1e-6)
    assert summary['in_weight_params_per_fact'] == pytest.approx(3.0, abs=1e-6)
    assert tool['loglog_exponent'] == pytest.approx(0.0, abs=1e-6) and summary['in_tool_level'] == 5000
    assert summary['ood_transition_n_people'] == {'n_embd=2500': 64, 'n_embd=5000': 64, 'n_embd=20000': 64}
    assert 0 < summary['chance_level'] < 0.01
    assert 'compare' not in summary


def test_plot_writes_figures_and_summary(tmp_path):
    synthetic_results(tmp_path / 'results.csv')
    plot.main([f'--results={tmp_path}/results.csv', f'--out_dir={tmp_path}/fig'])
    for name in FIGURES:
        assert os.path.getsize(tmp_path / 'fig' / f'{name}.png') > 10_000
    summary = json.load(open(tmp_path / 'fig' / 'summary.json'))
    assert summary['compressibility']['1']['params_per_fact'] == pytest.approx(3.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Any results CSV with the columns

def test_minimal_csv_with_blank_values_loads_and_plots(tmp_path):
    base = dict(n_layer=2, n_head=2, alpha=1, steps=100, best_loss=0.5, wall_s=1.5)
    rows = [dict(base, dataset='qa', n_people=4, n_embd=8, seed=0, num_params=100, recall=0.2,
                 recall_ood=''),                                      # no OOD evaluation
            dict(base, dataset='qa', n_people=4, n_embd=8, seed=0, num_params=100, recall=1.0,
                 recall_ood='', steps='', wall_s=''),                 # the same run again: wins
            dict(base, dataset='qa', n_people=16, n_embd=8, seed=0, num_params=100, recall='',
                 recall_ood=''),                                      # no recall: skipped
            dict(base, dataset='qatool', n_people=4, n_embd=8, seed=0, num_params=100, recall=1.0,
                 recall_ood=0.0),
            dict(base, dataset='qatool', n_people=16, n_embd=8, seed=0, num_params=100, recall=1.0,
                 recall_ood=0.95),
            dict(base, dataset='qatool', n_people=16, n_embd=8, seed=1, num_params=100, recall=1.0,
                 recall_ood='')]                                      # a seed without OOD figure
    path = write_csv(tmp_path / 'ours.csv', MINIMAL + ('note',),
                     [[{**r, 'n_facts': 4 * r['n_people']}.get(k, 'extra') for k in MINIMAL + ('note',)]
                      for r in rows])
    loaded = plot.load(path)
    assert len(loaded) == 4 and 'note' not in loaded[0]
    rerun = next(r for r in loaded if r['dataset'] == 'qa')
    assert rerun['recall'] == 1.0 and rerun['steps'] is None and rerun['recall_ood'] is None
    confs = plot.configurations(loaded)
    assert confs[('qa', 1.0, 4, 8, 2, 2)]['recall_ood'] is None
    assert confs[('qatool', 1.0, 16, 8, 2, 2)]['recall_ood'] == 0.95  # the blank seed skipped
    plot.main([f'--results={path}', f'--out_dir={tmp_path}/fig'])
    for name in FIGURES:
        assert os.path.exists(tmp_path / 'fig' / f'{name}.png')
    summary = json.load(open(tmp_path / 'fig' / 'summary.json'))
    assert summary['runs'] == 4 and summary['ood_transition_n_people'] == {'n_embd=8': 16}
    assert summary['datasets']['qa']['min_params'] == {'16': 100}


def test_missing_required_column_is_a_one_line_error(tmp_path):
    columns = [c for c in MINIMAL if c not in ('num_params', 'n_head')]
    path = write_csv(tmp_path / 'ours.csv', columns, [[1] * len(columns)])
    with pytest.raises(SystemExit) as e:
        plot.load(path)
    message = str(e.value)
    assert path in message and 'n_head' in message and 'num_params' in message and '\n' not in message
    with pytest.raises(SystemExit, match='accuracy_best'):
        plot.load_paper_grid(write_csv(tmp_path / 'grid.csv', PAPER[:2], [[0, 0.1]]))


# ----------------------------------------------------------------------------------------------
# The authors' grid4.csv beside ours

def test_paper_grid_maps_onto_our_schema(tmp_path):
    rows = plot.load_paper_grid(paper_grid(tmp_path / 'grid4.csv'))
    assert len(rows) == 4 * 2 * 3 * 2 - 4
    row = next(r for r in rows if r['dataset'] == 'qa' and r['n_people'] == 8 and r['seed'] == 1
               and r['num_params'] == 96)
    assert row == {'dataset': 'qa', 'n_people': 8, 'n_facts': 32, 'alpha': 1.0, 'seed': 1,
                   'n_embd': 96, 'n_layer': 2, 'n_head': 2, 'num_params': 96, 'recall': 1.0,
                   'best_loss': 1e-3, 'steps': None, 'recall_ood': None, 'wall_s': None}
    assert {r['dataset'] for r in rows} == {'qa', 'qatool'}


def test_compare_draws_the_paper_beside_ours(tmp_path):
    synthetic_results(tmp_path / 'results.csv')
    grid = paper_grid(tmp_path / 'grid4.csv')
    plot.main([f'--results={tmp_path}/results.csv', f'--compare={grid}', f'--out_dir={tmp_path}/fig'])
    assert os.path.getsize(tmp_path / 'fig' / 'params_vs_facts.png') > 10_000
    summary = json.load(open(tmp_path / 'fig' / 'summary.json'))
    paper = summary['compare']
    assert paper['results'] == grid and paper['runs'] == 44
    assert paper['datasets']['qa']['min_params'] == {'8': 24, '32': 96, '128': 384, '512': 1536}
    assert paper['datasets']['qa']['loglog_exponent'] == pytest.approx(1.0, abs=1e-6)
    assert paper['datasets']['qa']['params_per_fact'] == pytest.approx(3.0, abs=1e-6)
    assert paper['datasets']['qatool']['level'] == 7000
    assert paper['datasets']['qatool']['loglog_exponent'] == pytest.approx(0.0, abs=1e-6)
    assert summary['in_tool_level'] == 5000  # ours, untouched by the comparison


# ----------------------------------------------------------------------------------------------
# The large-scale study: a pretrained model fine-tuned on N people (sweep.py's rows for it)

FINETUNE = SWEEP + ('model', 'trainable_params', 'kl_base_tuned', 'kl_tuned_base', 'tv', 'top1_agree',
                    'hellaswag_base', 'hellaswag_tuned')  # sweep.COLUMNS
MODEL = 'smollm2-135m'
# (dataset, N, seed) -> recall, recall_ood, kl_base_tuned, tv, hellaswag_tuned, steps: in-tool
# recalls everyone at every N (two seeds at N=25), in-weight recalls fewer of its own people as N
# grows and never-seen ones never (32 questions: one right answer would be 0.031, 13x chance),
# and drifts further from the base model, more than in-tool does
FT_RUNS = {('qa', 25, 0): (0.96875, 0.0, 0.05, 0.08, 0.42, 19),
           ('qa', 80, 0): (0.6875, 0.0, 0.12, 0.15, 0.40, 60),
           ('qa', 250, 0): (0.40625, 0.0, 0.3, 0.25, 0.37, 188),
           ('qatool', 25, 0): (1.0, 1.0, 0.02, 0.03, 0.43, 20),
           ('qatool', 25, 1): (1.0, 0.9375, 0.03, 0.04, 0.43, 24),
           ('qatool', 80, 0): (1.0, 0.96875, 0.021, 0.031, 0.43, 20),
           ('qatool', 250, 0): (1.0, 1.0, 0.019, 0.029, 0.42, 20)}


def ft_run_id(ds, n, seed):
    return f'{ds}-N{n}-a1-{MODEL}-s{seed}'  # sweep.run_id's form


def finetune_results(path, runs=FT_RUNS, scratch_rows=()):
    """FT_RUNS as sweep.py writes them (the model's own shape, drift, HellaSwag), after any
    controlled-study rows; each run's metrics.jsonl (but qa N=80's) in runs/RUN_ID beside it."""
    rows = [dict(r, model='scratch') for r in scratch_rows]
    for (ds, n, seed), (recall, ood, kl, tv, hella, steps) in runs.items():
        rows.append(dict(run_id=ft_run_id(ds, n, seed), n_people=n, n_facts=4 * n, dataset=ds, seed=seed,
                         n_embd=576, n_layer=30, n_head=9, alpha=1.0, num_params=134515008, steps=steps,
                         max_iters=steps, best_loss=0.1, val_loss=0.2, recall=recall, recall_ood=ood,
                         eval_questions=32, wall_s=300.0, model=MODEL, trainable_params=134515008,
                         kl_base_tuned=kl, kl_tuned_base=kl * 1.1, tv=tv, top1_agree=0.9,
                         hellaswag_base=0.43, hellaswag_tuned=hella))
        if (ds, n) != ('qa', 80):
            run_dir = path.parent / 'runs' / ft_run_id(ds, n, seed)
            run_dir.mkdir(parents=True, exist_ok=True)
            lines = [{'step': s, 'loss': 2.0 / (1 + s), 'lr': 5e-5} for s in range(0, steps + 1, 5)]
            lines += [{'step': s, 'val_loss': 1.0, 'recall': recall * s / steps, 'recall_ood': ood * s / steps,
                       'recall_min': min(recall, ood) * s / steps} for s in (0, steps // 2, steps)]
            (run_dir / 'metrics.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines) + '{"step": 2')
    return write_csv(path, FINETUNE, [[r.get(k, '') for k in FINETUNE] for r in rows])


def test_finetune_rows_draw_the_large_scale_figures(tmp_path, capsys):
    path = finetune_results(tmp_path / 'results.csv')
    assert plot.load(path) == []  # none of them is a controlled-study row
    plot.main([f'--results={path}', f'--out_dir={tmp_path}/fig'])
    for name in ('finetune_recall', 'finetune_drift', 'finetune_recall_steps'):
        assert os.path.getsize(tmp_path / 'fig' / f'{name}.png') > 10_000
    for name in FIGURES:  # no controlled-study rows: none of its figures
        assert not os.path.exists(tmp_path / 'fig' / f'{name}.png')
    err = capsys.readouterr().err
    assert ft_run_id('qa', 80, 0) in err and 'metrics.jsonl' in err  # the run without its curve
    summary = json.load(open(tmp_path / 'fig' / 'summary.json'))
    assert set(summary) == {'finetune'}
    ft = summary['finetune']
    assert ft['runs'] == 7 and list(ft['models']) == [MODEL]
    qa, tool = ft['models'][MODEL]['qa'], ft['models'][MODEL]['qatool']
    assert qa['80'] == {'seeds': 1, 'recall': 0.6875, 'recall_ood': 0.0, 'kl_base_tuned': 0.12, 'tv': 0.15,
                        'hellaswag_base': 0.43, 'hellaswag_tuned': 0.4, 'steps': 60}
    assert tool['25']['seeds'] == 2 and tool['25']['recall_ood'] == pytest.approx(0.96875)
    assert tool['25']['kl_base_tuned'] == pytest.approx(0.025) and tool['25']['steps'] == 22
    assert ft['facts'][MODEL] == {'in_tool_recall_at_threshold_at_every_n': True, 'in_weight_ood_max': 0.0,
                                  'in_weight_ood_within_2x_chance': True, 'largest_n_both_settings': 250,
                                  'in_weight_kl_above_in_tool_at_largest_n': True,
                                  'in_weight_kl_grows_with_n': True}


@pytest.mark.parametrize('run, change, fact', [
    (('qatool', 80, 0), {1: 0.5}, 'in_tool_recall_at_threshold_at_every_n'),   # one never-seen miss
    (('qa', 250, 0), {1: 0.03125}, 'in_weight_ood_within_2x_chance'),          # one right guess
    (('qatool', 250, 0), {2: 0.5}, 'in_weight_kl_above_in_tool_at_largest_n'),
    (('qa', 80, 0), {2: 0.4}, 'in_weight_kl_grows_with_n')])                   # above N=250's 0.3
def test_finetune_facts_follow_the_numbers(tmp_path, run, change, fact):
    runs = dict(FT_RUNS)
    runs[run] = tuple(change.get(i, v) for i, v in enumerate(runs[run]))
    cfg = configurator.parse(plot.DEFAULTS, [])
    _, summary = plot.summarize_finetune(plot.load_finetune(finetune_results(tmp_path / 'r.csv', runs)), cfg)
    facts = summary['facts'][MODEL]
    assert facts[fact] is False
    assert all(v is not False for k, v in facts.items() if k != fact)  # the others still hold


def test_both_studies_in_one_csv_keep_apart(tmp_path):
    """A CSV holding both studies' rows draws both sets of figures; each summary sees its own."""
    synthetic = [dict(zip(SWEEP, r)) for r in csv.reader(open(synthetic_results(tmp_path / 's.csv')))][1:]
    path = finetune_results(tmp_path / 'results.csv', scratch_rows=synthetic)
    assert len(plot.load(path)) == len(synthetic) and len(plot.load_finetune(path)) == 7
    plot.main([f'--results={path}', f'--out_dir={tmp_path}/fig'])
    for name in FIGURES + ('finetune_recall', 'finetune_drift', 'finetune_recall_steps'):
        assert os.path.exists(tmp_path / 'fig' / f'{name}.png')
    summary = json.load(open(tmp_path / 'fig' / 'summary.json'))
    assert summary['runs'] == len(synthetic) and summary['in_tool_level'] == 5000  # as alone
    assert summary['datasets']['qa']['min_params'] == {'16': 48, '64': 192, '256': 768, '1024': 3072}
    assert summary['finetune']['runs'] == 7
