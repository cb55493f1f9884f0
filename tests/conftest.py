import os
import sys

# the project's modules are flat scripts at the repo root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Tests that train in this process run eager float32: the same numbers on every CPU, and no ~20 s
# compile per model. train.py's default ('auto': bfloat16 where the CPU has it, compiled on CPU)
# is run as users run it by test_train.py's default-path test and the README's commands.
import train  # noqa: E402

train.DEFAULTS.update(dtype='float32', compile=False)


def prepare_dataset(out_dir, n_people, n_ood, *flags):
    """A real dataset written by prepare_data.py into out_dir; returns out_dir as a str."""
    import configurator
    import prepare_data
    prepare_data.prepare(configurator.parse(prepare_data.DEFAULTS, [
        f'--out_dir={out_dir}', f'--n_people={n_people}', f'--n_ood={n_ood}', *flags]))
    return str(out_dir)


def pytest_configure(config):
    # torch.compile's CPU backend calls a deprecated torch.jit API internally: not ours to fix
    config.addinivalue_line('filterwarnings', 'ignore:`torch.jit.script_method` is deprecated:DeprecationWarning')
