"""Deterministic, lazily generated Kommo account: leads, contacts, pipelines and custom fields.

Lead ``i`` (id ``LEAD_ID_BASE + i``) and contact ``j`` (id ``CONTACT_ID_BASE + j``) are pure functions of
``(seed, i)`` and ``(seed, j)``. Nothing is generated up front: the few attributes needed to filter and
sort (status, update delay, contact links) come from small per-block tables that are cached in a bounded
LRU, and whole records are built on demand, one page at a time. A million leads therefore start instantly
and cost a few megabytes.

Mutations (deletes, updates, additions, revoked tokens) are kept in an immutable snapshot that is replaced
on every change, so readers never lock and always see one consistent state. Each change is stamped with
the simulator clock (``Dataset.clock``) and recorded in the events feed (``Dataset.events``) the way Kommo
records it, so a change-tracking client can be tested against it.
"""

from __future__ import annotations

import bisect
import copy
import heapq
import math
import random
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from .clock import Clock
from .events import FIELD_TYPE_CODES, EventLog

# --- account constants -------------------------------------------------------------------------------

ACCOUNT_ID = 31_415_926
LEAD_ID_BASE = 20_000_000
CONTACT_ID_BASE = 30_000_000
MAX_LEADS = 5_000_000

PIPELINE_RENTAL = 8841234
PIPELINE_CORPORATE = 8841299

STATUS_BOT_ANSWERING = 79790631
STATUS_FOLLOW_UP = 91703923
STATUS_QUOTE_SENT = 79790634
STATUS_CONFIRMED = 79790637
STATUS_CAR_DELIVERED = 79790640
STATUS_WON = 142
STATUS_LOST = 143
STATUS_CORPORATE_NEW = 91703950

VEHICLE_FIELD_ID = 1234163
SOURCE_FIELD_ID = 823206
DELIVERY_FIELD_ID = 1218176
COLLECT_FIELD_ID = 1218178
DEPOSIT_FIELD_ID = 1218180
CHILD_SEAT_FIELD_ID = 1218182

CONTACT_PHONE_FIELD_ID = 514001
CONTACT_EMAIL_FIELD_ID = 514003

RESPONSIBLE_USER_IDS = (5550001, 5550002, 5550003, 5550004, 5550005, 5550006)
API_USER_ID = 5550001  # the token's user (the account's current_user_id): author of simulated changes

VEHICLE_ENUM_BASE = 1_000_001
VEHICLE_OPTIONS = 30
DELETED_VEHICLE_OPTIONS = 10  # enum ids VEHICLE_ENUM_BASE+30 .. +39: used by leads, absent from the field
SOURCE_ENUM_BASE = 2_000_001
SOURCE_LABELS = ("Instagram", "Website", "Referral", "Google Ads", "Walk-in", "WhatsApp")

PHONE_ENUMS = {"WORK": 715001, "MOB": 715005, "OTHER": 715009}
EMAIL_ENUMS = {"WORK": 715011, "OTHER": 715015}

LOSS_REASONS = {
    4001: "Too expensive",
    4002: "No cars available",
    4003: "No response",
    4004: "Booked elsewhere",
}

# (pipeline_id, status_id, weight in percent). 142/143 exist in both pipelines.
_STATUS_TABLE = (
    (PIPELINE_RENTAL, STATUS_LOST, 15.0),
    (PIPELINE_RENTAL, STATUS_BOT_ANSWERING, 10.0),
    (PIPELINE_RENTAL, STATUS_FOLLOW_UP, 10.0),
    (PIPELINE_RENTAL, STATUS_QUOTE_SENT, 15.0),
    (PIPELINE_RENTAL, STATUS_CONFIRMED, 20.0),
    (PIPELINE_RENTAL, STATUS_CAR_DELIVERED, 10.0),
    (PIPELINE_RENTAL, STATUS_WON, 15.0),
    (PIPELINE_CORPORATE, STATUS_CORPORATE_NEW, 4.0),
    (PIPELINE_CORPORATE, STATUS_WON, 0.5),
    (PIPELINE_CORPORATE, STATUS_LOST, 0.5),
)
_STATUS_CODES = tuple(range(len(_STATUS_TABLE)))
_STATUS_CUM = tuple(sum(row[2] for row in _STATUS_TABLE[: k + 1]) for k in range(len(_STATUS_TABLE)))
# the one pipeline of every status that is not a system status (142/143 keep the lead's pipeline)
_STATUS_PIPELINE = {status: pipeline for pipeline, status, _ in _STATUS_TABLE if status not in (142, 143)}

# contact link kinds of a lead
_NEW, _REPEAT, _NONE, _DELETED = 0, 1, 2, 3
_KIND_CODES = (_NEW, _REPEAT, _NONE, _DELETED)
_KIND_CUM = (68.0, 96.0, 99.0, 100.0)

_BLOCK = 1024
_BLOCK_CACHE = 1024  # blocks kept (about 7 KB each)
_DAY = 86_400

_LEAD_KEYS = (
    "id", "name", "price", "responsible_user_id", "group_id", "status_id", "pipeline_id",
    "loss_reason_id", "created_by", "updated_by", "created_at", "updated_at", "closed_at",
    "closest_task_at", "is_deleted", "custom_fields_values", "score", "account_id", "labor_cost",
)
_UPDATABLE = frozenset(_LEAD_KEYS) - {"id", "created_at", "account_id"}

_FIRST_NAMES = (
    ("Jürgen", "juergen"), ("Zoë", "zoe"), ("Sören", "soeren"), ("Anna", "anna"), ("Lukas", "lukas"),
    ("Sophie", "sophie"), ("Maximilian", "max"), ("José", "jose"), ("María", "maria"), ("Iñigo", "inigo"),
    ("Lucía", "lucia"), ("Sergio", "sergio"), ("Сергей", "sergey"), ("Наталья", "natalya"),
    ("Дмитрий", "dmitry"), ("Ольга", "olga"), ("John", "john"), ("Emily", "emily"), ("Chloé", "chloe"),
    ("François", "francois"), ("Giulia", "giulia"), ("Mehmet", "mehmet"), ("Ayşe", "ayse"),
    ("Łukasz", "lukasz"), ("Laura", "laura"), ("Jonas", "jonas"), ("Carmen", "carmen"), ("Ali", "ali"),
)
_LAST_NAMES = (
    ("Müller", "mueller"), ("Schröder", "schroeder"), ("Weiß", "weiss"), ("Fischer", "fischer"),
    ("Becker", "becker"), ("Núñez", "nunez"), ("García", "garcia"), ("Muñoz", "munoz"),
    ("Иванов", "ivanov"), ("Смирнова", "smirnova"), ("Кузнецов", "kuznetsov"), ("Smith", "smith"),
    ("O'Brien", "obrien"), ("Dubois", "dubois"), ("Rossi", "rossi"), ("Yılmaz", "yilmaz"),
    ("Kowalski", "kowalski"), ("Schmidt", "schmidt"), ("Hoffmann", "hoffmann"), ("López", "lopez"),
)
_EMAIL_DOMAINS = ("gmail.com", "web.de", "gmx.de", "yandex.ru", "outlook.com", "hotmail.es", "icloud.com")
_PHONE_PREFIXES = ("+49 151 ", "+49 160 ", "+49 176 ", "+7 916 ", "+34 612 ", "+44 7700 ", "0151 ", "+4917")
_VEHICLE_MODELS = (
    "Toyota Corolla", "VW Golf", "Renault Clio", "Fiat 500", "BMW 320d", "Mercedes-Benz A 180",
    "Škoda Octavia", "Peugeot 208", "Opel Corsa", "Ford Focus", "Seat Ibiza", "Hyundai i20", "Kia Ceed",
    "Dacia Duster", "Citroën C3", "Audi A3", "Tesla Model 3", "Nissan Qashqai", "Mazda 2", "Volvo XC40",
    "VW Polo", "Toyota Yaris", "Cupra Born", "Mini Cooper", "Jeep Renegade",
)
_TAGS = ((70001, "instagram"), (70002, "vip"), (70003, "repeat customer"), (70004, "airport"),
         (70005, "long term"), (70006, "Доставка"))
_LEAD_TITLES = ("Anfrage über Website", "Заявка с сайта", "Reserva coche", "Booking request")
_LOSS_CHOICES = (None, 4001, 4002, 4003, 4004)
_COLLECT_SHIFT = (0, 0, 1800, 3600, -3600)
_SOURCE_CUM = (30.0, 55.0, 70.0, 85.0, 90.0, 100.0)  # Instagram, Website, Referral, Google Ads, Walk-in, WhatsApp
_COMPANIES = (
    (40000001, "Müller Logistik GmbH"), (40000002, "Acme Events S.L."), (40000003, "ООО Вектор"),
    (40000004, "Blue Harbour Ltd"),
)


@dataclass(frozen=True)
class SimulatorConfig:
    """Everything that defines one simulated account and its server."""

    leads: int = 2000
    seed: int = 1
    token: str = "simulator-token"
    rate_limit_rps: float | None = 7.0  # 0 or None disables the limiter
    latency_ms: float = 0.0
    ban_after_violations: int | None = None  # after that many 429s every request gets 403
    year: int = 2025
    # The account's "today" (Unix seconds): when set, the history is cut there (no lead created later), the
    # leads the window would have held after it moving into the window before it. `make run` / `make dev`
    # set the current year and now, so the calendar has bookings around today as a live account does.
    until: int | None = None
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.leads <= MAX_LEADS:
            raise ValueError(f"leads must be between 0 and {MAX_LEADS}, got {self.leads}")
        if not 1971 <= self.year <= 2100:
            raise ValueError(f"year out of range: {self.year}")


@dataclass(frozen=True)
class LeadQuery:
    """A normalized leads-list query (everything but paging). ``None`` means "no such filter"."""

    created_from: int | None = None
    created_to: int | None = None
    updated_from: int | None = None
    updated_to: int | None = None
    ids: tuple[int, ...] | None = None
    statuses: tuple[tuple[int, int], ...] | None = None  # (pipeline_id, status_id) pairs
    pipelines: tuple[int, ...] | None = None
    order_field: str = "id"  # id | created_at | updated_at
    order_desc: bool = False
    only_deleted: bool = False  # with=only_deleted: the trash instead of the current leads

    def is_plain_range(self) -> bool:
        return (
            not self.only_deleted
            and self.ids is None
            and self.statuses is None
            and self.pipelines is None
            and self.updated_from is None
            and self.updated_to is None
            and self.order_field in ("id", "created_at")
        )


@dataclass(frozen=True)
class _State:
    version: int = 0  # bumps on every lead mutation
    deleted: frozenset[int] = frozenset()
    stored: Mapping[int, dict] = field(default_factory=dict)  # id -> full core record (updated or added)
    added: tuple[int, ...] = ()  # ids of added leads, ascending
    deleted_contacts: frozenset[int] = frozenset()
    next_id: int = 0
    raw_contacts: Mapping[int, object] = field(default_factory=dict)  # id -> payload served verbatim
    deleted_at: Mapping[int, int] = field(default_factory=dict)  # the trash: restorable id -> deleted at
    contacts: Mapping[int, dict] = field(default_factory=dict)  # id -> contact in API shape (edited or added)
    contact_version: int = 0  # bumps on every contact mutation
    next_contact_id: int = 0


class _Block:
    __slots__ = ("status", "upd", "kind", "rep", "second")

    def __init__(self, status: bytes, upd: array, kind: bytes, rep: bytes, second: bytes) -> None:
        self.status = status
        self.upd = upd
        self.kind = kind
        self.rep = rep
        self.second = second


def _ts(year: int, month: int, day: int) -> int:
    return int(datetime(year, month, day, tzinfo=UTC).timestamp())


def _key_range(keys: array, lo: int | None, hi: int | None, desc: bool) -> array:
    """The ids of the ascending ``(timestamp << 32) | id`` keys whose timestamp is in [lo, hi]."""
    start = 0 if lo is None else bisect.bisect_left(keys, lo << 32)
    end = len(keys) if hi is None else bisect.bisect_left(keys, (hi + 1) << 32)
    out = array("q", (k & 0xFFFFFFFF for k in keys[start:end]))
    if desc:
        out.reverse()
    return out


class Dataset:
    """The simulated Kommo account. Safe to read and mutate from many threads."""

    def __init__(self, config: SimulatorConfig | None = None, **overrides) -> None:
        if config is None:
            config = SimulatorConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a SimulatorConfig or keyword overrides, not both")
        self.config = config
        self.seed = config.seed
        self.size = config.leads
        self.token: str | None = config.token
        self.base_url = "https://simulator.kommo.com"
        y = config.year
        self.window_start = _ts(y, 1, 1)
        self.window_end = _ts(y + 1, 1, 1)  # exclusive
        self.spread_start = _ts(y - 1, 11, 1)
        self.spread_end = _ts(y + 1, 3, 1)  # exclusive: the last lead is created on Feb 28
        if config.until is not None:
            self.spread_end = max(self.window_start + 1, min(self.spread_end, config.until))
            self.window_end = min(self.window_end, self.spread_end)
        self.now = self.spread_end  # the account's "today": nothing is updated later than this
        n_pre = round(self.size * 0.10)
        n_post = round(self.size * 0.10) if self.spread_end > self.window_end else 0
        n_win = self.size - n_pre - n_post
        self._segments: list[tuple[int, int, int, int, float]] = []  # (first index, count, start, end, step)
        first = 0
        for count, start, end in (
            (n_pre, self.spread_start, self.window_start),
            (n_win, self.window_start, self.window_end),
            (n_post, self.window_end, self.spread_end),
        ):
            if count:
                self._segments.append((first, count, start, end, (end - start) / count))
            first += count
        self._segment_firsts = [s[0] for s in self._segments]
        self._blocks: OrderedDict[int, _Block] = OrderedDict()
        self._blocks_lock = threading.Lock()
        self._lock = threading.RLock()  # serializes mutations
        self._cache_lock = threading.RLock()  # serializes materializations (identical queries share one)
        self._cache: OrderedDict[tuple, array] = OrderedDict()
        self._contact_base_keys: dict[int, array] = {}
        self._lead_base_keys: array | None = None
        self._state = _State(next_id=LEAD_ID_BASE + self.size, next_contact_id=CONTACT_ID_BASE + self.size)
        self.clock = Clock(floor=self.now)
        self.events = EventLog(ACCOUNT_ID)
        self._fields = self._build_fields()
        # Select options renamed since generation: (field id, enum id) -> label, applied as leads render.
        self._option_labels: dict[tuple[int, int], str] = {}
        self._late = threading.local()  # late_stamps(): how far this thread's mutations stamp behind the clock
        # integer seeds are cheaper than strings; the offset keeps lead streams apart across seeds
        self._lead_seed = (self.seed + 1) * 10_000_019 * 7

    # --- cheap per-lead attributes -------------------------------------------------------------------

    def created_at_of(self, i: int) -> int:
        """created_at of base lead ``i``: strictly increasing in ``i``; segment edges hit exactly."""
        seg = self._segments[bisect.bisect_right(self._segment_firsts, i) - 1]
        first, count, start, end, step = seg
        k = i - first
        if k == 0:
            return start
        if k == count - 1:
            return end - 1
        whole = int(step)
        jitter = 0
        if whole >= 2:
            h = (i * 2654435761 + self.seed * 40503 + 0x9E3779B9) & 0xFFFFFFFF
            h ^= h >> 15
            h = (h * 2246822519) & 0xFFFFFFFF
            h ^= h >> 13
            jitter = h % whole
        return start + int(k * step) + jitter

    def _block(self, b: int) -> _Block:
        blocks = self._blocks
        with self._blocks_lock:
            blk = blocks.get(b)
            if blk is not None:
                blocks.move_to_end(b)
                return blk
        n = min(_BLOCK, self.size - b * _BLOCK)
        rng = random.Random(f"kommo-sim/block/{self.seed}/{b}")
        rnd = rng.random
        status = bytes(rng.choices(_STATUS_CODES, cum_weights=_STATUS_CUM, k=n))
        upd = array("i")
        for _ in range(n):
            r = rnd()
            upd.append(0 if r < 0.2 else min(int(-math.log(1.0 - (r - 0.2) / 0.8) * 12 * _DAY), 200 * _DAY))
        kind = bytes(rng.choices(_KIND_CODES, cum_weights=_KIND_CUM, k=n))
        rep = bytes(1 + int(rnd() * 40) for _ in range(n))
        second = bytearray(n)
        for k in range(n):
            if rnd() < 0.10:
                second[k] = 1 + int(rnd() * 200)
        blk = _Block(status, upd, kind, rep, bytes(second))
        with self._blocks_lock:
            blocks[b] = blk
            while len(blocks) > _BLOCK_CACHE:
                blocks.popitem(last=False)
        return blk

    def _base_updated(self, created: int, delta: int) -> int:
        return min(created + delta, max(created, self.now - 1))

    def _kind(self, i: int) -> int:
        return self._block(i // _BLOCK).kind[i % _BLOCK]

    def _main_contact_index(self, i: int) -> int | None:
        """Index ``j`` of lead ``i``'s main contact (id ``CONTACT_ID_BASE + j``), or None."""
        blk = self._block(i // _BLOCK)
        kind = blk.kind[i % _BLOCK]
        if kind == _NONE:
            return None
        if kind != _REPEAT:  # _NEW, or _DELETED (a contact that no longer exists)
            return i
        t = i
        last_repeat = i
        while True:
            blk = self._block(t // _BLOCK)
            kt = blk.kind[t % _BLOCK]
            if kt == _NEW:
                return t
            if kt == _REPEAT:
                nt = t - blk.rep[t % _BLOCK]
                if nt < 0:
                    return t
                last_repeat = t
                t = nt
                continue
            return last_repeat  # the chain ends at a lead without a usable contact: own contact

    def _contact_index_exists(self, j: int) -> bool:
        if not 0 <= j < self.size:
            return False
        kind = self._kind(j)
        if kind in (_NONE, _DELETED):
            return False
        return kind == _NEW or self._main_contact_index(j) == j

    def _base_contacts(self, i: int) -> list[tuple[int, bool]]:
        main = self._main_contact_index(i)
        if main is None:
            return []
        out = [(CONTACT_ID_BASE + main, True)]
        offset = self._block(i // _BLOCK).second[i % _BLOCK]
        if offset and i - offset >= 0:
            other = self._main_contact_index(i - offset)
            if other is not None and other != main and self._kind(other) != _DELETED:
                out.append((CONTACT_ID_BASE + other, False))
        return out

    # --- field definitions ---------------------------------------------------------------------------

    def _build_fields(self) -> dict[int, dict]:
        rng = random.Random(f"kommo-sim/fields/{self.seed}")
        labels: list[str] = []
        plates: set[str] = set()
        letters = "ABCDEFGHJKLMNPRSTUVWXYZ"
        while len(labels) < VEHICLE_OPTIONS + DELETED_VEHICLE_OPTIONS:
            plate = (
                rng.choice(letters) + rng.choice(letters) + f"{rng.randrange(100, 1000)}"
                + rng.choice(letters) + rng.choice(letters)
            )
            if plate in plates:
                continue
            plates.add(plate)
            labels.append(f"{rng.choice(_VEHICLE_MODELS)} {rng.randrange(2019, 2026)} · {plate}")
        self._vehicle_labels = {VEHICLE_ENUM_BASE + k: label for k, label in enumerate(labels)}

        def enums(base: int, values: Iterable[str]) -> list[dict]:
            return [{"id": base + k, "value": v, "sort": 500 + 10 * k} for k, v in enumerate(values)]

        def definition(fid: int, name: str, ftype: str, sort: int, enum_list: list[dict] | None) -> dict:
            return {
                "id": fid,
                "name": name,
                "type": ftype,
                "account_id": ACCOUNT_ID,
                "code": None,
                "sort": sort,
                "is_api_only": False,
                "enums": enum_list,
                "group_id": None,
                "required_statuses": [],
                "is_deletable": True,
                "is_predefined": False,
                "entity_type": "leads",
                "tracking_callback": None,
                "remind": None,
                "triggers": [],
                "currency": None,
                "hidden_statuses": [],
                "chained_lists": None,
                "_links": {"self": {"href": f"/api/v4/leads/custom_fields/{fid}"}},
            }

        return {
            VEHICLE_FIELD_ID: definition(
                VEHICLE_FIELD_ID, "Vehicle", "select", 502,
                enums(VEHICLE_ENUM_BASE, labels[:VEHICLE_OPTIONS]),
            ),
            SOURCE_FIELD_ID: definition(
                SOURCE_FIELD_ID, "Source", "select", 503, enums(SOURCE_ENUM_BASE, SOURCE_LABELS)
            ),
            DELIVERY_FIELD_ID: definition(DELIVERY_FIELD_ID, "Date/Time Delivery", "date_time", 504, None),
            COLLECT_FIELD_ID: definition(COLLECT_FIELD_ID, "Date/Time Collect", "date_time", 505, None),
            DEPOSIT_FIELD_ID: definition(DEPOSIT_FIELD_ID, "Deposit", "numeric", 506, None),
            CHILD_SEAT_FIELD_ID: definition(CHILD_SEAT_FIELD_ID, "Child seat", "checkbox", 507, None),
        }

    def field(self, field_id: int) -> dict | None:
        """A lead custom-field definition (with ``enums`` for selects), or None for an unknown id."""
        f = self._fields.get(field_id)
        return copy.deepcopy(f) if f is not None else None

    def fields(self) -> list[dict]:
        return [copy.deepcopy(f) for f in self._fields.values()]

    def rename_option(self, field_id: int, enum_id: int, label: str) -> dict:
        """Renames an option of a select field (the vehicle 1234163, the source 823206, ...), as an admin
        does in Kommo's settings: the field's definition lists the new label, and every lead holding the
        option shows it from now on, while no lead's ``updated_at`` moves and no event is recorded (a
        change-tracking client sees it only in the field's definition). Returns the field's definition."""
        field_id, enum_id, label = int(field_id), int(enum_id), str(label)
        with self._lock:
            current = self._fields.get(field_id)
            if current is None or current["type"] not in ("select", "multiselect"):
                raise ValueError(f"field {field_id} is not a select field of the account")
            if not any(e["id"] == enum_id for e in current["enums"] or ()):
                raise KeyError(f"field {field_id} has no option {enum_id}")
            renamed = copy.deepcopy(current)
            renamed["enums"] = [{**e, "value": label} if e["id"] == enum_id else e for e in renamed["enums"]]
            fields = dict(self._fields)
            fields[field_id] = renamed
            self._fields = fields  # replaced, not changed in place: a reader holds the one it took
            if field_id == VEHICLE_FIELD_ID:
                self._vehicle_labels[enum_id] = label
            labels = dict(self._option_labels)
            labels[(field_id, enum_id)] = label
            self._option_labels = labels
            return copy.deepcopy(renamed)

    def _relabel(self, items: list[dict] | None) -> list[dict] | None:
        """A lead's custom field values with the current labels of renamed options."""
        labels = self._option_labels
        if not labels or not items:
            return items
        out = []
        for item in items:
            if item.get("field_type") in ("select", "multiselect") and any(
                    (item["field_id"], v.get("enum_id")) in labels for v in item["values"]):
                item = {**item, "values": [
                    {**v, "value": labels.get((item["field_id"], v.get("enum_id")), v.get("value"))}
                    for v in item["values"]]}
            out.append(item)
        return out

    def pipelines(self) -> list[dict]:
        def status(pipeline_id: int, sid: int, name: str, sort: int, color: str, stype: int = 0) -> dict:
            return {
                "id": sid,
                "name": name,
                "sort": sort,
                "is_editable": stype == 0 and sid not in (142, 143),
                "pipeline_id": pipeline_id,
                "color": color,
                "type": stype,
                "account_id": ACCOUNT_ID,
                "_links": {"self": {"href": f"{self.base_url}/api/v4/leads/pipelines/{pipeline_id}/statuses/{sid}"}},
            }

        def pipeline(pid: int, name: str, sort: int, is_main: bool, statuses: list[dict]) -> dict:
            return {
                "id": pid,
                "name": name,
                "sort": sort,
                "is_main": is_main,
                "is_unsorted_on": True,
                "is_archive": False,
                "account_id": ACCOUNT_ID,
                "_links": {"self": {"href": f"{self.base_url}/api/v4/leads/pipelines/{pid}"}},
                "_embedded": {"statuses": statuses},
            }

        r, c = PIPELINE_RENTAL, PIPELINE_CORPORATE
        return [
            pipeline(r, "Car rental", 1, True, [
                status(r, STATUS_BOT_ANSWERING, "Request bot answering", 10, "#c1c1c1", 1),
                status(r, STATUS_FOLLOW_UP, "Follow up", 20, "#99ccff"),
                status(r, STATUS_QUOTE_SENT, "Quote sent", 30, "#ffff99"),
                status(r, STATUS_CONFIRMED, "Confirmed", 40, "#ffcc66"),
                status(r, STATUS_CAR_DELIVERED, "Car delivered", 50, "#deff81"),
                status(r, STATUS_WON, "Closed - won", 10000, "#CCFF66"),
                status(r, STATUS_LOST, "Closed - lost", 11000, "#D5D8DB"),
            ]),
            pipeline(c, "Corporate", 2, False, [
                status(c, STATUS_CORPORATE_NEW, "New corporate request", 10, "#c1c1c1", 1),
                status(c, STATUS_WON, "Closed - won", 10000, "#CCFF66"),
                status(c, STATUS_LOST, "Closed - lost", 11000, "#D5D8DB"),
            ]),
        ]

    def _select_value(self, field_id: int, enum_id: int) -> dict:
        label = None
        if field_id == VEHICLE_FIELD_ID:
            label = self._vehicle_labels.get(enum_id)
        else:
            for e in self._fields[field_id]["enums"] or ():
                if e["id"] == enum_id:
                    label = e["value"]
        return {"value": label if label is not None else f"Option {enum_id}", "enum_id": enum_id, "enum_code": None}

    def _cf_item(self, field_id: int, value) -> dict:
        f = self._fields[field_id]
        ftype = f["type"]
        if ftype == "select":
            values = [self._select_value(field_id, int(value))]
        elif ftype == "date_time":
            values = [{"value": int(value)}]
        elif ftype == "numeric":
            values = [{"value": str(value)}]
        elif ftype == "checkbox":
            values = [{"value": bool(value)}]
        else:
            values = [{"value": str(value)}]
        return {"field_id": field_id, "field_name": f["name"], "field_code": None, "field_type": ftype,
                "values": values}

    # --- record generation ---------------------------------------------------------------------------

    def _gen_custom_fields(self, rnd, created: int) -> list[dict] | None:
        if rnd() < 0.03:
            return None
        items = []
        if rnd() < 0.95:
            if rnd() < 0.02:
                enum_id = VEHICLE_ENUM_BASE + VEHICLE_OPTIONS + int(rnd() * DELETED_VEHICLE_OPTIONS)
            else:
                enum_id = VEHICLE_ENUM_BASE + int(rnd() * VEHICLE_OPTIONS)
            items.append({"field_id": VEHICLE_FIELD_ID, "field_name": "Vehicle", "field_code": None,
                          "field_type": "select", "values": [
                              {"value": self._vehicle_labels[enum_id], "enum_id": enum_id, "enum_code": None}]})
        if rnd() < 0.90:
            src = bisect.bisect(_SOURCE_CUM, rnd() * 100.0)
            items.append({"field_id": SOURCE_FIELD_ID, "field_name": "Source", "field_code": None,
                          "field_type": "select", "values": [
                              {"value": SOURCE_LABELS[src], "enum_id": SOURCE_ENUM_BASE + src, "enum_code": None}]})
        r = rnd()
        delivery = created + (2 * 3600 + int(rnd() * 58 * _DAY)) // 1800 * 1800
        collect = delivery + (1 + int(rnd() * 14)) * _DAY + _COLLECT_SHIFT[int(rnd() * 5)]
        if r < 0.87:
            items.append({"field_id": DELIVERY_FIELD_ID, "field_name": "Date/Time Delivery", "field_code": None,
                          "field_type": "date_time", "values": [{"value": delivery}]})
        if r < 0.80 or 0.87 <= r < 0.92:
            items.append({"field_id": COLLECT_FIELD_ID, "field_name": "Date/Time Collect", "field_code": None,
                          "field_type": "date_time", "values": [{"value": collect}]})
        if rnd() < 0.40:
            items.append({"field_id": DEPOSIT_FIELD_ID, "field_name": "Deposit", "field_code": None,
                          "field_type": "numeric", "values": [{"value": str(100 + 50 * int(rnd() * 19))}]})
        if rnd() < 0.10:
            items.append({"field_id": CHILD_SEAT_FIELD_ID, "field_name": "Child seat", "field_code": None,
                          "field_type": "checkbox", "values": [{"value": True}]})
        return items or None

    def _gen_core(self, rng: random.Random, lead_id: int, created: int, updated: int, pipeline_id: int,
                  status_id: int, contacts: list[tuple[int, bool]]) -> dict:
        rnd = rng.random
        users = RESPONSIBLE_USER_IDS
        responsible = users[int(rnd() * 6)]
        style = rnd()
        if pipeline_id == PIPELINE_CORPORATE:
            name = f"Corporate: {_COMPANIES[int(rnd() * len(_COMPANIES))][1]}"
        elif style < 0.35:
            name = f"Lead #{lead_id}"
        elif style < 0.65:
            first = _FIRST_NAMES[int(rnd() * len(_FIRST_NAMES))][0]
            name = f"{first} – {_VEHICLE_MODELS[int(rnd() * len(_VEHICLE_MODELS))]}"
        elif style < 0.80:
            name = _LEAD_TITLES[int(rnd() * len(_LEAD_TITLES))]
        else:
            name = f"Rental {_VEHICLE_MODELS[int(rnd() * len(_VEHICLE_MODELS))]}"
        if status_id == STATUS_BOT_ANSWERING and rnd() < 0.6:
            price = 0
        else:
            price = 60 + 5 * int(rnd() * 948)
        closed = status_id == STATUS_WON or status_id == STATUS_LOST
        closed_at = None
        if closed:
            closed_at = created + int((updated - created) * rnd())
            if closed_at == created and updated > created:
                closed_at = updated
        loss = _LOSS_CHOICES[int(rnd() * 5)] if status_id == STATUS_LOST else None
        task = None if closed or rnd() < 0.6 else updated + 3600 + int(rnd() * 10 * _DAY)
        created_by = 0 if rnd() < 0.5 else users[int(rnd() * 6)]
        updated_by = created_by if updated == created else ((0,) + users)[int(rnd() * 7)]
        cfv = self._gen_custom_fields(rnd, created)
        tags = []
        if rnd() < 0.15:
            first_tag = int(rnd() * len(_TAGS))
            picks = [first_tag]
            if rnd() < 0.33:
                picks.append((first_tag + 1 + int(rnd() * (len(_TAGS) - 1))) % len(_TAGS))
            tags = [{"id": _TAGS[t][0], "name": _TAGS[t][1], "color": None} for t in picks]
        companies = []
        if pipeline_id == PIPELINE_CORPORATE and rnd() < 0.7:
            companies.append(_COMPANIES[int(rnd() * len(_COMPANIES))][0])
        catalog = []
        if rnd() < 0.03:
            catalog.append({"id": 900_001 + int(rnd() * 400),
                            "metadata": {"quantity": 1 if rnd() < 0.7 else 2, "catalog_id": 6601, "price_id": None}})
        return {
            "id": lead_id,
            "name": name,
            "price": price,
            "responsible_user_id": responsible,
            "group_id": 0,
            "status_id": status_id,
            "pipeline_id": pipeline_id,
            "loss_reason_id": loss,
            "created_by": created_by,
            "updated_by": updated_by,
            "created_at": created,
            "updated_at": updated,
            "closed_at": closed_at,
            "closest_task_at": task,
            "is_deleted": False,
            "custom_fields_values": cfv,
            "score": None,
            "account_id": ACCOUNT_ID,
            "labor_cost": None,
            "_contacts": contacts,
            "_tags": tags,
            "_companies": companies,
            "_catalog": catalog,
        }

    def _base_core(self, i: int) -> dict:
        blk = self._block(i // _BLOCK)
        k = i % _BLOCK
        pipeline_id, status_id, _ = _STATUS_TABLE[blk.status[k]]
        created = self.created_at_of(i)
        updated = self._base_updated(created, blk.upd[k])
        rng = random.Random(self._lead_seed + i)
        return self._gen_core(rng, LEAD_ID_BASE + i, created, updated, pipeline_id, status_id,
                              self._base_contacts(i))

    def _core(self, lead_id: int, st: _State) -> dict | None:
        if lead_id in st.deleted:
            return None
        stored = st.stored.get(lead_id)
        if stored is not None:
            return copy.deepcopy(stored)
        i = lead_id - LEAD_ID_BASE
        if 0 <= i < self.size:
            return self._base_core(i)
        return None

    def _render(self, core: dict, with_: Iterable[str] = ("contacts",)) -> dict:
        if "_raw" in core:  # an entry put with put_raw_lead: served exactly as given
            return core["_raw"]
        with_ = set(with_)
        lead = {k: core[k] for k in _LEAD_KEYS}
        lead["custom_fields_values"] = self._relabel(lead["custom_fields_values"])
        base = self.base_url
        lead_id = core["id"]
        if "source_id" in with_:
            lead["source_id"] = None
        if "is_price_modified_by_robot" in with_:
            lead["is_price_modified_by_robot"] = False
        lead["_links"] = {"self": {"href": f"{base}/api/v4/leads/{lead_id}"}}
        embedded: dict = {
            "tags": core["_tags"],
            "companies": [{"id": cid, "_links": {"self": {"href": f"{base}/api/v4/companies/{cid}"}}}
                          for cid in core["_companies"]],
        }
        if "contacts" in with_:
            embedded["contacts"] = [
                {"id": cid, "is_main": is_main, "_links": {"self": {"href": f"{base}/api/v4/contacts/{cid}"}}}
                for cid, is_main in core["_contacts"]
            ]
        if "catalog_elements" in with_:
            embedded["catalog_elements"] = core["_catalog"]
        if "loss_reason" in with_:
            rid = core["loss_reason_id"]
            embedded["loss_reason"] = [] if rid is None else [{
                "id": rid, "name": LOSS_REASONS.get(rid, f"Reason {rid}"), "sort": rid - 4000,
                "created_at": self.spread_start, "updated_at": self.spread_start,
                "_links": {"self": {"href": f"{base}/api/v4/leads/loss_reasons/{rid}"}},
            }]
        lead["_embedded"] = embedded
        return lead

    # --- ground truth --------------------------------------------------------------------------------

    def lead(self, lead_id: int, with_: Iterable[str] = ("contacts",)) -> dict | None:
        """One current lead in API shape (contacts embedded by default), or None if absent/deleted."""
        core = self._core(int(lead_id), self._state)
        return None if core is None else self._render(core, with_)

    def leads(self, lead_ids: Iterable[int], with_: Iterable[str] = ("contacts",)) -> list[dict]:
        st = self._state
        out = []
        for lead_id in lead_ids:
            core = self._core(int(lead_id), st)
            if core is not None:
                out.append(self._render(core, with_))
        return out

    def iter_leads(self, with_: Iterable[str] = ("contacts",), *,
                   window: tuple[int, int] | None = None) -> Iterator[dict]:
        """Every current lead in API shape, ascending by id, with every mutation applied: what a full
        refresh sees. ``window=(start, end)`` keeps those created in [start, end). Lazy: safe for a
        million leads."""
        with_ = tuple(with_)
        st = self._state
        lo, hi = 0, self.size
        if window is not None:
            lo, hi = self._base_range(window[0], window[1] - 1)
        for i in range(lo, hi):
            core = self._core(LEAD_ID_BASE + i, st)
            if core is not None:
                yield self._render(core, with_)
        for lead_id in st.added:
            core = self._core(lead_id, st)
            if core is not None and (window is None or window[0] <= core["created_at"] < window[1]):
                yield self._render(core, with_)

    def lead_ids(self) -> Iterator[int]:
        st = self._state
        for i in range(self.size):
            if LEAD_ID_BASE + i not in st.deleted:
                yield LEAD_ID_BASE + i
        for lead_id in st.added:
            if lead_id not in st.deleted:
                yield lead_id

    def contact_exists(self, contact_id: int) -> bool:
        return self._contact_exists(contact_id, self._state)

    def _contact_exists(self, contact_id: int, st: _State) -> bool:
        if contact_id in st.deleted_contacts:
            return False
        if contact_id in st.raw_contacts or contact_id in st.contacts:
            return True
        return self._contact_index_exists(contact_id - CONTACT_ID_BASE)

    def _contact_start(self, j: int) -> tuple:
        """The first draws of generated contact ``j``: (rng, first, first_ascii, last, last_ascii, created,
        updated). The listing by date replays only these; ``contact`` goes on with the same rng."""
        rng = random.Random(f"kommo-sim/contact/{self.seed}/{j}")
        first, first_ascii = rng.choice(_FIRST_NAMES)
        last, last_ascii = rng.choice(_LAST_NAMES)
        shape = rng.random()
        if shape < 0.08:
            last = last_ascii = ""
        created = max(0, self.created_at_of(j) - rng.randrange(60, 7200))
        updated = min(created + (0 if rng.random() < 0.4 else rng.randrange(60, 90 * _DAY)),
                      max(created, self.now - 1))
        return rng, first, first_ascii, last, last_ascii, created, updated

    def _contact_times(self, contact_id: int, st: _State) -> tuple[int, int]:
        """(created_at, updated_at) of an existing contact, for filtering and sorting lists."""
        stored = st.contacts.get(contact_id)
        if stored is not None:
            return stored["created_at"], stored["updated_at"]
        if contact_id in st.raw_contacts:
            raw = st.raw_contacts[contact_id]
            times = [raw.get(k) if isinstance(raw, dict) else None for k in ("created_at", "updated_at")]
            return tuple(t if isinstance(t, int) and not isinstance(t, bool) else 0 for t in times)
        start = self._contact_start(contact_id - CONTACT_ID_BASE)
        return start[5], start[6]

    def contact(self, contact_id: int) -> dict | None:
        """A contact in API shape, or None if it never existed or was deleted."""
        contact_id = int(contact_id)
        st = self._state
        if not self._contact_exists(contact_id, st):
            return None
        raw = st.raw_contacts.get(contact_id)
        if raw is not None:
            return copy.deepcopy(raw)
        stored = st.contacts.get(contact_id)
        if stored is not None:
            return copy.deepcopy(stored)
        j = contact_id - CONTACT_ID_BASE
        rng, first, first_ascii, last, last_ascii, created, updated = self._contact_start(j)
        name = f"{first} {last}".strip()
        cfv = []
        r = rng.random()
        if r < 0.88:
            phones = [self._phone(rng)]
            if rng.random() < 0.15:
                phones.append(self._phone(rng))
            values = []
            for k, number in enumerate(phones):
                code = "MOB" if k == 0 and rng.random() < 0.7 else rng.choice(("WORK", "OTHER"))
                values.append({"value": number, "enum_id": PHONE_ENUMS[code], "enum_code": code})
            cfv.append({"field_id": CONTACT_PHONE_FIELD_ID, "field_name": "Phone", "field_code": "PHONE",
                        "field_type": "multitext", "values": values})
        if rng.random() < 0.70:
            local = f"{first_ascii}.{last_ascii}" if last_ascii else f"{first_ascii}{rng.randrange(10, 99)}"
            code = "WORK" if rng.random() < 0.3 else "OTHER"
            cfv.append({"field_id": CONTACT_EMAIL_FIELD_ID, "field_name": "Email", "field_code": "EMAIL",
                        "field_type": "multitext",
                        "values": [{"value": f"{local}@{rng.choice(_EMAIL_DOMAINS)}",
                                    "enum_id": EMAIL_ENUMS[code], "enum_code": code}]})
        created_by = rng.choice((0,) + RESPONSIBLE_USER_IDS)
        return {
            "id": contact_id,
            "name": name,
            "first_name": first,
            "last_name": last,
            "responsible_user_id": rng.choice(RESPONSIBLE_USER_IDS),
            "group_id": 0,
            "created_by": created_by,
            "updated_by": created_by if updated == created else rng.choice(RESPONSIBLE_USER_IDS),
            "created_at": created,
            "updated_at": updated,
            "closest_task_at": None,
            "is_deleted": False,
            "is_unsorted": False,
            "custom_fields_values": cfv or None,
            "account_id": ACCOUNT_ID,
            "_links": {"self": {"href": f"{self.base_url}/api/v4/contacts/{contact_id}"}},
            "_embedded": {"tags": [], "companies": []},
        }

    @staticmethod
    def _phone(rng: random.Random) -> str:
        prefix = rng.choice(_PHONE_PREFIXES)
        return prefix + "".join(str(rng.randrange(10)) for _ in range(7))

    # --- queries -------------------------------------------------------------------------------------

    def _base_range(self, created_from: int | None, created_to: int | None) -> tuple[int, int]:
        lo, hi = 0, self.size
        if created_from is not None:
            lo = bisect.bisect_left(range(self.size), created_from, key=self.created_at_of)
        if created_to is not None:
            hi = bisect.bisect_right(range(self.size), created_to, key=self.created_at_of)
        return lo, max(lo, hi)

    def find_lead_ids(self, query: LeadQuery, offset: int, limit: int) -> list[int]:
        """Ids of one page of a leads-list query, in the query's order."""
        st = self._state
        if st.version == 0 and query.is_plain_range():
            lo, hi = self._base_range(query.created_from, query.created_to)
            if offset >= hi - lo:
                return []
            if not query.order_desc:
                return list(range(LEAD_ID_BASE + lo + offset, LEAD_ID_BASE + min(hi, lo + offset + limit)))
            top = hi - 1 - offset
            return list(range(LEAD_ID_BASE + top, LEAD_ID_BASE + max(lo, top - limit + 1) - 1, -1))
        ids = self._materialize(query, st)
        return list(ids[offset:offset + limit])

    def count_leads(self, query: LeadQuery = LeadQuery()) -> int:
        """How many current leads match (ground truth for tests; the API never reports totals)."""
        st = self._state
        if st.version == 0 and query.is_plain_range():
            lo, hi = self._base_range(query.created_from, query.created_to)
            return hi - lo
        return len(self._materialize(query, st))

    def _attrs(self, lead_id: int, st: _State, trash: bool = False) -> tuple[int, int, int, int] | None:
        """(created_at, updated_at, pipeline_id, status_id) of a current lead, or with ``trash`` of a
        restorable deleted one (its updated_at being when it was deleted)."""
        if trash:
            deleted_at = st.deleted_at.get(lead_id)
            if deleted_at is None:
                return None
            st = replace(st, deleted=frozenset())
            a = self._attrs(lead_id, st)
            return None if a is None else (a[0], deleted_at, a[2], a[3])
        if lead_id in st.deleted:
            return None
        stored = st.stored.get(lead_id)
        if stored is not None:
            return stored["created_at"], stored["updated_at"], stored["pipeline_id"], stored["status_id"]
        i = lead_id - LEAD_ID_BASE
        if not 0 <= i < self.size:
            return None
        blk = self._block(i // _BLOCK)
        k = i % _BLOCK
        pipeline_id, status_id, _ = _STATUS_TABLE[blk.status[k]]
        created = self.created_at_of(i)
        return created, self._base_updated(created, blk.upd[k]), pipeline_id, status_id

    def _cached(self, key: tuple, compute) -> array:
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            value = compute()
            self._cache[key] = value
            while len(self._cache) > 8:
                self._cache.popitem(last=False)
            return value

    def _materialize(self, q: LeadQuery, st: _State) -> array:
        if q.order_field == "updated_at" and (q.updated_from is not None or q.updated_to is not None):
            # a change-tracking client pages with a new updated_at cursor on every request: sort the
            # account by updated_at once per state and cut each cursor's range out of it
            base = replace(q, updated_from=None, updated_to=None, order_desc=False)
            if base == LeadQuery(order_field="updated_at"):
                keys = self._cached(("keys", st.version, base), lambda: self._updated_keys(st))
            else:
                keys = self._cached(("keys", st.version, base), lambda: self._compute(base, st, keys=True))
            return self._cached((st.version, q), lambda: _key_range(keys, q.updated_from, q.updated_to,
                                                                     q.order_desc))
        return self._cached((st.version, q), lambda: self._compute(q, st))

    def _updated_keys(self, st: _State) -> array:
        """Every current lead as ascending ``(updated_at << 32) | id`` keys. The generated leads' part is
        built once and kept; the leads changed since (stored, deleted) are merged into it."""
        with self._cache_lock:
            base = self._lead_base_keys
            if base is None:
                out = []
                for b in range((self.size + _BLOCK - 1) // _BLOCK):
                    upd = self._block(b).upd
                    for k in range(len(upd)):
                        i = b * _BLOCK + k
                        created = self.created_at_of(i)
                        out.append((self._base_updated(created, upd[k]) << 32) | (LEAD_ID_BASE + i))
                out.sort()
                base = self._lead_base_keys = array("q", out)
        changed = st.stored.keys() | st.deleted
        if not changed:
            return base
        kept = [k for k in base if k & 0xFFFFFFFF not in changed]
        extra = sorted((core["updated_at"] << 32) | lead_id for lead_id, core in st.stored.items()
                       if lead_id not in st.deleted)
        return array("q", heapq.merge(kept, extra))

    def _compute(self, q: LeadQuery, st: _State, keys: bool = False) -> array:
        statuses = set(q.statuses) if q.statuses is not None else None
        pipelines = set(q.pipelines) if q.pipelines is not None else None
        cf, ct = q.created_from, q.created_to
        uf, ut = q.updated_from, q.updated_to
        need_updated = uf is not None or ut is not None or q.order_field == "updated_at"
        stored = st.stored
        deleted = st.deleted

        def keep(created: int, updated: int, pipeline_id: int, status_id: int) -> bool:
            if cf is not None and created < cf:
                return False
            if ct is not None and created > ct:
                return False
            if uf is not None and updated < uf:
                return False
            if ut is not None and updated > ut:
                return False
            if statuses is not None and (pipeline_id, status_id) not in statuses:
                return False
            return pipelines is None or pipeline_id in pipelines

        # entries are sort keys: (timestamp << 32) | id when ordering by a timestamp, else the id
        by = q.order_field
        mask = 0xFFFFFFFF

        def entry(lead_id: int, created: int, updated: int) -> int:
            if by == "updated_at":
                return (updated << 32) | lead_id
            if by == "created_at":
                return (created << 32) | lead_id
            return lead_id

        out: list[int] = []
        if q.only_deleted:
            trash = sorted(st.deleted_at if q.ids is None else set(q.ids) & st.deleted_at.keys())
            for lead_id in trash:
                a = self._attrs(lead_id, st, trash=True)
                if a is not None and keep(*a):
                    out.append(entry(lead_id, a[0], a[1]))
        elif q.ids is not None:
            for lead_id in sorted(set(q.ids)):
                a = self._attrs(lead_id, st)
                if a is not None and keep(*a):
                    out.append(entry(lead_id, a[0], a[1]))
        else:
            # base leads: created_at is immutable and increasing, so the range bounds the scan
            lo, hi = self._base_range(cf, ct)
            b = lo // _BLOCK
            created_of = self.created_at_of
            now_cap = self.now - 1
            while b * _BLOCK < hi:
                blk = self._block(b)
                start = max(lo, b * _BLOCK)
                end = min(hi, (b + 1) * _BLOCK)
                bstatus, bupd = blk.status, blk.upd
                for i in range(start, end):
                    lead_id = LEAD_ID_BASE + i
                    if lead_id in deleted:
                        continue
                    s = stored.get(lead_id)
                    if s is not None:
                        if keep(s["created_at"], s["updated_at"], s["pipeline_id"], s["status_id"]):
                            out.append((s["updated_at"] << 32) | lead_id if by == "updated_at" else lead_id)
                        continue
                    k = i - b * _BLOCK
                    pipeline_id, status_id, _ = _STATUS_TABLE[bstatus[k]]
                    if statuses is not None and (pipeline_id, status_id) not in statuses:
                        continue
                    if pipelines is not None and pipeline_id not in pipelines:
                        continue
                    if need_updated:
                        created = created_of(i)
                        updated = created + bupd[k]
                        if updated > now_cap:
                            updated = max(created, now_cap)
                        if (uf is not None and updated < uf) or (ut is not None and updated > ut):
                            continue
                        out.append((updated << 32) | lead_id if by == "updated_at" else lead_id)
                    else:
                        out.append(lead_id)
                b += 1
            if by == "created_at" and st.added:
                out = [(created_of(x - LEAD_ID_BASE) << 32) | x for x in out]
            for lead_id in st.added:
                a = self._attrs(lead_id, st)
                if a is not None and keep(*a):
                    out.append(entry(lead_id, a[0], a[1]))
        if by != "id" and (by == "updated_at" or st.added or q.ids is not None or q.only_deleted):
            out.sort()
            if not keys:
                out = [x & mask for x in out]
        if q.order_desc:
            out.reverse()
        return array("q", out)

    def find_contact_ids(self, ids: Iterable[int] | None, offset: int, limit: int, *,
                         created_from: int | None = None, created_to: int | None = None,
                         updated_from: int | None = None, updated_to: int | None = None,
                         order_field: str = "id", order_desc: bool = False) -> list[int]:
        """One page of existing contacts: among ``ids``, or all contacts when None; date ranges are
        inclusive; ordered by ``order_field`` (id | created_at | updated_at, ties by id)."""
        st = self._state
        plain = (created_from is None and created_to is None and updated_from is None and updated_to is None
                 and order_field == "id" and not order_desc)
        if ids is not None and plain:
            found = [c for c in sorted(set(ids)) if self._contact_exists(c, st)]
            return found[offset:offset + limit]
        def every() -> array:
            return self._cached(("contacts", st.contact_version), lambda: self._all_contact_ids(st))

        if ids is None and plain:
            return list(every()[offset:offset + limit])
        if order_field not in ("created_at", "updated_at"):
            order_field = "id"
        query = (None if ids is None else frozenset(ids), created_from, created_to, updated_from, updated_to,
                 order_field, order_desc)

        def compute() -> array:
            if ids is None and order_field != "id":
                # sorted once per state; each updated_at cursor is then a range of it
                by = 1 if order_field == "updated_at" else 0
                keys = self._cached(("contact_keys", st.contact_version, by), lambda: self._contact_keys(st, by))
                lo, hi = (updated_from, updated_to) if by else (created_from, created_to)
                other = (created_from, created_to) if by else (updated_from, updated_to)
                if other == (None, None):
                    return _key_range(keys, lo, hi, order_desc)
                candidates = _key_range(keys, lo, hi, False)
            elif ids is None:
                candidates = every()
            else:
                candidates = [c for c in sorted(set(ids)) if self._contact_exists(c, st)]
            out = []
            for c in candidates:
                created, updated = self._contact_times(c, st)
                if ((created_from is not None and created < created_from)
                        or (created_to is not None and created > created_to)
                        or (updated_from is not None and updated < updated_from)
                        or (updated_to is not None and updated > updated_to)):
                    continue
                ts = updated if order_field == "updated_at" else created if order_field == "created_at" else 0
                out.append((ts << 32) | c)
            out.sort()
            result = array("q", (x & 0xFFFFFFFF for x in out))
            if order_desc:
                result.reverse()
            return result

        hit = self._cached(("contacts", st.contact_version, query), compute)
        return list(hit[offset:offset + limit])

    def _contact_keys(self, st: _State, by: int) -> array:
        """Every existing contact as ascending ``(created_at or updated_at << 32) | id`` keys (``by`` 0 or 1).
        The generated contacts' part is built once (seconds on a million leads) and kept; the contacts
        changed since are merged into it."""
        with self._cache_lock:
            base = self._contact_base_keys.get(by)
            if base is None:
                base = array("q", sorted(
                    (self._contact_start(j)[5 + by] << 32) | (CONTACT_ID_BASE + j)
                    for j in range(self.size) if self._contact_index_exists(j)))
                self._contact_base_keys[by] = base
        changed = set(st.contacts) | set(st.raw_contacts) | st.deleted_contacts
        if not changed:
            return base
        mask = 0xFFFFFFFF
        kept = [k for k in base if k & mask not in changed]
        extra = sorted((self._contact_times(c, st)[by] << 32) | c
                       for c in (set(st.contacts) | set(st.raw_contacts)) - st.deleted_contacts)
        return array("q", heapq.merge(kept, extra))

    def _all_contact_ids(self, st: _State) -> array:
        base = {CONTACT_ID_BASE + j for j in range(self.size) if self._contact_index_exists(j)}
        return array("q", sorted((base | set(st.raw_contacts) | set(st.contacts)) - st.deleted_contacts))

    # --- mutations -----------------------------------------------------------------------------------
    # Every change is stamped with the simulator clock (updated_at of what changed, created_at of its
    # events) and authored by API_USER_ID, like a change made through the API with the account's token.

    def _stamp(self) -> int:
        """What a mutation made now stamps: the clock, less :meth:`late_stamps`' lateness in this thread."""
        return self.clock.now() - getattr(self._late, "seconds", 0)

    @contextmanager
    def late_stamps(self, seconds: int) -> Iterator[None]:
        """Mutations made in this thread inside the block stamp ``updated_at`` and their events'
        ``created_at`` ``seconds`` before the clock, while the answers' ``Date`` stays the clock: a change that
        becomes visible only now although Kommo stamped it earlier (an integration sending ``updated_at``
        itself, a list index or the events feed lagging behind the servers that stamp). Nests; other
        threads' mutations (the HTTP control API, ``mutate`` faults) are stamped as before."""
        seconds = int(seconds)
        if seconds < 0:
            raise ValueError("late_stamps takes the seconds a stamp lags the clock (>= 0); a stamp ahead of "
                             "the clock is update_lead(updated_at=...)")
        before = getattr(self._late, "seconds", 0)
        self._late.seconds = seconds
        try:
            yield
        finally:
            self._late.seconds = before

    def _lead_exists(self, lead_id: int, st: _State) -> bool:
        if lead_id in st.deleted:
            return False
        return lead_id in st.stored or 0 <= lead_id - LEAD_ID_BASE < self.size

    def _record_lead_changes(self, old: dict, new: dict, at: int) -> None:
        """The events Kommo records for the difference between two versions of a lead."""
        lead_id, by = new["id"], new["updated_by"]
        rec = self.events.record
        if (old["pipeline_id"], old["status_id"]) != (new["pipeline_id"], new["status_id"]):
            rec("lead_status_changed", "lead", lead_id, at, by,
                [{"lead_status": {"id": new["status_id"], "pipeline_id": new["pipeline_id"]}}],
                [{"lead_status": {"id": old["status_id"], "pipeline_id": old["pipeline_id"]}}])
        if old["price"] != new["price"]:
            rec("sale_field_changed", "lead", lead_id, at, by, [{"sale_field_value": {"sale": new["price"]}}],
                [{"sale_field_value": {"sale": old["price"]}}])
        if old["name"] != new["name"]:
            rec("name_field_changed", "lead", lead_id, at, by, [{"name_field_value": {"name": new["name"]}}],
                [{"name_field_value": {"name": old["name"]}}])
        if old["responsible_user_id"] != new["responsible_user_id"]:
            rec("entity_responsible_changed", "lead", lead_id, at, by,
                [{"responsible_user": {"id": new["responsible_user_id"]}}],
                [{"responsible_user": {"id": old["responsible_user_id"]}}])
        self._record_field_changes("lead", lead_id, old["custom_fields_values"], new["custom_fields_values"],
                                   at, by)
        before = [c for c, _ in old["_contacts"]]
        after = [c for c, _ in new["_contacts"]]
        for cid in before:
            if cid not in after:
                rec("entity_unlinked", "lead", lead_id, at, by, [],
                    [{"link": {"entity": {"id": cid, "type": "contact"}}}])
        for cid in after:
            if cid not in before:
                rec("entity_linked", "lead", lead_id, at, by, [{"link": {"entity": {"id": cid, "type": "contact"}}}],
                    [])

    def _record_field_changes(self, entity_type: str, entity_id: int, old: list | None, new: list | None,
                              at: int, by: int) -> None:
        """One ``custom_field_{id}_value_changed`` event per custom field whose values differ."""
        old_items = {it["field_id"]: it for it in old or ()}
        new_items = {it["field_id"]: it for it in new or ()}
        for fid in sorted(old_items.keys() | new_items.keys()):
            a, b = new_items.get(fid), old_items.get(fid)
            if (a or {}).get("values") != (b or {}).get("values"):
                self.events.record(f"custom_field_{fid}_value_changed", entity_type, entity_id, at, by,
                                   _field_event_values(a), _field_event_values(b))

    def delete_leads(self, ids: Iterable[int]) -> int:
        """Deletes leads: they leave lists and lookups and go to the trash (``with=only_deleted``), with
        updated_at = now; records ``lead_deleted``. Returns how many existed."""
        with self._lock:
            st = self._state
            at = self._stamp()
            gone = sorted({int(x) for x in ids if self._lead_exists(int(x), st)})
            if gone:
                deleted_at = dict(st.deleted_at)
                deleted_at.update(dict.fromkeys(gone, at))
                self._state = replace(st, version=st.version + 1, deleted=st.deleted | set(gone),
                                      deleted_at=deleted_at)
                for lead_id in gone:
                    self.events.record("lead_deleted", "lead", lead_id, at, API_USER_ID)
            return len(gone)

    def _apply_changes(self, core: dict, changes: Mapping) -> None:
        changes = dict(changes)
        custom = changes.pop("custom_fields", None)
        contact_ids = changes.pop("contact_ids", None)
        has_main, main = "main_contact" in changes, changes.pop("main_contact", None)
        unknown = set(changes) - _UPDATABLE
        if unknown:
            raise ValueError(f"cannot change {sorted(unknown)}; allowed: {sorted(_UPDATABLE)}")
        old_status = core["status_id"]
        core.update(changes)
        if "status_id" in changes and "pipeline_id" not in changes:
            core["pipeline_id"] = _STATUS_PIPELINE.get(core["status_id"], core["pipeline_id"])
        if custom:
            items = list(core["custom_fields_values"] or [])
            for fid, value in custom.items():
                fid = int(fid)
                if fid not in self._fields:
                    raise ValueError(f"unknown custom field {fid}")
                pos = next((n for n, it in enumerate(items) if it["field_id"] == fid), None)
                if value is None:
                    if pos is not None:
                        del items[pos]
                elif pos is None:
                    items.append(self._cf_item(fid, value))
                else:
                    items[pos] = self._cf_item(fid, value)
            core["custom_fields_values"] = items or None
        if contact_ids is not None:
            core["_contacts"] = [(int(c), n == 0) for n, c in enumerate(contact_ids)]
        if has_main:  # the other contacts stay linked, none of them main
            others = [(c, False) for c, _ in core["_contacts"] if c != main]
            core["_contacts"] = ([] if main is None else [(int(main), True)]) + others
        if "status_id" in changes and core["status_id"] != old_status and "closed_at" not in changes:
            core["closed_at"] = core["updated_at"] if core["status_id"] in (STATUS_WON, STATUS_LOST) else None

    def _resolve_main_contact(self, changes: dict, at: int) -> None:
        """``main_contact`` as a dict is a new contact: creates it and puts its id in ``changes``. Checks
        the other changes first, so a refused change creates nothing."""
        unknown = set(changes) - _UPDATABLE - {"custom_fields", "contact_ids", "main_contact"}
        if unknown:
            raise ValueError(f"cannot change {sorted(unknown)}; allowed: {sorted(_UPDATABLE)}")
        for fid in changes.get("custom_fields") or {}:
            if int(fid) not in self._fields:
                raise ValueError(f"unknown custom field {fid}")
        main = changes.get("main_contact")
        if isinstance(main, Mapping):
            changes["main_contact"] = self._add_contact(dict(main), at)
        elif main is not None:
            if not self._contact_exists(int(main), self._state):
                raise ValueError(f"contact {main} does not exist")
            changes["main_contact"] = int(main)

    def update_lead(self, lead_id: int, *, touch: bool = True, **changes) -> dict:
        """Changes a lead. Top-level keys (status_id, price, name, responsible_user_id, ...),
        ``custom_fields={field_id: value or None}`` (select values are enum ids, dates unix seconds),
        ``contact_ids=[main, ...]`` (replaces the links) and ``main_contact`` (an existing contact id, a
        dict of new-contact fields as in add_contact, or None: relinks the main contact, other contacts
        stay). updated_at becomes the clock's now (unless given), updated_by API_USER_ID (unless given);
        records the events of what changed. ``touch=False``: updated_at and updated_by stay as they were
        (the events are recorded all the same), a change a list ordered by ``updated_at`` does not show:
        Kommo does not document which changes move ``updated_at`` (a relink, a merge of contacts). Returns
        the lead in API shape."""
        lead_id = int(lead_id)
        with self._lock:
            core = self._core(lead_id, self._state)
            if core is None:
                raise KeyError(f"lead {lead_id} does not exist")
            if not touch and ("updated_at" in changes or "updated_by" in changes):
                raise ValueError("touch=False keeps updated_at and updated_by: give neither")
            at = self._stamp()
            changes = dict(changes)
            self._resolve_main_contact(changes, at)
            st = self._state
            old = copy.deepcopy(core)
            if "updated_at" not in changes:
                core["updated_at"] = at
            changes.setdefault("updated_by", API_USER_ID)
            self._apply_changes(core, changes)
            if not touch:
                core["updated_at"], core["updated_by"] = old["updated_at"], old["updated_by"]
            stored = dict(st.stored)
            stored[lead_id] = core
            self._state = replace(st, version=st.version + 1, stored=stored)
            self._record_lead_changes(old, core, at)
            return self._render(copy.deepcopy(core))

    def add_lead(self, created_at: int | None = None, **fields) -> int:
        """Adds a lead with an id above every id the account ever had; records ``lead_added``.
        ``created_at`` defaults to the clock's now; updated_at is the clock's now (never before
        created_at) unless given. ``fields`` as in update_lead (``main_contact`` included);
        unspecified attributes are generated (status, contacts referencing an existing contact, ...)."""
        with self._lock:
            at = self._stamp()
            created_at = at if created_at is None else int(created_at)
            fields = dict(fields)
            self._resolve_main_contact(fields, at)
            st = self._state
            lead_id = st.next_id
            rng = random.Random(f"kommo-sim/added/{self.seed}/{lead_id}")
            code = rng.choices(_STATUS_CODES, cum_weights=_STATUS_CUM)[0]
            pipeline_id, status_id, _ = _STATUS_TABLE[code]
            contacts: list[tuple[int, bool]] = []
            if self.size:
                j = self._main_contact_index(rng.randrange(self.size))
                if j is not None and self._contact_index_exists(j):
                    contacts = [(CONTACT_ID_BASE + j, True)]
            given_updated = fields.pop("updated_at", None)
            # generated as a lead untouched since its creation, so its generated fields do not depend on
            # when the test runs; then stamped
            updated = created_at if given_updated is None else int(given_updated)
            core = self._gen_core(rng, lead_id, created_at, updated, pipeline_id, status_id, contacts)
            core["updated_at"] = max(created_at, at) if given_updated is None else updated
            core["created_by"] = core["updated_by"] = API_USER_ID
            if "main_contact" in fields and "contact_ids" not in fields:
                core["_contacts"] = []  # a new lead's contacts are the one it is created with
            if fields:
                fields.setdefault("updated_at", core["updated_at"])
                self._apply_changes(core, fields)
            stored = dict(st.stored)
            stored[lead_id] = core
            self._state = replace(st, version=st.version + 1, stored=stored, added=st.added + (lead_id,),
                                  next_id=lead_id + 1)
            self.events.record("lead_added", "lead", lead_id, at, core["created_by"])
            return lead_id

    def restore_leads(self, ids: Iterable[int], *, touch: bool = True) -> int:
        """Restores leads from the trash (Kommo can): same id, back at their place in id order (a list
        being paged shifts down by one from there), updated_at = now; records ``lead_restored``.
        ``touch=False``: each lead comes back with the updated_at and updated_by it had when it was
        deleted (Kommo does not document whether a restore moves them), so only the event tells.
        Returns how many were in the trash."""
        with self._lock:
            st = self._state
            at = self._stamp()
            back = sorted({int(x) for x in ids} & st.deleted_at.keys())
            if back:
                alive = replace(st, deleted=frozenset())
                stored = dict(st.stored)
                for lead_id in back:
                    core = self._core(lead_id, alive)
                    if touch:
                        core["updated_at"] = at
                        if "_raw" not in core:
                            core["updated_by"] = API_USER_ID
                    stored[lead_id] = core
                deleted_at = {k: v for k, v in st.deleted_at.items() if k not in set(back)}
                self._state = replace(st, version=st.version + 1, deleted=st.deleted - set(back),
                                      deleted_at=deleted_at, stored=stored)
                for lead_id in back:
                    self.events.record("lead_restored", "lead", lead_id, at, API_USER_ID)
            return len(back)

    def purge_leads(self, ids: Iterable[int]) -> int:
        """Empties leads out of the trash for good (Kommo does after a while): they no longer show under
        ``with=only_deleted`` and cannot be restored. Returns how many were in the trash."""
        with self._lock:
            st = self._state
            gone = {int(x) for x in ids} & st.deleted_at.keys()
            if gone:
                deleted_at = {k: v for k, v in st.deleted_at.items() if k not in gone}
                self._state = replace(st, version=st.version + 1, deleted_at=deleted_at)
            return len(gone)

    def deleted_lead_ids(self) -> list[int]:
        """The trash (what ``with=only_deleted`` lists), ascending (ground truth for tests)."""
        return sorted(self._state.deleted_at)

    def deleted_leads(self, lead_ids: Iterable[int]) -> list[dict]:
        """Trash entries as ``with=only_deleted`` lists them: only id, updated_at (when deleted) and
        is_deleted."""
        deleted_at = self._state.deleted_at
        return [{"id": x, "updated_at": deleted_at[x], "is_deleted": True} for x in lead_ids if x in deleted_at]

    # contacts

    def _contact_fields(self, contact: dict, changes: Mapping) -> None:
        """Applies name / first_name / last_name / phone / email / responsible_user_id to a contact."""
        changes = dict(changes)
        unknown = set(changes) - {"name", "first_name", "last_name", "phone", "email", "responsible_user_id"}
        if unknown:
            raise ValueError(f"cannot change contact {sorted(unknown)}")
        if "name" in changes:
            name = str(changes["name"] or "").strip()
            first, _, last = name.partition(" ")
            contact.update(name=name, first_name=first, last_name=last.strip())
        for part in ("first_name", "last_name"):
            if part in changes:
                contact[part] = str(changes[part] or "")
                contact["name"] = f"{contact['first_name']} {contact['last_name']}".strip()
        if "responsible_user_id" in changes:
            contact["responsible_user_id"] = int(changes["responsible_user_id"])
        for key, fid, code, label, enums in (("phone", CONTACT_PHONE_FIELD_ID, "PHONE", "Phone", PHONE_ENUMS),
                                             ("email", CONTACT_EMAIL_FIELD_ID, "EMAIL", "Email", EMAIL_ENUMS)):
            if key not in changes:
                continue
            items = [it for it in contact["custom_fields_values"] or () if it["field_id"] != fid]
            given = changes[key]
            numbers = [] if given is None else [given] if isinstance(given, str) else list(given)
            if numbers:
                old = next((it for it in contact["custom_fields_values"] or () if it["field_id"] == fid), None)
                kind = old["values"][0]["enum_code"] if old and old["values"] else "WORK"
                kind = kind if kind in enums else "WORK"
                items.append({"field_id": fid, "field_name": label, "field_code": code, "field_type": "multitext",
                              "values": [{"value": str(v), "enum_id": enums[kind], "enum_code": kind}
                                         for v in numbers]})
                items.sort(key=lambda it: it["field_id"])
            contact["custom_fields_values"] = items or None

    def _add_contact(self, fields: dict, at: int) -> int:
        st = self._state
        contact_id = st.next_contact_id
        while contact_id in st.raw_contacts or contact_id in st.deleted_contacts:
            contact_id += 1
        created = int(fields.pop("created_at", at))
        contact = {
            "id": contact_id, "name": "", "first_name": "", "last_name": "",
            "responsible_user_id": API_USER_ID, "group_id": 0, "created_by": API_USER_ID,
            "updated_by": API_USER_ID, "created_at": created, "updated_at": max(created, at),
            "closest_task_at": None, "is_deleted": False, "is_unsorted": False, "custom_fields_values": None,
            "account_id": ACCOUNT_ID,
            "_links": {"self": {"href": f"{self.base_url}/api/v4/contacts/{contact_id}"}},
            "_embedded": {"tags": [], "companies": []},
        }
        self._contact_fields(contact, fields)
        contacts = dict(st.contacts)
        contacts[contact_id] = contact
        self._state = replace(st, contacts=contacts, contact_version=st.contact_version + 1,
                              next_contact_id=contact_id + 1)
        self.events.record("contact_added", "contact", contact_id, at, API_USER_ID)
        return contact_id

    def add_contact(self, **fields) -> int:
        """Adds a contact: ``name``, ``first_name``, ``last_name``, ``phone`` / ``email`` (a string or a
        list), ``responsible_user_id``, ``created_at`` (default now). Records ``contact_added``; returns
        its id (above every generated contact id)."""
        with self._lock:
            return self._add_contact(dict(fields), self._stamp())

    def update_contact(self, contact_id: int, **changes) -> dict:
        """Edits a contact: ``name`` (split into first/last at the first space), ``first_name``,
        ``last_name``, ``phone`` / ``email`` (a string, a list, or None to clear), ``responsible_user_id``.
        Its updated_at becomes now (the leads linked to it do not change); records name_field_changed,
        custom_field_{id}_value_changed and entity_responsible_changed as applicable. Returns the contact."""
        contact_id = int(contact_id)
        with self._lock:
            st = self._state
            if contact_id in st.raw_contacts:
                raise ValueError(f"contact {contact_id} is a raw payload; put_raw_contact replaces it")
            old = self.contact(contact_id)
            if old is None:
                raise KeyError(f"contact {contact_id} does not exist")
            at = self._stamp()
            new = copy.deepcopy(old)
            self._contact_fields(new, changes)
            new["updated_at"], new["updated_by"] = at, API_USER_ID
            contacts = dict(st.contacts)
            contacts[contact_id] = new
            self._state = replace(st, contacts=contacts, contact_version=st.contact_version + 1)
            if old["name"] != new["name"]:
                self.events.record("name_field_changed", "contact", contact_id, at, API_USER_ID,
                                   [{"name_field_value": {"name": new["name"]}}],
                                   [{"name_field_value": {"name": old["name"]}}])
            if old["responsible_user_id"] != new["responsible_user_id"]:
                self.events.record("entity_responsible_changed", "contact", contact_id, at, API_USER_ID,
                                   [{"responsible_user": {"id": new["responsible_user_id"]}}],
                                   [{"responsible_user": {"id": old["responsible_user_id"]}}])
            self._record_field_changes("contact", contact_id, old["custom_fields_values"],
                                       new["custom_fields_values"], at, API_USER_ID)
            return copy.deepcopy(new)

    def delete_contacts(self, ids: Iterable[int]) -> int:
        """Deletes contacts: the contacts endpoint stops returning them; leads keep referencing them.
        Records ``contact_deleted``."""
        with self._lock:
            st = self._state
            at = self._stamp()
            gone = sorted({int(x) for x in ids if self._contact_exists(int(x), st)})
            if gone:
                self._state = replace(st, deleted_contacts=st.deleted_contacts | set(gone),
                                      contact_version=st.contact_version + 1)
                for contact_id in gone:
                    self.events.record("contact_deleted", "contact", contact_id, at, API_USER_ID)
            return len(gone)

    def put_raw_lead(self, payload: object, *, created_at: int, updated_at: int | None = None,
                     status_id: int = 0, pipeline_id: int = 0) -> int:
        """Adds a list entry served exactly as ``payload``: any JSON value (a lead with malformed fields, a
        second copy of an existing id, a string instead of an object). ``created_at``/``updated_at``/
        ``status_id``/``pipeline_id`` are what the server filters and sorts on, whatever the payload
        claims. The entry sorts after every lead the account had (by its key, which is returned; it is
        also the id that ``/api/v4/leads/{key}`` answers to). For the bad-input tests."""
        created_at = int(created_at)
        with self._lock:
            st = self._state
            key = st.next_id
            core = {"id": key, "created_at": created_at,
                    "updated_at": created_at if updated_at is None else int(updated_at),
                    "status_id": int(status_id), "pipeline_id": int(pipeline_id), "_raw": copy.deepcopy(payload)}
            stored = dict(st.stored)
            stored[key] = core
            self._state = replace(st, version=st.version + 1, stored=stored, added=st.added + (key,),
                                  next_id=key + 1)
            return key

    def put_raw_contact(self, contact_id: int, payload: object) -> None:
        """Makes ``contact_id`` exist and answer exactly ``payload`` (e.g. no phone, malformed fields)."""
        with self._lock:
            st = self._state
            raw = dict(st.raw_contacts)
            raw[int(contact_id)] = copy.deepcopy(payload)
            self._state = replace(st, raw_contacts=raw, deleted_contacts=st.deleted_contacts - {int(contact_id)},
                                  contact_version=st.contact_version + 1)

    def revoke_token(self) -> None:
        """Every API request gets 401 from now on (until set_token)."""
        self.token = None

    def set_token(self, token: str) -> None:
        self.token = str(token)

    def apply_mutation(self, spec: Mapping) -> dict:
        """Applies a JSON mutation ``{"op": ..., ...}``; used by the HTTP control API and mutate faults.
        ``late_s`` on any of them stamps it that many seconds before the clock (:meth:`late_stamps`)."""
        spec = dict(spec)
        late = spec.pop("late_s", None)
        if late:
            with self.late_stamps(int(late)):
                return self.apply_mutation(spec)
        op = spec.pop("op", None)
        if op == "delete_leads":
            return {"deleted": self.delete_leads(spec["ids"])}
        if op == "update_lead":
            lead_id = spec.pop("lead_id", None)
            if lead_id is None:
                lead_id = spec.pop("id")
            changes = spec.pop("changes", None) or {}
            changes.update(spec)
            return {"lead": self.update_lead(int(lead_id), **changes)}
        if op == "add_lead":
            created_at = spec.pop("created_at", None)
            return {"id": self.add_lead(None if created_at is None else int(created_at), **spec)}
        if op == "restore_leads":
            return {"restored": self.restore_leads(spec["ids"], touch=bool(spec.get("touch", True)))}
        if op == "rename_option":
            return {"field": self.rename_option(int(spec["field_id"]), int(spec["enum_id"]), spec["label"])}
        if op == "purge_leads":
            return {"purged": self.purge_leads(spec["ids"])}
        if op == "add_contact":
            return {"id": self.add_contact(**spec)}
        if op == "update_contact":
            contact_id = spec.pop("contact_id", None)
            if contact_id is None:
                contact_id = spec.pop("id")
            changes = spec.pop("changes", None) or {}
            changes.update(spec)
            return {"contact": self.update_contact(int(contact_id), **changes)}
        if op == "delete_contacts":
            return {"deleted": self.delete_contacts(spec["ids"])}
        if op == "set_clock":
            return {"now": self.clock.set(spec["ts"], tick=bool(spec.get("tick", False)))}
        if op == "advance_clock":
            return {"now": self.clock.advance(spec["seconds"])}
        if op == "resume_clock":
            return {"now": self.clock.resume()}
        if op == "put_raw_lead":
            payload = spec.pop("payload")
            return {"id": self.put_raw_lead(payload, **spec)}
        if op == "put_raw_contact":
            self.put_raw_contact(int(spec["contact_id"]), spec["payload"])
            return {}
        if op == "revoke_token":
            self.revoke_token()
            return {}
        if op == "set_token":
            self.set_token(spec["token"])
            return {}
        raise ValueError(f"unknown mutation op {op!r}")


def _field_event_values(item: dict | None) -> list[dict]:
    """``value_after`` / ``value_before`` of a custom-field event: one entry per value ([] when empty)."""
    if not item:
        return []
    out = []
    for v in item["values"]:
        value = v.get("value")
        entry = {"field_id": item["field_id"], "field_type": FIELD_TYPE_CODES.get(item["field_type"], 0),
                 "text": ("1" if value else "0") if isinstance(value, bool) else str(value)}
        if v.get("enum_id") is not None:
            entry["enum_id"] = v["enum_id"]
        out.append({"custom_field_value": entry})
    return out
