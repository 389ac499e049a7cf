"""The code location loads production code only: development tooling stays out of its import graph."""

import subprocess
import sys


def test_importing_the_definitions_does_not_import_the_dev_tooling():
    probe = (
        "import sys\n"
        "import kommo_assets.definitions\n"
        "loaded = sorted(m for m in sys.modules if m == 'kommo_assets.dev' or m.startswith('kommo_assets.dev.'))\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the code location imported dev tooling: {out.stdout.strip()}"


def test_the_probe_sees_a_dev_import_when_there_is_one():
    probe = (
        "import sys\n"
        "import kommo_assets.definitions\n"
        "import kommo_assets.dev.simulator\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith('kommo_assets.dev'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "kommo_assets.dev.simulator" in out.stdout
