"""The tools import the checkout's ``benchmarks`` and ``studies`` as installed packages (setup.py installs them
beside ``tood``), from any working folder, without editing ``sys.path``."""

import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_benchmarks_and_studies_import_from_anywhere(tmp_path):
    code = "import benchmarks, studies; print(benchmarks.__file__); print(studies.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(REPO_ROOT / f / "__init__.py") for f in ("benchmarks", "studies")]
