"""Every compemb module imports first in a fresh interpreter: no import cycle depends on the order."""

import subprocess
import sys
from pathlib import Path

FRESH_IMPORTS = """
import importlib, importlib.util, pkgutil, sys
import torch  # loaded once; every compemb module below is imported from nothing
import compemb
names = sorted(m.name for m in pkgutil.walk_packages(compemb.__path__, "compemb."))
if importlib.util.find_spec("torchrec") is None:  # an optional extra: its adapter cannot import without it
    names.remove("compemb.integrations.torchrec")
for name in names:
    for key in [k for k in sys.modules if k == "compemb" or k.startswith("compemb.")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except Exception as error:
        print(f"FAILED {name}: {type(error).__name__}: {error}")
print(len(names), "modules")
"""


def test_every_module_imports_first_in_a_fresh_process():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", FRESH_IMPORTS], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "FAILED" not in done.stdout, done.stdout
    assert int(done.stdout.split()[-2]) > 30  # the walk found the package's modules

