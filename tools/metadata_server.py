"""A loopback metadata server that announces spot preemptions the way the clouds do.

    server = FakeMetadata()          # serves on 127.0.0.1:<free port>, in a daemon thread
    env["SKYSPOT_METADATA_URL"] = server.url
    server.notice = True             # from now on every cloud's endpoint announces it
    server.close()

It answers the three clouds' documented requests, and is as strict as they are, so a client
that passes against it sends what the real endpoints demand:

- AWS IMDSv2: ``PUT /latest/api/token`` (TTL header 1..21600 required) gives a token;
  ``GET /latest/meta-data/spot/instance-action`` is 401 without a valid token, 404 until the
  notice, then 200 with ``{"action": ..., "time": ...}``.
- GCP: ``GET /computeMetadata/v1/instance/preempted`` is 403 without ``Metadata-Flavor:
  Google``, then ``FALSE`` until the notice and ``TRUE`` after; the answer carries the
  header too (unless ``gcp_flavor_header`` is False, to test clients that check it).
- Azure Scheduled Events: ``GET /metadata/scheduledevents?api-version=...`` is 400 without
  ``Metadata: true`` or an api-version; an empty ``Events`` list until the notice, then one
  event of type ``azure_event_type``.

Used by tests/test_preemption.py and by tools/rehearse.py (``--preempt-at ...:notice``).
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

AWS_ACTION_PATH = "/latest/meta-data/spot/instance-action"
GCP_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
AZURE_EVENTS_PATH = "/metadata/scheduledevents"
AZURE_EVENT = {
    "EventId": "602d9444-d2cd-49c7-8624-8643e7171297",
    "EventType": "Preempt",
    "ResourceType": "VirtualMachine",
    "Resources": ["sky-1234-head"],
    "EventStatus": "Scheduled",
    "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT",
    "Description": "",
    "EventSource": "Platform",
    "DurationInSeconds": -1,
}


class FakeMetadata:
    """One loopback HTTP server speaking all three clouds' metadata protocols."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.notice = False  # flip to True to announce the preemption
        self.broken = False  # True: every request gets HTTP 500
        self.aws_action = "terminate"
        self.azure_event_type = "Preempt"
        self.gcp_flavor_header = True
        self.tokens: set[str] = set()
        self.token_puts = 0
        self.gets: Counter[str] = Counter()  # cloud -> notice GETs answered
        self.server = ThreadingHTTPServer((host, 0), _FakeHandler)
        self.server.fake = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class _FakeHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep callers' output clean
        pass

    def _send(self, status: int, body: str = "", headers: dict[str, str] | None = None) -> None:
        data = body.encode()
        self.send_response(status)
        for name, value in (headers or {"Content-Type": "text/plain"}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        fake: FakeMetadata = self.server.fake  # type: ignore[attr-defined]
        if fake.broken:
            return self._send(500)
        if self.path != "/latest/api/token":
            return self._send(404)
        # IMDSv2: the TTL header is required and must be 1..21600 seconds.
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return self._send(400)
        token = secrets.token_urlsafe(24)
        fake.tokens.add(token)
        fake.token_puts += 1
        self._send(200, token)

    def do_GET(self) -> None:
        fake: FakeMetadata = self.server.fake  # type: ignore[attr-defined]
        if fake.broken:
            return self._send(500)
        path, _, query = self.path.partition("?")
        if path == AWS_ACTION_PATH:
            if self.headers.get("X-aws-ec2-metadata-token") not in fake.tokens:
                return self._send(401)
            fake.gets["aws"] += 1
            if not fake.notice:
                return self._send(404)
            action = {"action": fake.aws_action, "time": "2026-11-24T08:22:00Z"}
            return self._send(200, json.dumps(action))
        if path == GCP_PREEMPTED_PATH:
            flavor = {"Metadata-Flavor": "Google"} if fake.gcp_flavor_header else {}
            if self.headers.get("Metadata-Flavor") != "Google":
                return self._send(403, headers=flavor)
            fake.gets["gcp"] += 1
            return self._send(200, "TRUE" if fake.notice else "FALSE", flavor)
        if path == AZURE_EVENTS_PATH:
            if self.headers.get("Metadata") != "true" or "api-version=" not in query:
                return self._send(400)
            fake.gets["azure"] += 1
            events = [{**AZURE_EVENT, "EventType": fake.azure_event_type}] if fake.notice else []
            doc = {"DocumentIncarnation": 2 if fake.notice else 1, "Events": events}
            return self._send(200, json.dumps(doc), {"Content-Type": "application/json"})
        self._send(404)
