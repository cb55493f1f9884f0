"""configurator.py: defaults, config files and --key=value flags, checked against the defaults;
--help from the comments beside DEFAULTS."""
import os
import runpy
import subprocess
import sys

import pytest

from configurator import ConfigError, parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = dict(out_dir='out', learning_rate=1e-3, max_iters=100, compile=False, betas=(0.9, 0.95),
                init_from='scratch')


def test_flags_override_defaults_with_types():
    cfg = parse(DEFAULTS, ['--learning_rate=1', '--max_iters=7', '--compile=True', '--out_dir=a=b'])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.max_iters == 7 and cfg.compile is True
    assert cfg.out_dir == 'a=b'  # split on the first '='


def test_an_auto_option_takes_true_false_or_text_and_nothing_else_a_bool(tmp_path):
    defaults = dict(DEFAULTS, compile='auto', dtype='float32')
    checks = {'compile': ('auto', True, False)}
    assert parse(defaults, [], checks).compile == 'auto'
    assert parse(defaults, ['--compile=False'], checks).compile is False
    assert parse(defaults, ['--compile'], checks).compile is True  # bare: True
    (tmp_path / 'c.py').write_text('compile = True\n')
    assert parse(defaults, [str(tmp_path / 'c.py')], checks).compile is True
    with pytest.raises(ConfigError, match="--compile='yes' is not valid: choose one of 'auto', True, False"):
        parse(defaults, ['--compile=yes'], checks)
    assert parse(defaults, ['--dtype=True']).dtype == 'True'  # another text option keeps the text
    (tmp_path / 'd.py').write_text('dtype = True\n')
    with pytest.raises(ConfigError, match="'dtype' expects str"):
        parse(defaults, [str(tmp_path / 'd.py')])


def test_config_file_then_flags(tmp_path):
    path = tmp_path / 'c.py'
    path.write_text('import math\nmax_iters = 10 * 3\nlearning_rate = math.sqrt(4e-6)\n')
    cfg = parse(DEFAULTS, [str(path), '--max_iters=5'])
    assert cfg.max_iters == 5 and cfg.learning_rate == pytest.approx(2e-3)


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'lr'.*learning_rate"):
        parse(DEFAULTS, ['--lr=1'])
    path = tmp_path / 'typo.py'
    path.write_text('max_iter = 10\n')
    with pytest.raises(ConfigError, match="unknown config key 'max_iter'.*max_iters"):
        parse(DEFAULTS, [str(path)])


def test_misspelt_keys_name_the_closest_one(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse(DEFAULTS, ['--lerning_rate=1'])
    assert str(e.value) == ("unknown config key 'lerning_rate' (flag --lerning_rate=1); "
                            "did you mean 'learning_rate'? (--help lists every option)")
    path = tmp_path / 'typo.py'
    path.write_text('max_iter = 10\n')
    with pytest.raises(ConfigError) as e:
        parse(DEFAULTS, [str(path)])
    assert str(e.value) == (f"unknown config key 'max_iter' (in {path}); "
                            "did you mean 'max_iters'? (--help lists every option)")
    with pytest.raises(ConfigError, match="'zzz'.*; valid keys: betas, compile, init_from"):
        parse(DEFAULTS, ['--zzz=1'])  # nothing close: every valid key


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="'max_iters' expects int"):
        parse(DEFAULTS, ['--max_iters=1.5'])
    with pytest.raises(ConfigError, match="'compile' expects bool"):
        parse(DEFAULTS, ['--compile=1'])
    with pytest.raises(ConfigError, match='cannot read config file no/such/file.py: No such file'):
        parse(DEFAULTS, ['no/such/file.py'])


def test_bare_bool_flag_means_true(tmp_path):
    assert parse(DEFAULTS, ['--compile']).compile is True
    assert parse(DEFAULTS, ['--compile', '--max_iters=3']).compile is True
    path = tmp_path / 'c.py'
    path.write_text('max_iters = 30\n')
    cfg = parse(DEFAULTS, ['--compile', str(path)])  # a config file after it is still a config file
    assert cfg.compile is True and cfg.max_iters == 30


def test_bare_flag_without_a_value_is_refused():
    for argv in (['--max_iters'], ['--max_iters', '--compile']):
        with pytest.raises(ConfigError) as e:
            parse(DEFAULTS, argv)
        assert str(e.value) == '--max_iters needs a value: write --max_iters=VALUE'


def test_space_separated_value_is_refused_with_the_spelling():
    with pytest.raises(ConfigError) as e:
        parse(DEFAULTS, ['--max_iters', '5'])
    assert str(e.value) == "write --max_iters=5, not '--max_iters 5': one argument, with '='"
    with pytest.raises(ConfigError, match=r"write --compile=True, not '--compile True'"):
        parse(DEFAULTS, ['--compile', 'True'])
    with pytest.raises(ConfigError, match=r"write --max_iters=-5, not '--max_iters -5'"):
        parse(DEFAULTS, ['--max_iters', '-5'])


def positive(value):
    return None if value > 0 else 'must be > 0'


CHECKS = {'init_from': ('scratch', 'resume'), 'max_iters': positive}


def test_checks_vet_flags_and_config_files(tmp_path):
    cfg = parse(DEFAULTS, ['--init_from=resume', '--max_iters=1'], checks=CHECKS)
    assert cfg.init_from == 'resume' and cfg.max_iters == 1
    with pytest.raises(ConfigError) as e:
        parse(DEFAULTS, ['--init_from=resum'], checks=CHECKS)
    assert str(e.value) == "--init_from='resum' is not valid: choose one of 'scratch', 'resume'"
    with pytest.raises(ConfigError) as e:
        parse(DEFAULTS, ['--max_iters=0'], checks=CHECKS)
    assert str(e.value) == '--max_iters=0: must be > 0'
    path = tmp_path / 'c.py'
    path.write_text("init_from = 'gpt2'\n")
    with pytest.raises(ConfigError, match="--init_from='gpt2' is not valid"):
        parse(DEFAULTS, [str(path)], checks=CHECKS)
    # the final value is checked: a flag may repair what a file set
    assert parse(DEFAULTS, [str(path), '--init_from=scratch'], checks=CHECKS).init_from == 'scratch'


# ----------------------------------------------------------------------------------------------
# --help, from the comments beside DEFAULTS

TOY = '''"""
Toy: greets people.

    python toy.py --name=you
"""
import sys
sys.path.insert(0, {root!r})
import configurator

SHARED = dict(
    # I/O
    name='world',      # who to greet
    times=1,           # greetings, continued
                       # on this aligned line
    # a heading, not a continuation
    loud=False,
    tone='warm',       # 'warm' or 'cold'
    mode='plain', level=2,  # level: the last key of a line owns its comment
    colours=['red',
             'blue'],   # where the value ends
)
DEFAULTS = {{**SHARED,
            'mode': 'plain',  # how to greet
            'path': '/a/very/long/default/path/past/the/column'}}  # where to write

if __name__ == '__main__':
    checks = dict(mode=('plain', 'fancy'), tone=('warm', 'cold'),  # tone's comment names both
                  times=lambda t: None if t > 0 else 'must be > 0')
    print(configurator.main_parse(DEFAULTS, sys.argv[1:], checks=checks))
'''

TOY_HELP = """\
Toy: greets people.

    python toy.py --name=you

options (config files first, then flags; the last wins):
  --name='world'             who to greet
  --times=1                  greetings, continued
                             on this aligned line
  --loud=False
  --tone='warm'              'warm' or 'cold'
  --mode='plain'             how to greet (one of 'plain', 'fancy')
  --level=2                  level: the last key of a line owns its comment
  --colours=['red', 'blue']  where the value ends
  --path='/a/very/long/default/path/past/the/column'
                             where to write
"""


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)


def test_help_of_a_script_outside_the_project(tmp_path):
    (tmp_path / 'toy.py').write_text(TOY.format(root=ROOT))
    r = run('toy.py', '--nmae=x', '-h', cwd=tmp_path)  # -h anywhere wins over a bad flag
    assert (r.returncode, r.stdout, r.stderr) == (0, TOY_HELP, '')
    r = run('toy.py', '--mode=fancyy', cwd=tmp_path)
    assert r.returncode == 1 and r.stderr == ("error: --mode='fancyy' is not valid: "
                                              "choose one of 'plain', 'fancy'\n")
    r = run('toy.py', '--times=0', cwd=tmp_path)
    assert r.returncode == 1 and r.stderr == 'error: --times=0: must be > 0\n'


@pytest.mark.parametrize('script, flag, meanings', [
    ('train.py', '--help', {'eval_questions': '>0: recall on this many questions',
                            'batch_size': 'rows per micro-batch'}),
    ('sweep.py', '-h', {'lr_ref_width': 'lr_ref_width / n_embd',  # a continued comment
                        'eval_questions': 'cap: a run evaluates', 'dataset': 'in-weight, in-tool'}),
    ('bench/train.py', '--help', {'max_iters': 'timed steps', 'batch_size': 'rows per micro-batch'}),
    ('prepare_data.py', '--help', {'n_people': 'people we train on'}),
])
def test_help_lists_every_option_with_its_comment(script, flag, meanings):
    r = run(script, flag)
    assert r.returncode == 0 and r.stderr == '', r.stderr
    module = runpy.run_path(os.path.join(ROOT, script), run_name='not_main')
    assert r.stdout.startswith(module['__doc__'].strip().splitlines()[0])
    lines = r.stdout.splitlines()
    for key, value in module['DEFAULTS'].items():  # each key once, in order, with its default
        assert sum(line.startswith(f'  --{key}=') for line in lines) == 1, key
    keys = [line.split('=')[0][4:] for line in lines if line.startswith('  --')]
    assert keys == list(module['DEFAULTS'])
    for key, meaning in meanings.items():
        i = next(i for i, line in enumerate(lines) if line.startswith(f'  --{key}='))
        assert meaning in ' '.join(lines[i:i + 2]), (key, lines[i:i + 2])
