"""Every module of the package imports on its own, as the first project module of a fresh interpreter.

The test suite imports modules in one order; a script (train.py, a benchmark, a notebook) starts from
another. An import cycle shows up only from some starting points, so each module is tried first.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# one interpreter: torch and timm stay loaded, the project's modules are forgotten before each import
_PROBE = r"""
import importlib, pkgutil, sys, warnings
warnings.simplefilter("ignore")  # timm warns when the project's models register a second time
import src
names = sorted(m.name for m in pkgutil.walk_packages(src.__path__, "src."))
failed = []
for name in names:
    for key in [k for k in sys.modules if k == "src" or k.startswith("src.")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "src":
            failed.append(f"{name}: {e!r}")
        # else an optional dependency of that lane (tensorflow_datasets, torch_xla) is not installed here
    except Exception as e:
        failed.append(f"{name}: {e!r}")
print(len(names))
print("\n".join(failed))
"""


def test_every_module_imports_first():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, *failed = proc.stdout.strip().splitlines()
    assert int(count) > 40, proc.stdout  # the walk found the package's modules
    assert not [f for f in failed if f], "\n".join(failed)
