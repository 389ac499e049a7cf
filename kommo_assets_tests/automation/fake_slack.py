"""A local stand-in for the Slack Web API over real HTTP: answers ``POST /api/chat.postMessage`` like Slack
does (``{"ok": true, ...}``) and records every request, so tests see exactly what would reach Slack."""

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: dict[str, str]
    raw_body: str
    body: dict


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode()
        if "json" in (self.headers.get("Content-Type") or ""):
            body = json.loads(raw or "{}")
        else:
            body = dict(parse_qsl(raw))
        self.server.fake.record(RecordedRequest(self.path, dict(self.headers.items()), raw, body))

        if not (self.headers.get("Authorization") or "").startswith("Bearer "):
            reply = {"ok": False, "error": "not_authed"}
        elif self.path == "/api/chat.postMessage":
            reply = {"ok": True, "channel": body.get("channel"), "ts": "1700000000.000100",
                     "message": {"type": "message", "text": body.get("text")}}
        else:
            reply = {"ok": False, "error": "unknown_method"}
        payload = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: "FakeSlack"


class FakeSlack:
    """``with FakeSlack() as slack:`` point ``SLACK_API_BASE_URL`` at ``slack.base_url``."""

    def __init__(self) -> None:
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self.base_url = ""

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def messages(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/api/chat.postMessage"]

    def start(self) -> "FakeSlack":
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        self.base_url = f"http://127.0.0.1:{server.server_address[1]}/api/"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fake-slack", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeSlack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
