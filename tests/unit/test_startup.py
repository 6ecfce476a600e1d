"""What a worker process loads and compiles before its first claim (each start of each worker)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import conveyor
from conveyor import bench


def test_the_worker_command_does_not_import_rich() -> None:
    """rich draws the CLI's tables; a worker prints none. Imported by the CLI module, it was
    about a sixth of every worker's start."""
    probe = (
        "import sys, conveyor.cli, conveyor.worker\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'rich'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"


def test_the_bench_compiles_the_package_to_bytecode() -> None:
    """Under PYTHONDONTWRITEBYTECODE=1 an editable install is compiled anew by every process;
    run_bench compiles it once (this helper) before it starts workers, as pip does at install,
    so its workers start as installed."""
    package = Path(conveyor.__file__).parent
    compiled = Path(importlib.util.cache_from_source(str(package / "worker.py")))
    compiled.unlink(missing_ok=True)
    bench._compile_package()
    assert compiled.exists()
