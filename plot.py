"""
The paper's figures and fitted numbers from a sweep's results.csv (see sweep.py).

    python plot.py --results=sweeps/cpu/results.csv --out_dir=sweeps/cpu
    python plot.py --results=sweeps/cpu/results.csv,sweeps/alpha/results.csv --out_dir=figures
    python plot.py --results=figures/results_cpu.csv --compare=grid4.csv --out_dir=figures

A results CSV needs the columns REQUIRED and may have OPTIONAL (blank: missing); others are ignored.
--compare: the authors' grid as released (results/grid4.csv of github.com/ambroiseodt/itl) in (a).

Writes in out_dir:
    params_vs_facts.png   (a) smallest model reaching recall >= threshold against facts, log-log
    recall_vs_params.png  (b) recall against parameters, one curve per number of people
    ood_recall.png        (c) recall on never-seen people against training people, per width
    compressibility.png   (d) (a) for in-weight runs, one curve per alpha
    summary.json          the numbers behind them

A configuration is a grid point less its seed: recall is averaged over the seeds present, and a
configuration passes when its mean recall reaches the threshold. (a), (b), (c) use the rows with
alpha == --alpha (1.0: attributes independent of the family); (d) uses every alpha.
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


def read_csv(path, required):
    """The rows of a CSV as dicts of strings; one line naming what is missing if a column is."""
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"error: {path} lacks the columns {', '.join(missing)}")
        return list(reader)


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
    """Rows of one or more results CSVs (comma-separated paths), later rows winning."""
    rows = {}
    for path in paths.split(','):
        add_rows(read_csv(path, REQUIRED), rows)
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


def main(argv):
    cfg = configurator.main_parse(DEFAULTS, argv)
    out_dir = cfg.out_dir or os.path.dirname(cfg.results.split(',')[0]) or '.'
    os.makedirs(out_dir, exist_ok=True)
    rows = load(cfg.results)
    if not rows:
        raise SystemExit(f"error: no finished runs in {cfg.results}")
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
    with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: summary[k] for k in ('runs', 'in_weight_loglog_exponent',
                      'in_weight_params_per_fact', 'in_tool_level', 'ood_transition_n_people')}))
    print(f"wrote 4 figures and summary.json to {out_dir}")


if __name__ == '__main__':
    main(sys.argv[1:])
