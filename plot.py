"""
The paper's figures and fitted numbers from a sweep's results.csv (see sweep.py).

    python plot.py --results=sweeps/cpu/results.csv --out_dir=sweeps/cpu
    python plot.py --results=sweeps/cpu/results.csv,sweeps/alpha/results.csv --out_dir=figures
    python plot.py --results=figures/results_cpu.csv --compare=grid4.csv --out_dir=figures

A results CSV needs the columns REQUIRED and may have OPTIONAL (blank: missing); others are ignored.
--compare: the authors' grid as released (results/grid4.csv of github.com/ambroiseodt/itl) in (a).
Rows whose `model` is a pretrained model (not 'scratch' or blank) are the large-scale study's
fine-tuning runs: they need FT_REQUIRED instead and have figures of their own; the two studies'
rows never share a figure.

Writes in out_dir, for the controlled study's rows (models trained from scratch):
    params_vs_facts.png   (a) smallest model reaching recall >= threshold against facts, log-log
    recall_vs_params.png  (b) recall against parameters, one curve per number of people
    ood_recall.png        (c) recall on never-seen people against training people, per width
    compressibility.png   (d) (a) for in-weight runs, one curve per alpha
for the fine-tuning rows (pretrained models):
    finetune_recall.png        recall on trained and never-seen people against N, per setting
    finetune_drift.png         KL(base||tuned), TV (and HellaSwag) against N, per setting
    finetune_recall_steps.png  recall during training (DIR/runs/RUN_ID/metrics.jsonl), per N
and summary.json, the numbers behind them (the fine-tuning runs' under 'finetune').

A configuration is a grid point less its seed: recall is averaged over the seeds present, and a
configuration passes when its mean recall reaches the threshold. (a), (b), (c) use the rows with
alpha == --alpha (1.0: attributes independent of the family); (d) uses every alpha. A fine-tuning
point is (model, setting, N) at that alpha, averaged over its seeds likewise.
"""
import csv
import json
import os
import sys
from collections import defaultdict

import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import configurator  # noqa: E402
import prepare_data  # noqa: E402  (its atom lists decide the chance level)

DEFAULTS = dict(
    results='sweeps/cpu/results.csv',  # one CSV, or several joined with commas
    out_dir='',                        # '' : the first CSV's folder
    threshold=0.95,                    # a configuration passes at this mean recall
    ood_threshold=0.9,                 # in-tool OOD recall that counts as "switched on"
    alpha=1.0,                         # the alpha of figures (a) to (c)
    compare='',                        # the paper's grid4.csv: its curve beside ours in (a); '' : none
)
GRID_POINT = ('dataset', 'n_people', 'alpha', 'n_embd', 'n_layer', 'n_head', 'seed')  # one run
REQUIRED = GRID_POINT + ('n_facts', 'num_params', 'recall')
OPTIONAL = ('steps', 'best_loss', 'recall_ood', 'wall_s')  # absent or blank: None
# The authors' results/grid4.csv, as their code (apps/memory of github.com/ambroiseodt/itl) writes
# it: nb_data counts people (4 questions, i.e. facts, each), key is 'qa' (in-weight) or 'qatool'
# (in-tool) as ours, seed is the data loader's, accuracy_best the best exact-match fraction (0-1)
# on the trained people's questions, loss_best the lowest training loss. Attributes independent.
PAPER_COLUMNS = {'data.nb_data': 'n_people', 'data.key': 'dataset', 'data.seed': 'seed',
                 'model.emb_dim': 'n_embd', 'model.nb_layers': 'n_layer', 'model.block.nb_heads': 'n_head',
                 'nb_params': 'num_params', 'accuracy_best': 'recall'}
PAPER_ALPHA = 1.0
LABEL = {'qa': 'in-weight (qa)', 'qatool': 'in-tool (qatool)'}
# Chance for an exact-match answer: the best fixed guess for each attribute is right with
# probability 1 / (number of values) when values are uniform (alpha = 1). make_people draws dates
# from days 1-28, 12 months, years 1950-2000; the others come from atoms/.
VALUES_PER_ATTRIBUTE = {'birth_date': 28 * 12 * 51, 'birth_place': 'countries',
                        'current_address': 'cities', 'occupation': 'occupations'}


def chance_level():
    atoms = prepare_data.load_atoms()
    sizes = [v if isinstance(v, int) else len(atoms[v]) for v in VALUES_PER_ATTRIBUTE.values()]
    return float(np.mean([1 / s for s in sizes]))


def read_csv(path, required, keep=lambda record: True):
    """The rows of a CSV that `keep` accepts, as dicts of strings; one line naming what is missing
    if a column is (a CSV with none of the rows wanted needs none of their columns)."""
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        records = [r for r in reader if keep(r)]
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing and records:
        raise SystemExit(f"error: {path} lacks the columns {', '.join(missing)}")
    return records


def is_finetune(record):
    """A fine-tuning run of the large-scale study: its model is a pretrained one."""
    return record.get('model') not in (None, '', 'scratch')


def add_rows(records, rows):
    """Records of our schema (strings) -> rows (numbers, None where blank), keyed by grid point:
    a run seen twice keeps its last row. One without a required value (a torn line, or a run
    without recall evaluation) is skipped."""
    for r in records:
        if any(r.get(k) in (None, '') for k in REQUIRED):
            continue
        row = {k: r[k] if k == 'dataset' else None if r.get(k) in (None, '') else float(r[k])
               for k in REQUIRED + OPTIONAL}
        rows[tuple(row[k] for k in GRID_POINT)] = row
    return rows


def load(paths):
    """The controlled study's rows of one or more results CSVs (comma-separated paths), later
    rows winning; fine-tuning rows are left to load_finetune."""
    rows = {}
    for path in paths.split(','):
        add_rows(read_csv(path, REQUIRED, keep=lambda r: not is_finetune(r)), rows)
    return list(rows.values())


def load_paper_grid(path):
    """The authors' grid4.csv (see PAPER_COLUMNS) as rows of our schema."""
    records = [{**{ours: r[theirs] for theirs, ours in PAPER_COLUMNS.items()},
                'n_facts': str(4 * float(r['data.nb_data'])), 'alpha': str(PAPER_ALPHA),
                'best_loss': r.get('loss_best')} for r in read_csv(path, PAPER_COLUMNS)]
    return list(add_rows(records, {}).values())


def configurations(rows):
    """(dataset, alpha, n_people, n_embd, n_layer, n_head) -> mean recall over seeds, params..."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r['dataset'], r['alpha'], int(r['n_people']), int(r['n_embd']),
                int(r['n_layer']), int(r['n_head']))].append(r)
    return {key: {'n_people': key[2], 'n_embd': key[3], 'n_facts': int(rs[0]['n_facts']),
                  'num_params': int(rs[0]['num_params']), 'seeds': len(rs),
                  'recall': float(np.mean([r['recall'] for r in rs])),
                  'recall_ood': _mean([r['recall_ood'] for r in rs])}
            for key, rs in groups.items()}


def _mean(values):
    values = [v for v in values if v is not None]  # None: a run without that evaluation
    return float(np.mean(values)) if values else None


def min_passing(confs, dataset, alpha, threshold):
    """-> ({n_facts: smallest passing num_params}, {n_facts: largest tried where none passed})."""
    tried, passed = defaultdict(list), defaultdict(list)
    for (ds, a, *_), c in confs.items():
        if ds == dataset and a == alpha:
            tried[c['n_facts']].append(c['num_params'])
            if c['recall'] >= threshold:
                passed[c['n_facts']].append(c['num_params'])
    return ({f: min(p) for f, p in sorted(passed.items())},
            {f: max(p) for f, p in sorted(tried.items()) if f not in passed})


def fit(points):
    """{n_facts: params} -> the log-log exponent, params per fact (least squares fit of
    params = intercept + per_fact * facts), and the level: the largest of these smallest passing
    sizes (no N needed more). None where there are too few points."""
    out = {'loglog_exponent': None, 'loglog_prefactor': None, 'params_per_fact': None,
           'intercept': None, 'level': max(points.values()) if points else None}
    if len(points) >= 2:
        x, y = np.array(list(points.keys()), float), np.array(list(points.values()), float)
        slope, log_pre = np.polyfit(np.log(x), np.log(y), 1)
        per_fact, intercept = np.polyfit(x, y, 1)
        out.update(loglog_exponent=round(float(slope), 4) + 0.0,  # + 0.0: no '-0.0' in the json
                   loglog_prefactor=float(np.exp(log_pre)), params_per_fact=round(float(per_fact), 4) + 0.0,
                   intercept=round(float(intercept), 1) + 0.0)
    return out


def ood_transition(confs, alpha, ood_threshold):
    """Per in-tool width: the fewest training people with mean OOD recall >= the threshold."""
    out = {}
    for (ds, a, n, w, *_), c in sorted(confs.items()):
        if ds == 'qatool' and a == alpha and (c['recall_ood'] or 0) >= ood_threshold:
            out.setdefault(f'n_embd={w}', n)
    return out


def per_dataset(confs, alpha, threshold):
    """Per dataset: the smallest passing model per n_facts, where none passed, and their fit."""
    out = {}
    for ds in sorted({key[0] for key in confs}):
        points, not_reached = min_passing(confs, ds, alpha, threshold)
        out[ds] = {'min_params': _str_keys(points),
                   'not_reached_max_params_tried': _str_keys(not_reached), **fit(points)}
    return out


def summarize(rows, cfg, paper_rows=None):
    confs = configurations(rows)
    summary = {'threshold': cfg.threshold, 'alpha': cfg.alpha, 'runs': len(rows),
               'configurations': len(confs), 'chance_level': chance_level(),
               'datasets': per_dataset(confs, cfg.alpha, cfg.threshold)}
    qa, tool = summary['datasets'].get('qa', {}), summary['datasets'].get('qatool', {})
    summary.update(in_weight_loglog_exponent=qa.get('loglog_exponent'),
                   in_weight_params_per_fact=qa.get('params_per_fact'),
                   in_tool_level=tool.get('level'), ood_threshold=cfg.ood_threshold,
                   ood_transition_n_people=ood_transition(confs, cfg.alpha, cfg.ood_threshold),
                   compressibility={})
    for a in sorted({r['alpha'] for r in rows if r['dataset'] == 'qa'}):
        points, _ = min_passing(confs, 'qa', a, cfg.threshold)
        summary['compressibility'][f'{a:g}'] = {'min_params': _str_keys(points), **fit(points)}
    if paper_rows is not None:  # the same threshold and fit on the authors' grid
        paper = per_dataset(configurations(paper_rows), PAPER_ALPHA, cfg.threshold)
        summary['compare'] = {'results': cfg.compare, 'alpha': PAPER_ALPHA, 'runs': len(paper_rows),
                              'datasets': paper}
    return confs, summary


def _str_keys(d):
    return {str(k): v for k, v in d.items()}  # json object keys are strings


# ----------------------------------------------------------------------------------------------
# Figures

def plot_min_params(summary, path):
    """(a): the fitted numbers go in the legend, next to the line they describe."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for ds, color in (('qa', 'C0'), ('qatool', 'C1')):
        s = summary['datasets'].get(ds)
        if not s:
            continue
        label = LABEL[ds]
        if ds == 'qa' and s['loglog_exponent'] is not None:
            label += f": params ~ facts^{s['loglog_exponent']:.2f}, {s['params_per_fact']:,.0f} params/fact"
            xs = np.geomspace(min(map(int, s['min_params'])), max(map(int, s['min_params'])), 50)
            ax.plot(xs, s['loglog_prefactor'] * xs ** s['loglog_exponent'], '--', color=color, lw=1)
        if ds == 'qatool' and s['level']:
            label += f": level {s['level']:,} params (the most any N needed)"
            ax.axhline(s['level'], ls=':', color=color, lw=1)
        ax.plot([int(k) for k in s['min_params']], list(s['min_params'].values()), 'o-',
                color=color, label=label)
        lost = s['not_reached_max_params_tried']  # lower bounds: more than the largest tried
        if lost:
            ax.plot([int(k) for k in lost], list(lost.values()), '^', mfc='none', color=color, ms=8,
                    label=f'{LABEL[ds]}: none passed (needs more than this)')
    for ds, color in (('qa', 'C0'), ('qatool', 'C1')):  # the authors' grid, beside ours
        s = summary.get('compare', {}).get('datasets', {}).get(ds)
        if s and s['min_params']:
            exponent = s['loglog_exponent']
            fitted = f': params ~ facts^{exponent:.2f}' if exponent is not None else ''
            ax.plot([int(k) for k in s['min_params']], list(s['min_params'].values()), 's--',
                    color=color, alpha=0.45, mfc='none', label=f"paper's grid, {LABEL[ds]}{fitted}")
            lost = s['not_reached_max_params_tried']
            if lost:
                ax.plot([int(k) for k in lost], list(lost.values()), '^', mfc='none', color=color,
                        alpha=0.45, ms=8, label=f"paper's grid, {LABEL[ds]}: none passed")
    ax.set(xscale='log', yscale='log', xlabel='facts (4 per person)',
           ylabel=f"smallest model with recall >= {summary['threshold']} (params)",
           title='(a) parameters needed to answer every fact')
    ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.14))  # below: never on data
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


def plot_panels(confs, alpha, path, curve, x, y, title, xlabel, ylabel, hlines):
    """Figures (b) and (c): a panel per dataset, a curve per value of `curve`, y against x."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, ds in zip(axes, ('qa', 'qatool')):
        curves = defaultdict(list)
        for (d, a, *_), c in confs.items():
            if d == ds and a == alpha and c[y] is not None:  # None: runs without OOD evaluation
                curves[c[curve]].append((c[x], c[y]))
        colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(curves))))
        for color, (value, points) in zip(colors, sorted(curves.items())):
            ax.plot(*zip(*sorted(points)), 'o-', color=color, ms=4,
                    label=f"{'N' if curve == 'n_people' else 'width'}={value}")
        for level, style, text in hlines:
            ax.axhline(level, ls=style, color='gray', lw=1, label=text)
        ax.set(xscale='log', xlabel=xlabel, title=f'{LABEL[ds]}', ylim=(-0.03, 1.03))
        ax.legend(fontsize=7)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


def plot_compressibility(summary, path):
    fig, ax = plt.subplots(figsize=(6, 4.5))
    comp = summary['compressibility']
    for color, (a, s) in zip(plt.cm.plasma(np.linspace(0, 0.8, max(1, len(comp)))), comp.items()):
        if s['min_params']:
            per_fact = f", {s['params_per_fact']:.0f} params/fact" if s['params_per_fact'] else ''
            ax.plot([int(k) for k in s['min_params']], list(s['min_params'].values()), 'o-',
                    color=color, label=f'alpha={a}{per_fact}')
    if len(comp) < 2:
        ax.text(0.5, 0.5, 'one alpha only in these results:\nsweep alpha (e.g. [0.0, 0.5, 1.0])',
                transform=ax.transAxes, ha='center', va='center', color='gray')
    ax.set(xscale='log', yscale='log', xlabel='facts (4 per person)',
           ylabel=f"smallest in-weight model with recall >= {summary['threshold']}",
           title='(d) compressibility: attributes shared by a family (alpha < 1)')
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The large-scale study: pretrained models fine-tuned on N people, in-weight or in-tool

FT_POINT = ('model', 'dataset', 'n_people', 'alpha', 'seed')  # one fine-tuning run
FT_REQUIRED = ('model', 'dataset', 'n_people', 'seed', 'recall')
FT_OPTIONAL = ('alpha', 'recall_ood', 'steps', 'num_params', 'trainable_params', 'kl_base_tuned',
               'kl_tuned_base', 'tv', 'top1_agree', 'hellaswag_base', 'hellaswag_tuned')
FT_MEANS = ('recall', 'recall_ood', 'kl_base_tuned', 'tv', 'hellaswag_base', 'hellaswag_tuned', 'steps')
FT_TEXT = ('model', 'dataset', 'run_id')
DASH = {'recall': '-', 'recall_ood': '--'}  # trained people solid, never-seen people dashed
SEEN = {'recall': 'trained', 'recall_ood': 'never-seen'}


def load_finetune(paths):
    """The fine-tuning rows of one or more results CSVs, later rows winning; each knows its run's
    folder (DIR/runs/RUN_ID beside its CSV) for the training curves. alpha blank: 1."""
    rows = {}
    for path in paths.split(','):
        for r in read_csv(path, FT_REQUIRED, keep=is_finetune):
            if any(r.get(k) in (None, '') for k in FT_REQUIRED):
                continue  # a torn line, or a run without recall evaluation
            row = {k: _cell(r, k) for k in FT_TEXT + FT_REQUIRED + FT_OPTIONAL}
            row['alpha'] = 1.0 if row['alpha'] is None else row['alpha']
            row['run_dir'] = row['run_id'] and os.path.join(os.path.dirname(path), 'runs', row['run_id'])
            rows[tuple(row[k] for k in FT_POINT)] = row
    return list(rows.values())


def _cell(record, key):
    """A CSV cell as text (FT_TEXT) or a number; None where blank or absent."""
    value = record.get(key)
    return None if value in (None, '') else value if key in FT_TEXT else float(value)


def finetune_points(rows):
    """{model: {dataset: {n_people: means over seeds of FT_MEANS (None: never measured)}}}."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r['model'], r['dataset'], int(r['n_people']))].append(r)
    points = defaultdict(lambda: defaultdict(dict))
    for (model, ds, n), rs in sorted(groups.items()):
        points[model][ds][n] = {'seeds': len(rs), **{k: _mean([r[k] for r in rs]) for k in FT_MEANS}}
    return points


def finetune_facts(settings, chance, threshold):
    """The claims the large-scale study tests, for one model (None: not in these results)."""
    qa, tool = settings.get('qa', {}), settings.get('qatool', {})
    recalls = [p[k] for p in tool.values() for k in ('recall', 'recall_ood')]
    ood = [p['recall_ood'] for p in qa.values() if p['recall_ood'] is not None]
    kl = [p['kl_base_tuned'] for _, p in sorted(qa.items()) if p['kl_base_tuned'] is not None]
    both = [n for n in qa if n in tool and None not in (qa[n]['kl_base_tuned'], tool[n]['kl_base_tuned'])]
    top = max(both, default=None)  # the largest N with both settings' KL
    return {
        'in_tool_recall_at_threshold_at_every_n':   # on trained and on never-seen people
            all(v >= threshold for v in recalls) if recalls and None not in recalls else None,
        'in_weight_ood_max': max(ood) if ood else None,
        'in_weight_ood_within_2x_chance': max(ood) <= 2 * chance if ood else None,
        'largest_n_both_settings': top,
        'in_weight_kl_above_in_tool_at_largest_n':
            qa[top]['kl_base_tuned'] > tool[top]['kl_base_tuned'] if top else None,
        'in_weight_kl_grows_with_n': all(a < b for a, b in zip(kl, kl[1:])) if len(kl) >= 2 else None,
    }


def summarize_finetune(rows, cfg):
    """rows (at one alpha) -> (finetune_points, summary.json's 'finetune')."""
    points, chance = finetune_points(rows), chance_level()
    models = {m: {ds: {str(n): {k: v for k, v in p.items() if v is not None} for n, p in by_n.items()}
                  for ds, by_n in settings.items()} for m, settings in points.items()}
    return points, {'runs': len(rows), 'alpha': cfg.alpha, 'chance_level': chance,
                    'in_tool_threshold': cfg.ood_threshold, 'models': models,
                    'facts': {m: finetune_facts(s, chance, cfg.ood_threshold) for m, s in points.items()}}


def _people_axis(ax, points):
    """A log axis of people labelled at the Ns of finetune_points, as plain numbers."""
    people = sorted({n for settings in points.values() for by_n in settings.values() for n in by_n})
    ax.set_xscale('log')
    ax.set_xticks(people, [f'{n:g}' for n in people])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel('people fine-tuned on (N)')


def _settings(points):
    """(model, dataset, color, label) of each curve: a color per setting, per model if several."""
    keys = [(m, ds) for m in sorted(points) for ds in ('qa', 'qatool') if ds in points[m]]
    return [(m, ds, f'C{i}', f'{m}, {LABEL[ds]}' if len(points) > 1 else LABEL[ds])
            for i, (m, ds) in enumerate(keys)]


def plot_finetune_recall(points, chance, path):
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for model, ds, color, label in _settings(points):
        by_n = sorted(points[model][ds].items())
        for key, style in DASH.items():
            xy = [(n, p[key]) for n, p in by_n if p[key] is not None]
            if xy:
                ax.plot(*zip(*xy), 'o' + style, color=color, ms=4, label=f'{label}: {SEEN[key]} people')
    ax.axhline(chance, ls=':', color='gray', lw=1, label=f'chance (best fixed guess) {chance:.4f}')
    _people_axis(ax, points)
    ax.set(ylim=(-0.03, 1.03), ylabel='recall (mean over seeds)',
           title='fine-tuned: recall on trained and never-seen people')
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


def plot_finetune_drift(points, path):
    """KL and TV against N, and HellaSwag where measured; the base model itself sits at 0 drift."""
    panels = [('kl_base_tuned', 'KL(base || tuned), nats per token'), ('tv', 'total variation')]
    if any(p['hellaswag_tuned'] is not None for s in points.values() for d in s.values() for p in d.values()):
        panels.append(('hellaswag_tuned', 'HellaSwag acc_norm'))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for ax, (key, ylabel) in zip(axes, panels):
        for model, ds, color, label in _settings(points):
            xy = [(n, p[key]) for n, p in sorted(points[model][ds].items()) if p[key] is not None]
            if xy:
                ax.plot(*zip(*xy), 'o-', color=color, ms=4, label=label)
        if key == 'hellaswag_tuned':
            for model in sorted(points):
                base = _mean([p['hellaswag_base'] for d in points[model].values() for p in d.values()])
                if base is not None:
                    ax.axhline(base, ls=':', color='gray', lw=1, label=f'base {model}: {base:.3f}')
        else:
            ax.axhline(0, ls=':', color='gray', lw=1, label='base model (no drift)')
        _people_axis(ax, points)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle('fine-tuned: drift from the base model on general prompts')
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


def read_curve(run_dir):
    """(step, recall, recall_ood) of each eval line of a run's metrics.jsonl; None without one."""
    path = os.path.join(run_dir or '', 'metrics.jsonl')
    if not run_dir or not os.path.exists(path):
        print(f"plot: no {path if run_dir else 'run_id, so no metrics.jsonl'}: that run's curve is "
              f"left out of finetune_recall_steps.png", file=sys.stderr)
        return None
    curve = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by an interrupted run
            if 'recall' in row:  # an eval line (training lines have 'loss' only)
                curve.append((row['step'], row['recall'], row.get('recall_ood')))
    return curve


def plot_finetune_steps(rows, path):
    """Recall during training, a panel per setting, a color per N (and a curve per run)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    people = sorted({int(r['n_people']) for r in rows})
    color = dict(zip(people, plt.cm.viridis(np.linspace(0, 0.9, len(people)))))
    models, seeds = len({r['model'] for r in rows}), len({r['seed'] for r in rows})  # > 1: say whose
    for ax, ds in zip(axes, ('qa', 'qatool')):
        for r in sorted((r for r in rows if r['dataset'] == ds), key=lambda r: (r['n_people'], r['model'])):
            curve, n = read_curve(r['run_dir']) or [], int(r['n_people'])
            name = f"N={n}" + f" {r['model']}" * (models > 1) + f" seed {r['seed']:g}" * (seeds > 1)
            for i, (key, style) in enumerate(DASH.items(), start=1):  # curve: (step, recall, recall_ood)
                xy = [(c[0], c[i]) for c in curve if c[i] is not None]
                if xy:
                    ax.plot(*zip(*xy), style, color=color[n], lw=1.2,
                            label=name if key == 'recall' else None)
        ax.set(xlabel='training steps', title=LABEL[ds], ylim=(-0.03, 1.03))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel('recall: trained people (solid), never-seen (dashed)')
    fig.suptitle('fine-tuned: recall during training')
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


def plot_controlled(rows, cfg, out_dir):
    """The controlled study's figures (a) to (d) -> its summary."""
    confs, summary = summarize(rows, cfg, load_paper_grid(cfg.compare) if cfg.compare else None)
    plot_min_params(summary, os.path.join(out_dir, 'params_vs_facts.png'))
    plot_panels(confs, cfg.alpha, os.path.join(out_dir, 'recall_vs_params.png'), curve='n_people',
                x='num_params', y='recall', title='(b) recall on trained people against model size',
                xlabel='parameters', ylabel='recall (mean over seeds)',
                hlines=[(cfg.threshold, '--', f'threshold {cfg.threshold}')])
    plot_panels(confs, cfg.alpha, os.path.join(out_dir, 'ood_recall.png'), curve='n_embd',
                x='n_people', y='recall_ood', title='(c) recall on never-seen people against training people',
                xlabel='people trained on', ylabel='OOD recall (mean over seeds)',
                hlines=[(summary['chance_level'], ':', f"chance (best fixed guess) {summary['chance_level']:.4f}"),
                        (cfg.ood_threshold, '--', f'{cfg.ood_threshold}')])
    plot_compressibility(summary, os.path.join(out_dir, 'compressibility.png'))
    print(json.dumps({k: summary[k] for k in ('runs', 'in_weight_loglog_exponent',
                      'in_weight_params_per_fact', 'in_tool_level', 'ood_transition_n_people')}))
    return summary


def plot_finetune(rows, cfg, out_dir):
    """The large-scale study's three figures -> its summary (summary.json's 'finetune')."""
    rows = [r for r in rows if r['alpha'] == cfg.alpha]
    points, summary = summarize_finetune(rows, cfg)
    plot_finetune_recall(points, summary['chance_level'], os.path.join(out_dir, 'finetune_recall.png'))
    plot_finetune_drift(points, os.path.join(out_dir, 'finetune_drift.png'))
    plot_finetune_steps(rows, os.path.join(out_dir, 'finetune_recall_steps.png'))
    for model, settings in summary['models'].items():  # one line per model and setting
        for ds, by_n in settings.items():
            print(json.dumps({'model': model, 'dataset': ds, **by_n}))
    print(json.dumps({'finetune_facts': summary['facts']}))
    return summary


def main(argv):
    cfg = configurator.main_parse(DEFAULTS, argv)
    out_dir = cfg.out_dir or os.path.dirname(cfg.results.split(',')[0]) or '.'
    os.makedirs(out_dir, exist_ok=True)
    rows, ft_rows = load(cfg.results), load_finetune(cfg.results)
    if not rows and not ft_rows:
        raise SystemExit(f"error: no finished runs in {cfg.results}")
    if cfg.compare and not rows:
        print(f"plot: --compare needs the controlled study's rows, and {cfg.results} has none: "
              f"{cfg.compare} left out", file=sys.stderr)
    summary = plot_controlled(rows, cfg, out_dir) if rows else {}
    if ft_rows:
        summary['finetune'] = plot_finetune(ft_rows, cfg, out_dir)
    with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {4 * bool(rows) + 3 * bool(ft_rows)} figures and summary.json to {out_dir}")


if __name__ == '__main__':
    main(sys.argv[1:])
