"""What cannot be a Dagster resource: the live flag, the schedules' cron and timezone (needed when the
definitions load), the database URL of the command line, and the parsing of flags and numbers.

Everything else is a field of a resource, wired to its environment variable in
``kommo_assets.resources.build_resources``.
"""

import math
import os
from collections.abc import Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kommo_assets.scope import ScopeError, YearScope

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


LIVE_DISABLED_REASON = (
    "Kommo refresh is disabled: KOMMO_ENABLE_LIVE is off. Set KOMMO_ENABLE_LIVE=1 "
    "in the environment of the Dagster code location to allow refreshes."
)


def require_live(env: Mapping[str, str] | None = None) -> None:
    """Refuses every refresh path while the live flag is off."""
    if not live_enabled(env):
        raise ConfigError(LIVE_DISABLED_REASON)


HEAL_DRIFT_VARIABLE = "KOMMO_HEAL_DRIFT"


def heal_drift_enabled(env: Mapping[str, str] | None = None) -> bool:
    """``KOMMO_HEAL_DRIFT`` (a flag, default off): a nightly dry run whose drop guard passed and that found drift
    in its year starts a full refresh of that year (``kommo_drift_alert_sensor``). Read at each tick, as the
    live flag is; a value that is not a flag is a ConfigError naming the variable."""
    return parse_flag(HEAL_DRIFT_VARIABLE, env)


def database_url(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    url = env.get("KOMMO_DATABASE_URL", "").strip()
    if not url:
        raise ConfigError(
            "KOMMO_DATABASE_URL is not set: point it at the target PostgreSQL database "
            "(postgresql://user@host:port/dbname), or use `make run`, which starts a local one."
        )
    return url


def positive_number(name: str, value: str | float) -> float:
    """``value`` (text of the variable ``name``, or a number) as a finite number above 0; anything else is a
    ConfigError naming the variable."""
    raw = value.strip() if isinstance(value, str) else value
    try:
        number = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{name} must be a finite number above 0, got {raw!r}")
    return number


def _positive_number(name: str, default: float, env: Mapping[str, str] | None = None) -> float:
    """The variable ``name`` read from the environment as :func:`positive_number`; ``default`` when unset."""
    env = os.environ if env is None else env
    raw = env.get(name, "").strip()
    return positive_number(name, raw) if raw else default


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


# --- the years in scope, and how often the Bookings-page button may ask for a refresh -----------------

DEFAULT_REQUEST_COOLDOWN_MINUTES = 10.0


def refresh_scope(env: Mapping[str, str] | None = None) -> YearScope:
    """``KOMMO_REFRESH_YEARS`` (default ``2025-``: from the seed's year through the current one): the years
    in scope for the partitions, the schedules, the requests and the incremental sync."""
    env = os.environ if env is None else env
    try:
        return YearScope.parse(env.get("KOMMO_REFRESH_YEARS"))
    except ScopeError as exc:
        raise ConfigError(str(exc)) from None


def request_cooldown_minutes(env: Mapping[str, str] | None = None) -> float:
    """``KOMMO_REQUEST_COOLDOWN_MINUTES`` (default 10; 0 turns it off): how long after a refresh ends the
    button may ask for the next one, so it cannot keep refreshes running back to back on Kommo's shared
    rate limit."""
    env = os.environ if env is None else env
    raw = env.get("KOMMO_REQUEST_COOLDOWN_MINUTES", "").strip()
    if not raw:
        return DEFAULT_REQUEST_COOLDOWN_MINUTES
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"KOMMO_REQUEST_COOLDOWN_MINUTES must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"KOMMO_REQUEST_COOLDOWN_MINUTES must be a finite number of minutes, 0 or more, "
                          f"got {raw!r}")
    return value


# --- the incremental sync ----------------------------------------------------------------------------

DEFAULT_SYNC_INTERVAL_SECONDS = 60


def sync_interval_seconds(env: Mapping[str, str] | None = None) -> int:
    """``KOMMO_SYNC_INTERVAL_SECONDS`` (default 60): how often the incremental sync's sensor asks Kommo
    whether anything changed. Needed when the definitions load, as the schedules' crons are."""
    env = os.environ if env is None else env
    raw = env.get("KOMMO_SYNC_INTERVAL_SECONDS", "").strip()
    if not raw:
        return DEFAULT_SYNC_INTERVAL_SECONDS
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"KOMMO_SYNC_INTERVAL_SECONDS must be a whole number of seconds, got {raw!r}") from None
    if value < 1:
        raise ConfigError(f"KOMMO_SYNC_INTERVAL_SECONDS must be at least 1, got {raw!r}")
    return value
