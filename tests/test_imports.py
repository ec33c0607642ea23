"""poison/ is the library: it imports neither Prefect nor DVC (flows/ and dvc.yaml wrap it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO

PROBE = r"""
import importlib, json, pkgutil, sys
import poison
names = ["poison"] + [m.name for m in pkgutil.walk_packages(poison.__path__, "poison.")]
for name in names:
    importlib.import_module(name)
leaked = sorted(k for k in sys.modules if k.split(".")[0] in ("prefect", "dvc"))
print(json.dumps({"modules": names, "leaked": leaked}))
"""


@pytest.mark.slow  # a fresh interpreter importing torch: about 2 s
def test_importing_every_poison_module_loads_no_prefect_or_dvc(tmp_path):
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # the probe really walked the package
    assert {"poison.config", "poison.stages", "poison.shards", "poison.cli",
            "poison.attacks.deepconfuse", "poison.models.generators"} <= set(report["modules"])
    assert report["leaked"] == []


def test_poison_source_never_imports_prefect_or_dvc():
    pattern = re.compile(r"^\s*(import|from)\s+(prefect|dvc)\b", re.MULTILINE)
    files = sorted((REPO / "poison").rglob("*.py"))
    assert len(files) >= 10
    offenders = [str(f.relative_to(REPO)) for f in files if pattern.search(f.read_text())]
    assert offenders == []
