"""
Config for every script: defaults, then an optional python config file, then --key=value flags.

    cfg = configurator.parse(DEFAULTS, sys.argv[1:])    # -> SimpleNamespace

nanoGPT's configurator with its sharp edges filed off: a name the defaults do not have is an
error that lists the valid ones (in files and in flags), an int is accepted where a float is
expected, a flag is split on its first '=', and values are type-checked against the defaults.
"""
import ast
import types


class ConfigError(ValueError):
    pass


def _check_key(key, defaults, where):
    if key not in defaults:
        valid = ', '.join(sorted(defaults))
        raise ConfigError(f"unknown config key '{key}' ({where}); valid keys: {valid}")


def _coerce(key, value, default):
    """Return value converted to the default's type, or raise ConfigError."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):  # before int: bool is a subclass of int
        if isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    elif isinstance(value, type(default)) and not isinstance(value, bool):
        return value
    raise ConfigError(f"config key '{key}' expects {type(default).__name__} "
                      f"(default {default!r}), got {type(value).__name__} {value!r}")


def _parse_flag_value(text, default):
    """--key=value: a python literal when it parses as one, else the raw string."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    # '--name=1e3' for a str option stays a string
    return text if isinstance(default, str) and not isinstance(value, str) else value


def _run_config_file(path, config):
    """Execute a config file in a namespace seeded with the current config."""
    namespace = dict(config)
    try:
        with open(path) as f:
            code = compile(f.read(), path, 'exec')
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    exec(code, namespace)
    updates = {}
    for key, value in namespace.items():
        if key.startswith('_') or isinstance(value, types.ModuleType) or callable(value):
            continue  # imports, helpers and __builtins__ are not settings
        _check_key(key, config, f'in {path}')
        updates[key] = value
    return updates


def parse(defaults, argv):
    """defaults: dict of name -> default value. argv: config files and --key=value flags."""
    config = dict(defaults)
    for arg in argv:
        if arg.startswith('--'):
            key, sep, text = arg[2:].partition('=')
            if not sep:
                raise ConfigError(f"flag '{arg}' needs a value: --{key}=VALUE")
            _check_key(key, defaults, f'flag {arg}')
            config[key] = _coerce(key, _parse_flag_value(text, defaults[key]), defaults[key])
        else:
            for key, value in _run_config_file(arg, config).items():
                config[key] = _coerce(key, value, defaults[key])
    return types.SimpleNamespace(**config)


def main_parse(defaults, argv):
    """parse() for a script's __main__: a bad config exits with its one-line message."""
    try:
        return parse(defaults, argv)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
