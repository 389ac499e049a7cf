"""A real HTTP server that behaves like Kommo's API v4 for the endpoints an export needs.

Request pipeline for ``/api/...`` (documented order, relied upon by tests):

1. stats: every request is counted on arrival (path, arrival time, in-flight);
2. ban: once banned (``ban_after_violations`` 429s), every request gets 403 with an nginx HTML page;
3. auth: ``Authorization: Bearer <token>`` or 401 ``application/problem+json``;
4. rate limiter: strict sliding window on arrival time over authenticated requests; a request that
   would be the (rps+1)-th within the trailing 1.0 s gets 429 with an HTML body and no Retry-After.
   Rejected requests do not enter the window;
5. faults: the first eligible rule fires. Faults are checked *after* the limiter, so a throttled
   request never consumes a fault and a faulted request did count toward the rate window (like a
   backend error behind Kommo's front proxy). Faulted requests are counted in stats;
6. latency: the configured latency is slept (concurrently: one thread per connection);
7. routing: leads, contacts, events, custom fields, pipelines, account; anything else is 404
   problem+json.

Responses carry the simulator clock in their ``Date`` header, as Kommo's carry its servers' time.

Control endpoints live under ``/_simulator/`` (no auth, loopback clients only).
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, urlsplit

from .dataset import Dataset, LeadQuery, SimulatorConfig
from .events import MAX_EVENTS_LIMIT, EventQuery

MAX_LIMIT = 250
DEFAULT_LIMIT = 50

HAL_JSON = "application/hal+json"
PROBLEM_JSON = "application/problem+json"
HTML = "text/html; charset=UTF-8"

FAULT_KINDS = ("status", "reset", "truncate", "slow", "empty", "mutate", "date")
# a single entity's path segment: a number, or an event id (26 lowercase base32 characters)
_ENTITY_ID = re.compile(r"\d+|[0-9a-z]{26}")
_RULE_KEYS = {"kind", "path", "path_exact", "query", "after", "times", "status", "body", "content_type",
              "headers", "delay_s", "mode", "mutation", "op", "id", "offset_s"}


def _html_page(status: int, extra: str = "") -> bytes:
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    return (
        f"<html>\r\n<head><title>{status} {phrase}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status} {phrase}</h1></center>\r\n{extra}<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


def _problem(status: int, detail: str, title: str | None = None) -> bytes:
    if title is None:
        title = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    return json.dumps(
        {"title": title, "type": f"https://httpstatus.es/{status}", "status": status, "detail": detail}
    ).encode()


def _default_error(status: int) -> tuple[bytes, str]:
    if status in (403, 429, 502, 503) or status < 400:
        return _html_page(status), HTML
    return _problem(status, "Injected fault"), PROBLEM_JSON


# --- faults ----------------------------------------------------------------------------------------


@dataclass
class FaultRule:
    """One injected fault. See ``KommoSimulator.add_fault`` for the fields."""

    kind: str
    path: str = "/api/"
    path_exact: bool = False
    query: dict[str, str] | None = None
    after: int = 0
    times: int = 1
    status: int = 500
    body: str | None = None
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 1.0
    mode: str = "full_length"  # truncate: "full_length" (header promises everything) or "honest"
    mutation: dict | None = None
    offset_s: float = 0.0  # date: how far the answer's Date header is ahead of the servers' clock
    id: int = 0
    seen: int = 0
    fired: int = 0

    @classmethod
    def from_dict(cls, rule: Mapping) -> FaultRule:
        rule = dict(rule)
        kind = rule.get("kind")
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {FAULT_KINDS}, got {kind!r}")
        if kind == "mutate" and "mutation" not in rule:
            extra = {k: rule.pop(k) for k in list(rule) if k not in _RULE_KEYS or k == "op"}
            if "op" not in extra:
                raise ValueError("a mutate fault needs an 'op' (or a 'mutation' object)")
            rule["mutation"] = extra
        unknown = set(rule) - _RULE_KEYS
        if unknown:
            raise ValueError(f"unknown fault fields {sorted(unknown)}")
        rule.pop("op", None)
        rule.pop("id", None)
        obj = cls(**rule)
        obj.after = int(obj.after)
        obj.times = int(obj.times)
        obj.status = int(obj.status)
        obj.delay_s = float(obj.delay_s)
        obj.offset_s = float(obj.offset_s)
        if obj.mode not in ("full_length", "honest"):
            raise ValueError("truncate mode must be 'full_length' or 'honest'")
        if obj.query is not None:
            obj.query = {str(k): str(v) for k, v in obj.query.items()}
        return obj

    def matches(self, path: str, params: list[tuple[str, str]]) -> bool:
        p = self.path
        if self.path_exact:
            ok = path == p
        elif p.endswith("/"):
            ok = path.startswith(p)
        else:
            # the resource itself and single entities of it ("/api/v4/leads" and "/api/v4/leads/123"),
            # never sibling sub-resources such as /api/v4/leads/custom_fields or /api/v4/leads/pipelines
            rest = path[len(p):] if path.startswith(p) else None
            ok = rest is not None and (rest in ("", "/") or (rest[:1] == "/" and _ENTITY_ID.fullmatch(rest[1:])))
        if not ok:
            return False
        if self.query:
            given = dict(params)
            return all(given.get(k) == v for k, v in self.query.items())
        return True

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in (
            "id", "kind", "path", "path_exact", "query", "after", "times", "status", "body", "content_type",
            "headers", "delay_s", "mode", "mutation", "offset_s", "seen", "fired")}


class _FaultBook:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._next_id = 1

    def add(self, rule: Mapping) -> FaultRule:
        obj = FaultRule.from_dict(rule)
        with self._lock:
            obj.id = self._next_id
            self._next_id += 1
            self._rules.append(obj)
        return obj

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def list(self) -> list[dict]:
        with self._lock:
            return [r.as_dict() for r in self._rules]

    def match(self, path: str, params: list[tuple[str, str]]) -> FaultRule | None:
        """Every matching rule counts the request; the first eligible one fires."""
        chosen = None
        with self._lock:
            for rule in self._rules:
                if not rule.matches(path, params):
                    continue
                rule.seen += 1
                if chosen is None and rule.seen > rule.after and (rule.times < 0 or rule.fired < rule.times):
                    rule.fired += 1
                    chosen = rule
        return chosen


# --- stats and rate limiting -----------------------------------------------------------------------


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.connections = 0
        self.by_path: Counter[str] = Counter()
        self.by_status: Counter[str] = Counter()
        self.throttled_429 = 0
        self.faults_fired = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.max_per_second = 0
        self.arrivals: deque[float] = deque()

    def arrive(self, path: str, now: float) -> None:
        with self.lock:
            self.requests += 1
            self.by_path[path] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            arrivals = self.arrivals
            arrivals.append(now)
            while arrivals and arrivals[0] <= now - 1.0:
                arrivals.popleft()
            self.max_per_second = max(self.max_per_second, len(arrivals))

    def leave(self) -> None:
        with self.lock:
            self.in_flight = max(0, self.in_flight - 1)

    def status(self, status: int | str) -> None:
        with self.lock:
            self.by_status[str(status)] += 1

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "requests": self.requests,
                "connections": self.connections,
                "by_path": dict(self.by_path),
                "by_status": dict(self.by_status),
                "throttled_429": self.throttled_429,
                "faults_fired": self.faults_fired,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "max_requests_in_any_second": self.max_per_second,
            }


class _RateLimiter:
    def __init__(self, rps: float | None, ban_after: int | None) -> None:
        self.lock = threading.Lock()
        self.configure(rps, ban_after)

    def configure(self, rps: float | None, ban_after: int | None) -> None:
        with self.lock:
            self.rps = float(rps) if rps else 0.0
            self.ban_after = int(ban_after) if ban_after else None
            self.window: deque[float] = deque()
            self.violations = 0
            self.banned = False

    def admit(self, now: float) -> bool:
        """True when the request may pass; False means 429 (and counts a violation)."""
        with self.lock:
            if self.rps <= 0:
                return True
            window = self.window
            while window and window[0] <= now - 1.0:
                window.popleft()
            if len(window) + 1 > self.rps:
                self.violations += 1
                if self.ban_after is not None and self.violations >= self.ban_after:
                    self.banned = True
                return False
            window.append(now)
            return True


# --- request parsing -------------------------------------------------------------------------------


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip())
    except (ValueError, AttributeError):
        return None


def _page_limit(params: list[tuple[str, str]], max_limit: int = MAX_LIMIT) -> tuple[int, int]:
    given = dict(params)
    page = _int(given.get("page"))
    limit = _int(given.get("limit"))
    page = page if page is not None and page >= 1 else 1
    if limit is None or limit < 1:
        limit = DEFAULT_LIMIT
    return page, min(limit, max_limit)


def _with(params: list[tuple[str, str]]) -> tuple[str, ...]:
    out: list[str] = []
    for k, v in params:
        if k == "with":
            out.extend(x.strip() for x in v.split(",") if x.strip())
    return tuple(out)


def _ids(params: list[tuple[str, str]]) -> tuple[int, ...] | None:
    ids: list[int] = []
    seen_key = False
    for k, v in params:
        if k == "filter[id]" or k == "filter[id][]" or (k.startswith("filter[id][") and k.endswith("]")):
            seen_key = True
            for part in v.split(","):
                n = _int(part)
                if n is not None:
                    ids.append(n)
    if not seen_key or not ids:
        return None  # absent or malformed: ignored
    return tuple(ids)


def _multi(params: list[tuple[str, str]], name: str) -> list[str] | None:
    """Values of a multi-valued filter in any of the forms Kommo takes: ``filter[x]=a,b``,
    ``filter[x][]=a&filter[x][]=b``, ``filter[x][0]=a``. None when absent or empty."""
    key = re.compile(rf"filter\[{re.escape(name)}\](\[\d*\])?")
    out = [part.strip() for k, v in params if key.fullmatch(k) for part in v.split(",") if part.strip()]
    return out or None


def _int_set(values: list[str] | None) -> frozenset[int] | None:
    if values is None:
        return None
    ints = {n for n in (_int(v) for v in values) if n is not None}
    return frozenset(ints) or None


def _status_pairs(params: list[tuple[str, str]], prefix: str) -> frozenset | None:
    """``<prefix>[leads_statuses][i][pipeline_id|status_id]`` pairs; a missing half matches anything."""
    found: dict[str, dict[str, int]] = {}
    head = f"{prefix}[leads_statuses]["
    for k, v in params:
        if k.startswith(head) and k.endswith("]"):
            idx, sep, attr = k[len(head):-1].partition("][")
            n = _int(v)
            if sep and attr in ("pipeline_id", "status_id") and n is not None:
                found.setdefault(idx, {})[attr] = n
    return frozenset((s.get("pipeline_id"), s.get("status_id")) for s in found.values()) or None


def parse_event_query(params: list[tuple[str, str]]) -> EventQuery:
    """Turns events-list query parameters into an EventQuery; unknown or malformed filters are ignored.
    ``filter[created_at]`` takes one timestamp (from then on), ``a,b``, or ``[from]``/``[to]``."""
    given: dict[str, str] = {}
    for k, v in params:
        given.setdefault(k, v)
    created_from = _int(given.get("filter[created_at][from]"))
    created_to = _int(given.get("filter[created_at][to]"))
    if "filter[created_at]" in given:
        parts = [_int(x) for x in given["filter[created_at]"].split(",")]
        if len(parts) in (1, 2) and None not in parts:
            created_from = parts[0]
            created_to = parts[1] if len(parts) == 2 else created_to
    ids, types, entities = _multi(params, "id"), _multi(params, "type"), _multi(params, "entity")
    return EventQuery(
        ids=frozenset(ids) if ids else None,
        types=frozenset(types) if types else None,
        entities=frozenset(entities) if entities else None,
        entity_ids=_int_set(_multi(params, "entity_id")),
        created_from=created_from,
        created_to=created_to,
        created_by=_int_set(_multi(params, "created_by")),
        status_after=_status_pairs(params, "filter[value_after]"),
        status_before=_status_pairs(params, "filter[value_before]"),
    )


def parse_lead_query(params: list[tuple[str, str]]) -> LeadQuery:
    """Turns leads-list query parameters into a LeadQuery; unknown or malformed filters are ignored."""
    given: dict[str, str] = {}
    for k, v in params:
        given.setdefault(k, v)
    statuses: dict[str, dict[str, int]] = {}
    pipelines: list[int] = []
    for k, v in params:
        if k.startswith("filter[statuses][") and k.endswith("]"):
            inner = k[len("filter[statuses]["):-1]  # e.g. "0][status_id"
            idx, sep, attr = inner.partition("][")
            n = _int(v)
            if sep and attr in ("pipeline_id", "status_id") and n is not None:
                statuses.setdefault(idx, {})[attr] = n
        elif k in ("filter[pipeline_id]", "filter[pipeline_id][]") or (
            k.startswith("filter[pipeline_id][") and k.endswith("]")
        ):
            n = _int(v)
            if n is not None:
                pipelines.append(n)
    pairs = tuple(
        (s["pipeline_id"], s["status_id"]) for s in statuses.values() if "pipeline_id" in s and "status_id" in s
    )
    order_field, order_desc = "id", False
    for k, v in params:
        if k.startswith("order[") and k.endswith("]"):
            f = k[len("order["):-1]
            direction = v.strip().lower()
            if f in ("id", "created_at", "updated_at") and direction in ("asc", "desc"):
                order_field, order_desc = f, direction == "desc"
                break
    return LeadQuery(
        created_from=_int(given.get("filter[created_at][from]")),
        created_to=_int(given.get("filter[created_at][to]")),
        updated_from=_int(given.get("filter[updated_at][from]")),
        updated_to=_int(given.get("filter[updated_at][to]")),
        ids=_ids(params),
        statuses=pairs or None,
        pipelines=tuple(pipelines) or None,
        order_field=order_field,
        order_desc=order_desc,
        only_deleted="only_deleted" in _with(params),
    )


def _href(base: str, path: str, params: list[tuple[str, str]], page: int, limit: int) -> str:
    kept = [(k, v) for k, v in params if k not in ("page", "limit")]
    kept += [("limit", str(limit)), ("page", str(page))]
    query = "&".join(f"{quote(k, safe='[]')}={quote(v, safe=',')}" for k, v in kept)
    return f"{base}{path}?{query}"


# --- the HTTP layer --------------------------------------------------------------------------------


class _Reply(Exception):
    """Raised inside routing to answer right away."""

    def __init__(self, status: int, body: bytes = b"", content_type: str = PROBLEM_JSON) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nginx"
    sys_version = ""
    timeout = 120  # idle keep-alive connections are dropped after this
    # nginx's tcp_nodelay: a reply's headers and body go out at once, not 40 ms apart (Nagle's algorithm
    # holding the body until the client's delayed ACK of the headers).
    disable_nagle_algorithm = True

    server: _Server

    def version_string(self) -> str:
        return "nginx"

    # A "date" fault: this answer's Date header comes from a clock that far ahead (a proxy or cache in front).
    date_offset_s = 0.0

    def date_time_string(self, timestamp: float | None = None) -> str:
        # Kommo's Date header is its servers' clock: a change-tracking client may take its cursor from it
        moment = self.server.sim.dataset.clock.time() + self.date_offset_s if timestamp is None else timestamp
        return super().date_time_string(moment)

    def setup(self) -> None:
        super().setup()
        self.server.sim._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.sim._track(self.connection, False)

    def do_GET(self) -> None:  # noqa: N802
        self.server.sim._handle(self, "GET")

    def do_POST(self) -> None:  # noqa: N802
        self.server.sim._handle(self, "POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self.server.sim._handle(self, "DELETE")

    def do_PUT(self) -> None:  # noqa: N802
        self.server.sim._handle(self, "PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self.server.sim._handle(self, "PATCH")

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        if self.server.sim.verbose:
            super().log_message(format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256
    sim: KommoSimulator


class KommoSimulator:
    """Kommo API v4 simulator. ``with KommoSimulator(SimulatorConfig(leads=500)) as sim: sim.base_url``."""

    def __init__(self, config: SimulatorConfig | None = None, *, verbose: bool = False, **overrides) -> None:
        if config is None:
            config = SimulatorConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a SimulatorConfig or keyword overrides, not both")
        self.config = config
        self.verbose = verbose
        self.dataset = Dataset(config)
        self._latency_s = max(0.0, float(config.latency_ms or 0.0)) / 1000.0
        self._limiter = _RateLimiter(config.rate_limit_rps, config.ban_after_violations)
        self._faults = _FaultBook()
        self._stats = _Stats()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self.base_url = ""

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> KommoSimulator:
        if self._server is not None:
            return self
        host = self.config.host
        server = _Server((host, self.config.port), _Handler)
        server.sim = self
        self._server = server
        port = server.server_address[1]
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else ("[::1]" if host == "::" else host)
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        self.base_url = f"http://{shown}:{port}"
        self.dataset.base_url = self.base_url
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="kommo-simulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server = self._server
        if server is None:
            return
        self._server = None
        server.shutdown()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> KommoSimulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1]) if self.base_url else 0

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._conns.add(conn)
                with self._stats.lock:
                    self._stats.connections += 1
            else:
                self._conns.discard(conn)

    # --- Python control API ------------------------------------------------------------------------

    def stats(self) -> dict:
        snap = self._stats.snapshot()
        with self._limiter.lock:
            snap["violations"] = self._limiter.violations
            snap["banned"] = self._limiter.banned
        return snap

    def reset_stats(self) -> None:
        with self._stats.lock:
            self._stats.reset()

    def add_fault(self, **rule) -> int:
        """Injects a fault; returns its id. Fields: ``kind`` (status | reset | truncate | slow | empty |
        mutate), ``path`` (default "/api/": a path ending in "/" is a plain prefix; otherwise it matches
        that resource and its single entities, e.g. "/api/v4/leads" matches /api/v4/leads and
        /api/v4/leads/123 but not /api/v4/leads/custom_fields/...), ``path_exact`` (bool), ``query``
        (params that must be present with these values, e.g. {"page": "3"}), ``after`` (matching requests
        to let pass first, default 0), ``times`` (default 1, -1 forever); ``status``/``body``/
        ``content_type``/``headers`` (kind status), ``delay_s`` (slow), ``mode`` (truncate:
        "full_length" or "honest"), ``op`` + mutation fields or ``mutation`` (mutate), ``offset_s`` (date:
        the request is answered normally, but its ``Date`` header reads the clock plus ``offset_s``, as from
        a proxy whose clock is ahead of Kommo's servers)."""
        return self._faults.add(rule).id

    def clear_faults(self) -> None:
        self._faults.clear()

    def faults(self) -> list[dict]:
        return self._faults.list()

    def set_latency(self, ms: float) -> None:
        self._latency_s = max(0.0, float(ms)) / 1000.0

    def set_rate_limit(self, rps: float | None, ban_after_violations: int | None = None) -> None:
        """Reconfigures the limiter; also clears violations and any ban."""
        self._limiter.configure(rps, ban_after_violations)

    def unban(self) -> None:
        with self._limiter.lock:
            self._limiter.violations = 0
            self._limiter.banned = False
            self._limiter.window.clear()

    # --- request handling --------------------------------------------------------------------------

    def _send(self, h: _Handler, status: int, body: bytes = b"", content_type: str = HAL_JSON,
              headers: Mapping[str, str] | None = None) -> None:
        self._stats.status(status)
        h.send_response(status)
        if status not in (204, 304):
            h.send_header("Content-Type", content_type)
            h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if status not in (204, 304) and h.command != "HEAD":
            h.wfile.write(body)

    def _handle(self, h: _Handler, method: str) -> None:
        split = urlsplit(h.path)
        path = split.path
        params = parse_qsl(split.query, keep_blank_values=True)
        length = _int(h.headers.get("Content-Length")) or 0
        raw_body = h.rfile.read(length) if length > 0 else b""
        if path.startswith("/_simulator/") or path == "/_simulator":
            self._control(h, method, path, raw_body)
            return
        now = time.monotonic()
        h.date_offset_s = 0.0  # a keep-alive connection's handler serves many requests
        self._stats.arrive(path, now)
        try:
            self._api(h, method, path, params, now)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True
        finally:
            self._stats.leave()

    def _api(self, h: _Handler, method: str, path: str, params: list[tuple[str, str]], now: float) -> None:
        if self._limiter.banned:
            self._sleep_latency()
            body = _html_page(403, "<p>Account blocked: too many API limit violations. Contact support.</p>\r\n")
            self._send(h, 403, body, HTML)
            return
        token = self.dataset.token
        auth = h.headers.get("Authorization")
        if auth is None or token is None or auth != f"Bearer {token}":
            self._sleep_latency()
            detail = "Authorization header is missing" if auth is None else "The access token is invalid or revoked"
            self._send(h, 401, _problem(401, detail, "Unauthorized"), PROBLEM_JSON)
            return
        if not self._limiter.admit(now):
            with self._stats.lock:
                self._stats.throttled_429 += 1
            self._sleep_latency()
            self._send(h, 429, _html_page(429), HTML)
            return
        rule = self._faults.match(path, params)
        if rule is not None:
            with self._stats.lock:
                self._stats.faults_fired += 1
        self._sleep_latency()
        if rule is not None and rule.kind != "truncate":
            if rule.kind == "status":
                if rule.body is not None:
                    body, ctype = rule.body.encode(), rule.content_type or HTML
                else:
                    body, ctype = _default_error(rule.status)
                    ctype = rule.content_type or ctype
                self._send(h, rule.status, body, ctype, rule.headers)
                return
            if rule.kind == "reset":
                self._reset(h)
                return
            if rule.kind == "empty":
                self._send(h, 204)
                return
            if rule.kind == "date":
                h.date_offset_s = rule.offset_s
            elif rule.kind == "slow":
                time.sleep(rule.delay_s)
            elif rule.kind == "mutate":
                self.dataset.apply_mutation(rule.mutation or {})
        try:
            status, body, ctype = self._route(method, path, params)
        except _Reply as r:
            status, body, ctype = r.status, r.body, r.content_type
        except Exception as exc:  # a simulator bug: answer like a server error, keep serving
            status, body, ctype = 500, _problem(500, f"simulator error: {type(exc).__name__}"), PROBLEM_JSON
        if rule is not None and rule.kind == "truncate" and status == 200:
            self._truncate(h, body, ctype, rule.mode == "honest")
            return
        self._send(h, status, body, ctype)

    def _sleep_latency(self) -> None:
        if self._latency_s > 0:
            time.sleep(self._latency_s)

    def _reset(self, h: _Handler) -> None:
        """Abortive close (RST) without sending a single byte."""
        self._stats.status("reset")
        h.close_connection = True
        try:
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
        except OSError:
            pass

    def _truncate(self, h: _Handler, body: bytes, ctype: str, honest: bool) -> None:
        self._stats.status("200-truncated")
        half = body[: len(body) // 2]
        h.send_response(200)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(half) if honest else len(body)))
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(half)
        h.close_connection = True

    # --- routes ------------------------------------------------------------------------------------

    def _route(self, method: str, path: str, params: list[tuple[str, str]]) -> tuple[int, bytes, str]:
        parts = [p for p in path.split("/") if p]
        if parts[:2] != ["api", "v4"]:
            raise _Reply(404, _problem(404, f"Unknown path {path}", "Not Found"))
        rest = parts[2:]
        if method != "GET":
            known = rest[:1] in (["leads"], ["contacts"], ["events"], ["account"])
            if known:
                raise _Reply(405, _problem(405, f"{method} is not supported by the simulator"))
            raise _Reply(404, _problem(404, f"Unknown path {path}", "Not Found"))
        if rest == ["leads"]:
            return self._leads(path, params)
        if len(rest) == 2 and rest[0] == "leads" and rest[1].isdigit():
            return self._one(self.dataset.lead(int(rest[1]), _with(params)))
        if rest == ["leads", "custom_fields"]:
            return self._custom_fields(path, params)
        if len(rest) == 3 and rest[:2] == ["leads", "custom_fields"]:
            fid = _int(rest[2])
            f = self.dataset.field(fid) if fid is not None else None
            return self._one(f)
        if rest == ["leads", "pipelines"]:
            pipes = self.dataset.pipelines()
            body = {"_total_items": len(pipes), "_links": {"self": {"href": f"{self.base_url}{path}"}},
                    "_embedded": {"pipelines": pipes}}
            return 200, self._json(body), HAL_JSON
        if len(rest) == 3 and rest[:2] == ["leads", "pipelines"] and rest[2].isdigit():
            pid = int(rest[2])
            return self._one(next((p for p in self.dataset.pipelines() if p["id"] == pid), None))
        if rest == ["contacts"]:
            return self._contacts(path, params)
        if len(rest) == 2 and rest[0] == "contacts" and rest[1].isdigit():
            return self._one(self.dataset.contact(int(rest[1])))
        if rest == ["events"]:
            return self._events(path, params)
        if len(rest) == 2 and rest[0] == "events":
            e = self.dataset.events.get(rest[1])
            return self._one(None if e is None else self.dataset.events.render(e, self.base_url))
        if rest == ["account"]:
            return 200, self._json({
                "id": 31415926, "name": "Simulated rental account", "subdomain": "simulator",
                "current_user_id": 5550001, "country": "DE", "currency": "EUR", "timezone": "Europe/Berlin",
                "_links": {"self": {"href": f"{self.base_url}/api/v4/account"}},
            }), HAL_JSON
        raise _Reply(404, _problem(404, f"Unknown path {path}", "Not Found"))

    @staticmethod
    def _json(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    def _one(self, obj: dict | None) -> tuple[int, bytes, str]:
        if obj is None:
            return 204, b"", HAL_JSON
        return 200, self._json(obj), HAL_JSON

    def _list(self, path: str, params, page: int, limit: int, key: str, items: list[dict]):
        if not items:
            return 204, b"", HAL_JSON
        body = {
            "_page": page,
            "_links": {
                "self": {"href": _href(self.base_url, path, params, page, limit)},
                "next": {"href": _href(self.base_url, path, params, page + 1, limit)},
            },
            "_embedded": {key: items},
        }
        return 200, self._json(body), HAL_JSON

    def _leads(self, path: str, params: list[tuple[str, str]]) -> tuple[int, bytes, str]:
        page, limit = _page_limit(params)
        query = parse_lead_query(params)
        ids = self.dataset.find_lead_ids(query, (page - 1) * limit, limit)
        if query.only_deleted:
            leads = self.dataset.deleted_leads(ids)
        else:
            leads = self.dataset.leads(ids, _with(params))
        return self._list(path, params, page, limit, "leads", leads)

    def _contacts(self, path: str, params: list[tuple[str, str]]) -> tuple[int, bytes, str]:
        page, limit = _page_limit(params)
        q = parse_lead_query(params)  # the same id / date / order parameters as leads
        ids = self.dataset.find_contact_ids(
            q.ids, (page - 1) * limit, limit, created_from=q.created_from, created_to=q.created_to,
            updated_from=q.updated_from, updated_to=q.updated_to, order_field=q.order_field,
            order_desc=q.order_desc)
        contacts = [c for c in (self.dataset.contact(x) for x in ids) if c is not None]
        return self._list(path, params, page, limit, "contacts", contacts)

    def _events(self, path: str, params: list[tuple[str, str]]) -> tuple[int, bytes, str]:
        page, limit = _page_limit(params, MAX_EVENTS_LIMIT)
        log = self.dataset.events
        found = log.find(parse_event_query(params), (page - 1) * limit, limit)
        return self._list(path, params, page, limit, "events", [log.render(e, self.base_url) for e in found])

    def _custom_fields(self, path: str, params: list[tuple[str, str]]) -> tuple[int, bytes, str]:
        page, limit = _page_limit(params)
        fields = self.dataset.fields()
        chunk = fields[(page - 1) * limit: page * limit]
        if not chunk:
            return 204, b"", HAL_JSON
        pages = (len(fields) + limit - 1) // limit
        links = {"self": {"href": _href(self.base_url, path, params, page, limit)}}
        if page < pages:
            links["next"] = {"href": _href(self.base_url, path, params, page + 1, limit)}
        links["last"] = {"href": _href(self.base_url, path, params, pages, limit)}
        body = {"_total_items": len(fields), "_page": page, "_page_count": pages, "_links": links,
                "_embedded": {"custom_fields": chunk}}
        return 200, self._json(body), HAL_JSON

    # --- control endpoints -------------------------------------------------------------------------

    def _control(self, h: _Handler, method: str, path: str, raw: bytes) -> None:
        try:
            if not ipaddress.ip_address(h.client_address[0].split("%")[0]).is_loopback:
                self._send_control(h, 403, {"error": "control endpoints are loopback-only"})
                return
        except ValueError:
            self._send_control(h, 403, {"error": "control endpoints are loopback-only"})
            return
        try:
            payload = json.loads(raw.decode() or "{}") if raw else {}
        except ValueError:
            self._send_control(h, 400, {"error": "body must be JSON"})
            return
        name = path[len("/_simulator/"):].strip("/")
        try:
            result = self._control_action(method, name, payload)
        except _Reply as r:
            self._send_control(h, r.status, {"error": r.body.decode()})
            return
        except (ValueError, KeyError, TypeError) as exc:
            self._send_control(h, 400, {"error": f"{type(exc).__name__}: {exc}"})
            return
        self._send_control(h, 200, result)

    def _control_action(self, method: str, name: str, payload) -> dict:
        if name == "health" and method == "GET":
            return {"status": "ok", "leads": self.dataset.size, "seed": self.dataset.seed}
        if name == "stats" and method == "GET":
            return self.stats()
        if name == "reset_stats" and method == "POST":
            self.reset_stats()
            return {"ok": True}
        if name == "faults":
            if method == "GET":
                return {"faults": self.faults()}
            if method == "POST":
                if not isinstance(payload, dict):
                    raise ValueError("a fault rule is a JSON object")
                return {"id": self.add_fault(**payload)}
            if method == "DELETE":
                self.clear_faults()
                return {"ok": True}
        if name == "mutations" and method == "POST":
            if isinstance(payload, list):  # applied in order; the clock decides whether they share a second
                if not all(isinstance(m, dict) for m in payload):
                    raise ValueError("a mutation is a JSON object")
                return {"ok": True, "results": [self.dataset.apply_mutation(m) for m in payload]}
            if not isinstance(payload, dict):
                raise ValueError("a mutation is a JSON object (or a list of them)")
            return {"ok": True, **self.dataset.apply_mutation(payload)}
        if name == "clock":
            clock = self.dataset.clock
            if method == "POST":
                if not isinstance(payload, dict):
                    raise ValueError("a clock change is a JSON object")
                if "set" in payload:
                    clock.set(payload["set"], tick=bool(payload.get("tick", False)))
                elif "advance" in payload:
                    clock.advance(payload["advance"])
                elif payload.get("resume"):
                    clock.resume()
                else:
                    raise ValueError('expected {"set": ts[, "tick": bool]}, {"advance": s} or {"resume": true}')
            elif method != "GET":
                raise _Reply(405, b"GET or POST")
            return clock.state()
        if name == "latency" and method == "POST":
            self.set_latency(float(payload["ms"]))
            return {"ok": True, "ms": self._latency_s * 1000.0}
        if name == "rate_limit" and method == "POST":
            self.set_rate_limit(payload.get("rps"), payload.get("ban_after_violations"))
            return {"ok": True}
        raise _Reply(404, f"unknown control endpoint {method} /_simulator/{name}".encode())

    def _send_control(self, h: _Handler, status: int, obj) -> None:
        body = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
