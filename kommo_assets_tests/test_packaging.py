"""The project installed the way a deployment installs it: a wheel built from the source tree, installed
non-editable, used from a directory outside the tree. Its SQL ships inside the package: `kommo-assets
migrate` applies it, and `kommo-assets run` imports the current year, with nothing read from the tree."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import psycopg

from kommo_assets.dev.dagster_dev import REPO_ROOT


def _installed(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The wheel of the source tree installed into a directory of its own; the environment that imports it
    from there (dependencies from this environment, the source tree nowhere on the path)."""
    wheels, target, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    # A copy of the tree as a clone has it: setuptools builds in the source folder (build/), not in the tree
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".kommo-dev", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels),
                    str(source)], check=True, timeout=300, cwd=tmp_path)
    (wheel,) = wheels.glob("kommo_assets-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, timeout=300, cwd=tmp_path)
    dependencies = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOMMO_", "DAGSTER_", "SLACK_"))}
    # -S: no site processing, so the development install's editable finder cannot hand out the source tree
    env["PYTHONPATH"] = os.pathsep.join([str(target), dependencies])
    return target, env


def _cli(target: Path, env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-S", "-m", "kommo_assets.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_a_non_editable_install_migrates_and_runs_from_outside_the_source_tree(tmp_path, empty_database_url):
    target, env = _installed(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = subprocess.run([sys.executable, "-S", "-c", "import json, kommo_assets.db.migrate as m; "
                            "print(json.dumps([m.__file__, str(m.sql_dir())]))"],
                           env=env, cwd=outside, capture_output=True, text=True, check=True)
    module, sql = json.loads(where.stdout)
    assert module.startswith(str(target)) and sql.startswith(str(target)), (module, sql)
    assert not (target / "kommo_assets_tests").exists()

    env["KOMMO_DATABASE_URL"] = empty_database_url
    migrated = _cli(target, env, outside, "migrate")
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    shipped = sorted(p.stem for p in (Path(sql) / "migrations").glob("*.sql"))
    with psycopg.connect(empty_database_url) as conn:
        assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")] == shipped
    assert shipped == sorted(p.stem for p in (REPO_ROOT / "kommo_assets" / "sql" / "migrations").glob("*.sql"))

    # A deployment's own Dagster instance (DAGSTER_HOME), as a container has it; the simulator stands in for
    # Kommo (no KOMMO_BASE_URL), shipped in the package's dev tools
    (tmp_path / "dagster_home").mkdir()
    env["DAGSTER_HOME"] = str(tmp_path / "dagster_home")
    run = _cli(target, env, outside, "run", "--leads", "300", "--home", str(tmp_path / "home"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert ": success" in run.stdout and '"status": "succeeded"' in run.stdout
