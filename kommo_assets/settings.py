"""Reads the project's environment in one place: flags, the target database, Kommo and Slack settings.

Everything else asks this module; nothing reads ``os.environ`` for these names on its own.
"""

import math
import os
from collections.abc import Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kommo_assets.kommo import DEFAULT_MAX_RPS

# Below this, a refresh of 100,000 leads would take hours: surely a mistake.
MIN_KOMMO_RPS = 0.1

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


def is_set(name: str, env: Mapping[str, str] | None = None) -> bool:
    """True when the variable holds something other than blanks."""
    env = os.environ if env is None else env
    return bool(env.get(name, "").strip())


def kommo_access_token(env: Mapping[str, str] | None = None) -> str | None:
    """The Kommo token when configured, for redacting it out of texts; None when unset."""
    env = os.environ if env is None else env
    return env.get("KOMMO_ACCESS_TOKEN", "").strip() or None


DEFAULT_WEBSERVER_URL = "http://127.0.0.1:3000"


def dagster_webserver_url(env: Mapping[str, str] | None = None) -> str:
    """Where operators open the Dagster UI (``DAGSTER_WEBSERVER_URL``), for links in alerts."""
    env = os.environ if env is None else env
    url = env.get("DAGSTER_WEBSERVER_URL", "").strip() or DEFAULT_WEBSERVER_URL
    return url.rstrip("/")


DEFAULT_DRY_RUN_CRON = "0 2 * * *"
DEFAULT_FULL_REFRESH_CRON = "30 2 * * *"


def dry_run_cron(env: Mapping[str, str] | None = None) -> str:
    """Cron of the nightly dry run (``KOMMO_DRY_RUN_CRON``); the schedule validates it."""
    env = os.environ if env is None else env
    return env.get("KOMMO_DRY_RUN_CRON", "").strip() or DEFAULT_DRY_RUN_CRON


def full_refresh_cron(env: Mapping[str, str] | None = None) -> str:
    """Cron of the nightly full refresh (``KOMMO_FULL_REFRESH_CRON``); the schedule validates it."""
    env = os.environ if env is None else env
    return env.get("KOMMO_FULL_REFRESH_CRON", "").strip() or DEFAULT_FULL_REFRESH_CRON


def schedule_timezone(env: Mapping[str, str] | None = None) -> str:
    """IANA timezone of both schedules (``KOMMO_SCHEDULE_TIMEZONE``, default UTC)."""
    env = os.environ if env is None else env
    name = env.get("KOMMO_SCHEDULE_TIMEZONE", "").strip() or "UTC"
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"KOMMO_SCHEDULE_TIMEZONE must be an IANA timezone such as UTC or Europe/Berlin, got {name!r}"
        ) from None
    return name


def abandoned_grace_seconds(env: Mapping[str, str] | None = None) -> float:
    """``KOMMO_ABANDONED_GRACE_SECONDS`` (default 60): how long an import marked running may have no live
    owner (between two steps) before the next start closes it as abandoned."""
    return _positive_number("KOMMO_ABANDONED_GRACE_SECONDS", 60, env)


def kommo_max_rps(env: Mapping[str, str] | None = None) -> float:
    """``KOMMO_MAX_RPS`` (default 6.9): the Kommo client's pace, requests per second for all its threads
    together, under Kommo's 7. Lower it for a wider margin against the network (see the README)."""
    value = _positive_number("KOMMO_MAX_RPS", DEFAULT_MAX_RPS, env)
    if not math.isfinite(value) or value < MIN_KOMMO_RPS:
        raise ConfigError(f"KOMMO_MAX_RPS must be a number of requests per second from {MIN_KOMMO_RPS}, "
                          f"got {value!r}")
    return value


# --- the Bookings-page button: which years requests may ask for, and how often ---------------------

DEFAULT_REFRESH_YEARS = (2025,)
DEFAULT_REQUEST_COOLDOWN_MINUTES = 10.0


def refresh_years(env: Mapping[str, str] | None = None) -> tuple[int, ...]:
    """``KOMMO_REFRESH_YEARS`` (comma-separated, default 2025): the years a refresh request may ask for;
    the first is the default. The request sensor copies them into the database for the app."""
    from kommo_assets.db.runs import window_for

    env = os.environ if env is None else env
    raw = env.get("KOMMO_REFRESH_YEARS", "")
    if not raw.strip():
        return DEFAULT_REFRESH_YEARS
    years: list[int] = []
    for item in raw.split(","):
        try:
            year = int(item.strip())
            window_for(year)
        except ValueError:
            raise ConfigError(
                f"KOMMO_REFRESH_YEARS must be comma-separated years between 2000 and 2100 such as "
                f"'2025,2024', got {raw!r}"
            ) from None
        if year not in years:
            years.append(year)
    return tuple(years)


def request_cooldown_minutes(env: Mapping[str, str] | None = None) -> float:
    """``KOMMO_REQUEST_COOLDOWN_MINUTES`` (default 10): how long after a requested refresh ends the button
    may ask for the next one, so it cannot keep refreshes running back to back on Kommo's shared rate limit."""
    value = _positive_number("KOMMO_REQUEST_COOLDOWN_MINUTES", DEFAULT_REQUEST_COOLDOWN_MINUTES, env)
    if not math.isfinite(value):
        raise ConfigError(f"KOMMO_REQUEST_COOLDOWN_MINUTES must be a number of minutes, got {value!r}")
    return value
