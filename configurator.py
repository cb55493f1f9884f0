"""
Config for every script: defaults, then optional python config files, then --key=value flags.

    cfg = configurator.main_parse(DEFAULTS, sys.argv[1:], checks={'dtype': ('float32', 'bfloat16')})

nanoGPT's configurator with its sharp edges filed off: an unknown name (in a file or a flag) is an
error that suggests the closest valid one; a flag splits on its first '='; a bare --flag is True
for a bool (or an option whose default is 'auto', which also takes True or False) and '--key value'
is refused; an int is accepted for a float; values are type-checked against the defaults, then
vetted by `checks` (allowed values, or a function returning an error).
--help prints the script's docstring and every option with its default and its meaning, which is
the comment beside it in DEFAULTS (option_help): each option is explained in one place only.
"""
import ast
import difflib
import io
import os
import sys
import tokenize
import types

ROOT = os.path.dirname(os.path.realpath(__file__))  # option_help reads this project's files only


class ConfigError(ValueError):
    pass


def _check_key(key, defaults, where):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = (f"did you mean '{close[0]}'? (--help lists every option)" if close
                else f"valid keys: {', '.join(sorted(defaults))}")
        raise ConfigError(f"unknown config key '{key}' ({where}); {hint}")


def _takes_bool(default):
    """A bool option, or an 'auto' one (compile='auto'), which also takes True or False."""
    return isinstance(default, bool) or default == 'auto'


def _coerce(key, value, default):
    """Return value converted to the default's type, or raise ConfigError."""
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):  # before int: bool is a subclass of int
        if isinstance(value, bool) and _takes_bool(default):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    elif isinstance(value, type(default)):
        return value
    raise ConfigError(f"config key '{key}' expects {type(default).__name__} "
                      f"(default {default!r}), got {type(value).__name__} {value!r}")


def _parse_flag_value(text, default):
    """--key=value: a python literal when it parses as one, else the raw string."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    # '--name=1e3' for a str option stays a string; True / False for an 'auto' option is a bool
    if isinstance(value, bool) and _takes_bool(default):
        return value
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


def _choices(values):
    return ', '.join(map(repr, values))


def parse(defaults, argv, checks=None):
    """defaults: dict of name -> default value. argv: config files and --key=value flags.
    checks: dict of name -> tuple of allowed values, or function(value) -> None or an error."""
    config = dict(defaults)
    for i, arg in enumerate(argv):
        if not arg.startswith('--'):
            for key, value in _run_config_file(arg, config).items():
                config[key] = _coerce(key, value, defaults[key])
            continue
        key, sep, text = arg[2:].partition('=')
        _check_key(key, defaults, f'flag {arg}')
        if sep:
            config[key] = _coerce(key, _parse_flag_value(text, defaults[key]), defaults[key])
            continue
        # a bare --key: True for a bool or an 'auto' option; '--key value' is refused (unless
        # value is a config file)
        is_bool = _takes_bool(defaults[key])
        after = argv[i + 1] if i + 1 < len(argv) else '--'
        then_a_config_file = is_bool and after.endswith('.py') and os.path.isfile(after)
        if not after.startswith('--') and not then_a_config_file:
            raise ConfigError(f"write --{key}={after}, not '--{key} {after}': one argument, with '='")
        if not is_bool:
            raise ConfigError(f"--{key} needs a value: write --{key}=VALUE")
        config[key] = True
    for key, check in (checks or {}).items():  # the final values, from files and flags alike
        value = config[key]
        if not callable(check):  # the allowed values
            if value not in check:
                raise ConfigError(f"--{key}={value!r} is not valid: choose one of {_choices(check)}")
        elif (problem := check(value)) is not None:
            raise ConfigError(f"--{key}={value!r}: {problem}")
    return types.SimpleNamespace(**config)


def _comments_by_key(path):
    """{key: comment} for the entries of a file's top-level `X = dict(...)` and `X = {...}`: the
    comment on the line where the value ends (or on its key's line), continued by comment-only
    lines below that start at the same column (one at the keys' own indentation is a heading)."""
    try:
        with tokenize.open(path) as f:
            source = f.read()
        tree, tokens = ast.parse(source), list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (OSError, SyntaxError, UnicodeDecodeError, tokenize.TokenError):
        return {}
    comments = {t.start[0]: (t.start[1], t.string.lstrip('#').strip(), not t.line[:t.start[1]].strip())
                for t in tokens if t.type == tokenize.COMMENT}  # line -> (column, text, alone)
    entries = []  # (key, line of the key, line where its value ends)
    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(value, ast.Call) and getattr(value.func, 'id', None) == 'dict':
            entries += [(kw.arg, kw.lineno, kw.value.end_lineno) for kw in value.keywords if kw.arg]
        elif isinstance(value, ast.Dict):
            entries += [(k.value, k.lineno, v.end_lineno) for k, v in zip(value.keys, value.values)
                        if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    owner = {end: i for i, (_, _, end) in enumerate(entries)}  # in `a=1, b=2,  # x`, x is b's
    found = {}
    for i, (key, first, end) in enumerate(entries):
        line = next((n for n in (end, first) if n in comments and not comments[n][2]
                     and comments[n][1] and owner.get(n, i) == i), None)
        if line is None or key in found:
            continue
        column, found[key] = comments[line][:2]
        while comments.get(line + 1, (None, '', False))[::2] == (column, True):
            line += 1
            found[key] += '\n' + comments[line][1]
    return found


def option_help(defaults):
    """{key: meaning}: the comment beside each key in the source, read (never run) from __main__'s
    file, then from this project's loaded modules, those that explain most of these keys first."""
    files = {os.path.realpath(m.__file__) for m in list(sys.modules.values())
             if isinstance(getattr(m, '__file__', None), str) and m.__file__.endswith('.py')}
    ours = [f for f in sorted(files)
            if f.startswith(ROOT + os.sep) and 'site-packages' not in os.path.relpath(f, ROOT)]
    found = [{k: v for k, v in _comments_by_key(f).items() if k in defaults} for f in ours]
    found.sort(key=len, reverse=True)
    main = getattr(sys.modules.get('__main__'), '__file__', None)
    found.insert(0, _comments_by_key(os.path.realpath(main)) if main else {})
    return {k: c[k] for c in reversed(found) for k in c if k in defaults}  # the first found wins


def help_text(defaults, checks=None):
    """The script's docstring, then each option: --key=DEFAULT, its meaning and its choices."""
    meanings, checks = option_help(defaults), checks or {}
    flags = {key: f'--{key}={value!r}' for key, value in defaults.items()}
    width = max([len(f) for f in flags.values() if len(f) <= 36], default=0)
    doc = (getattr(sys.modules.get('__main__'), '__doc__', None) or '').strip()
    lines = ([doc, ''] if doc else []) + ['options (config files first, then flags; the last wins):']
    for key, flag in flags.items():
        text = meanings.get(key, '')
        choices = checks.get(key) if not callable(checks.get(key)) else None
        if choices is not None and not all(repr(v) in text for v in choices):
            text += f' (one of {_choices(choices)})'  # unless the comment names them all
        text = text.strip().split('\n')
        if len(flag) > width and text[0]:
            text.insert(0, '')  # a long default: its meaning starts on the next line
        lines += [f'  {a:<{width}}  {b}'.rstrip() for a, b in zip([flag] + [''] * len(text), text)]
    return '\n'.join(lines)


def main_parse(defaults, argv, checks=None):
    """parse() for a script's __main__: --help or -h prints help_text() and exits; a bad config
    exits with its one-line message."""
    if '--help' in argv or '-h' in argv:
        print(help_text(defaults, checks))
        raise SystemExit(0)
    try:
        return parse(defaults, argv, checks)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
