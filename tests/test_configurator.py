"""configurator.py: defaults, config files and --key=value flags, checked against the defaults."""
import pytest

from configurator import ConfigError, parse

DEFAULTS = dict(out_dir='out', learning_rate=1e-3, max_iters=100, compile=False, betas=(0.9, 0.95),
                init_from='scratch')


def test_flags_override_defaults_with_types():
    cfg = parse(DEFAULTS, ['--learning_rate=1', '--max_iters=7', '--compile=True', '--out_dir=a=b'])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.max_iters == 7 and cfg.compile is True
    assert cfg.out_dir == 'a=b'  # split on the first '='


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


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="'max_iters' expects int"):
        parse(DEFAULTS, ['--max_iters=1.5'])
    with pytest.raises(ConfigError, match="'compile' expects bool"):
        parse(DEFAULTS, ['--compile=1'])
    with pytest.raises(ConfigError, match='needs a value'):
        parse(DEFAULTS, ['--compile'])
    with pytest.raises(ConfigError, match='cannot read config file'):
        parse(DEFAULTS, ['no/such/file.py'])
