"""Reads the project's environment in one place: flags, the target database, Kommo and Slack settings.

Everything else asks this module; nothing reads ``os.environ`` for these names on its own.
"""

import os
from collections.abc import Mapping

TRUE_VALUES = frozenset({"1", "true", "yes", "on"})
FALSE_VALUES = frozenset({"0", "false", "no", "off", ""})


class ConfigError(ValueError):
    """A setting is missing or has a value the project cannot read."""


def parse_flag(name: str, env: Mapping[str, str] | None = None) -> bool:
    """``1/true/yes/on`` are true, ``0/false/no/off`` and unset are false; anything else names the variable."""
    env = os.environ if env is None else env
    raw = env.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    raise ConfigError(
        f"{name} must be one of 1/true/yes/on or 0/false/no/off, got {raw!r}"
    )


def live_enabled(env: Mapping[str, str] | None = None) -> bool:
    return parse_flag("KOMMO_ENABLE_LIVE", env)


def slack_alerts_enabled(env: Mapping[str, str] | None = None) -> bool:
    return parse_flag("KOMMO_ENABLE_SLACK_ALERTS", env)


LIVE_DISABLED_REASON = (
    "Kommo refresh is disabled: KOMMO_ENABLE_LIVE is off. Set KOMMO_ENABLE_LIVE=1 "
    "in the environment of the Dagster code location to allow refreshes."
)


def require_live(env: Mapping[str, str] | None = None) -> None:
    """Refuses every refresh path while the live flag is off."""
    if not live_enabled(env):
        raise ConfigError(LIVE_DISABLED_REASON)


def database_url(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    url = env.get("KOMMO_DATABASE_URL", "").strip()
    if not url:
        raise ConfigError(
            "KOMMO_DATABASE_URL is not set: point it at the target PostgreSQL database "
            "(postgresql://user@host:port/dbname), or use `make run`, which starts a local one."
        )
    return url


def _positive_number(name: str, default: float, env: Mapping[str, str] | None = None) -> float:
    env = os.environ if env is None else env
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {raw!r}")
    return value


def snapshot_dir(env: Mapping[str, str] | None = None) -> str | None:
    """``KOMMO_SNAPSHOT_DIR``: where raw snapshots are exported before each swap; unset = no export."""
    env = os.environ if env is None else env
    return env.get("KOMMO_SNAPSHOT_DIR", "").strip() or None


def snapshot_retention_days(env: Mapping[str, str] | None = None) -> float:
    """``KOMMO_SNAPSHOT_RETENTION_DAYS`` (default 90): exported snapshots older than this are deleted."""
    return _positive_number("KOMMO_SNAPSHOT_RETENTION_DAYS", 90, env)


def staging_retention_days(env: Mapping[str, str] | None = None) -> tuple[float, float]:
    """Days the staging rows of succeeded runs (``KOMMO_STAGING_RETENTION_DAYS``, default 7) and of failed
    or needs_review runs (``KOMMO_FAILED_STAGING_RETENTION_DAYS``, default 30) are kept."""
    return (_positive_number("KOMMO_STAGING_RETENTION_DAYS", 7, env),
            _positive_number("KOMMO_FAILED_STAGING_RETENTION_DAYS", 30, env))
