"""The years in scope: the one definition of which yearly windows the project imports, syncs, checks and
offers as partitions (``KOMMO_REFRESH_YEARS``).

A scope is a list of years and ranges: ``2025``, ``2025,2027``, ``2025-2026``, or ``2025-`` (open: from 2025
through the current year). An open range follows the calendar: a new year enters the scope at its first
second, UTC. Which year is "current" depends on whose clock asks: the sync asks with Kommo's clock (the
``Date`` of its first answer), the definitions and sensors with this machine's; both agree but for the
seconds around midnight of 31 December. Free of Dagster: the assets, sensors, CLI, benchmark and tests read
the same object.
"""

from dataclasses import dataclass
from datetime import UTC, datetime

# The seed's first year. The only year the project names: everything else is computed from the calendar.
FIRST_SEED_YEAR = 2025
DEFAULT_SCOPE = f"{FIRST_SEED_YEAR}-"
MIN_YEAR, MAX_YEAR = 2000, 2100


class ScopeError(ValueError):
    """A value of ``KOMMO_REFRESH_YEARS`` the project cannot read."""


@dataclass(frozen=True)
class Window:
    """The half-open ``[created_from, created_to)`` range of Kommo lead creation times."""

    created_from: datetime
    created_to: datetime

    @property
    def year(self) -> int | None:
        """The calendar year (UTC) when the window is exactly one, else None."""
        start = self.created_from.astimezone(UTC)
        whole = start == datetime(start.year, 1, 1, tzinfo=UTC) and self.created_to == datetime(
            start.year + 1, 1, 1, tzinfo=UTC)
        return start.year if whole else None

    @property
    def key(self) -> str:
        """The window's partition key (its year), or its range when it is not a calendar year."""
        year = self.year
        return str(year) if year is not None else f"{self.created_from.isoformat()}/{self.created_to.isoformat()}"


def _parse_instant(text: str, name: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name} must be an ISO date or datetime such as 2025-01-01, got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def window_for(year: int | None = None, created_from: str | None = None, created_to: str | None = None) -> Window:
    """The window of calendar ``year`` (UTC), or an explicit ``created_from``/``created_to`` (both together),
    which wins; with neither, the current year."""
    if created_from or created_to:
        if not (created_from and created_to):
            raise ValueError("created_from and created_to must be given together")
        start = _parse_instant(created_from, "created_from")
        end = _parse_instant(created_to, "created_to")
    else:
        year = current_year() if year is None else year
        if not MIN_YEAR <= year <= MAX_YEAR:
            raise ValueError(f"year must be between {MIN_YEAR} and {MAX_YEAR}, got {year}")
        start = datetime(year, 1, 1, tzinfo=UTC)
        end = datetime(year + 1, 1, 1, tzinfo=UTC)
    if start >= end:
        raise ValueError(f"created_from ({start.isoformat()}) must be before created_to ({end.isoformat()})")
    return Window(start, end)


def current_year(now: datetime | None = None) -> int:
    """The calendar year (UTC) of ``now`` (default: this machine's clock)."""
    return (now or datetime.now(UTC)).astimezone(UTC).year


@dataclass(frozen=True)
class YearScope:
    """Ranges ``(first, last)`` of years; ``last`` None is open (through the current year)."""

    ranges: tuple[tuple[int, int | None], ...]

    @classmethod
    def parse(cls, raw: str | None) -> "YearScope":
        text = (raw or "").strip() or DEFAULT_SCOPE
        ranges: list[tuple[int, int | None]] = []
        for item in text.split(","):
            item = item.strip()
            first_text, dash, last_text = item.partition("-")
            try:
                first = int(first_text)
                last = (int(last_text) if last_text.strip() else None) if dash else first
            except ValueError:
                raise ScopeError(_bad(raw)) from None
            if not MIN_YEAR <= first <= MAX_YEAR or (last is not None and not first <= last <= MAX_YEAR):
                raise ScopeError(_bad(raw))
            ranges.append((first, last))
        return cls(tuple(sorted(set(ranges), key=lambda r: (r[0], r[1] is None, r[1] or 0))))

    @property
    def first_year(self) -> int:
        return min(first for first, _ in self.ranges)

    @property
    def open_ended(self) -> bool:
        """Whether the scope grows with the calendar."""
        return any(last is None for _, last in self.ranges)

    def years(self, now: datetime | None = None) -> tuple[int, ...]:
        """Every year in scope at ``now``, ascending: a year enters at its first second, so none after the
        current one (``2025-2030`` holds 2025 and 2026 in 2026). Empty when every range starts later."""
        this_year = current_year(now)
        found: set[int] = set()
        for first, last in self.ranges:
            found.update(range(first, min(this_year, this_year if last is None else last) + 1))
        return tuple(sorted(found))

    def windows(self, now: datetime | None = None) -> tuple[Window, ...]:
        return tuple(window_for(year) for year in self.years(now))

    def contains(self, year: int, now: datetime | None = None) -> bool:
        return year in self.years(now)

    def gaps(self, now: datetime | None = None) -> tuple[int, ...]:
        """Years between the first and the last in scope that are not in it (``2025,2027``: 2026)."""
        years = self.years(now)
        if not years:
            return ()
        return tuple(y for y in range(years[0], years[-1] + 1) if y not in years)

    def as_json(self) -> list[list[int | None]]:
        """The form the request sensor copies into the database, which resolves open ranges itself
        (``kommo_years_in_scope()``) so the button follows the calendar between ticks too."""
        return [[first, last] for first, last in self.ranges]

    def __str__(self) -> str:
        return ",".join(str(f) if f == last else f"{f}-{'' if last is None else last}" for f, last in self.ranges)


def _bad(raw: str | None) -> str:
    return (f"KOMMO_REFRESH_YEARS must be years and ranges between {MIN_YEAR} and {MAX_YEAR} such as '2025', "
            f"'2025,2027', '2025-2026' or '2025-' (from 2025 through the current year), got {raw!r}")
