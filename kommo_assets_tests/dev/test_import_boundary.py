"""The code location loads production code only: development tooling stays out of its import graph."""

import subprocess
import sys


def dev_modules_loaded_by(*imports: str) -> list[str]:
    """The ``kommo_assets.dev`` modules a fresh interpreter has loaded after these imports."""
    probe = "\n".join(["import sys", *(f"import {name}" for name in imports),
                       "print(','.join(sorted(m for m in sys.modules if m.split('.')[:2] == ['kommo_assets', 'dev'])))"])
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return [name for name in out.stdout.strip().split(",") if name]


def test_importing_the_definitions_does_not_import_the_dev_tooling():
    assert dev_modules_loaded_by("kommo_assets.definitions") == []


def test_the_probe_sees_a_dev_import_when_there_is_one():
    assert "kommo_assets.dev.simulator" in dev_modules_loaded_by("kommo_assets.definitions",
                                                                   "kommo_assets.dev.simulator")
