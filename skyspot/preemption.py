"""SIGTERM/SIGINT flags and the clouds' spot-preemption notices.

Guarantee: from the moment a SIGTERM, a SIGINT or the cloud's preemption notice
reaches the process, ``Preemption.requested`` is True and stays True, with the first
``reason`` kept ("SIGTERM", "SIGINT", "notice:aws", ...). Nothing here kills the
process or raises into the training loop: the signal handlers only record the signal,
and a metadata endpoint that is unreachable or answers nonsense costs one warning line
(logger ``skyspot.preemption``) and nothing else; polling goes on quietly.

Why both sources: SkyPilot and the OS deliver SIGTERM when the VM shuts down, but the
clouds announce a spot preemption earlier through their metadata servers (AWS two
minutes ahead, Azure at least 30 s, GCP about 30 s), and that head start is what lets a
checkpoint be written before the VM goes away. What each cloud's notice looks like:

- AWS (IMDSv2): ``PUT /latest/api/token`` gives a session token; with it,
  ``GET /latest/meta-data/spot/instance-action`` is 404 until a notice and then 200 with
  ``{"action": "terminate"|"stop"|"hibernate", "time": "...Z"}``. Every action ends this
  VM's run, so any 200 counts.
- GCP: ``GET /computeMetadata/v1/instance/preempted`` (header ``Metadata-Flavor:
  Google``) is ``FALSE`` until the instance is preempted, then ``TRUE``. The answer must
  carry ``Metadata-Flavor: Google`` too, as the real server's does, so that a proxy or
  captive portal answering on that address is not believed.
- Azure Scheduled Events: ``GET /metadata/scheduledevents?api-version=2020-07-01``
  (header ``Metadata: true``) lists the upcoming events. ``Preempt`` (a Spot eviction)
  counts, and so does ``Terminate`` (the VM is about to be deleted, e.g. a scale-set
  scale-in): in both the VM and its local state are gone, and saving now is the only
  way to keep the steps since the last checkpoint. ``Freeze`` (a pause of seconds),
  ``Reboot`` and ``Redeploy`` (platform maintenance) do not count. ``Resources`` is not
  filtered to this VM's name: Azure sends an event to every VM of an availability set or
  scale-set placement group, and in a multi-node job a peer's eviction ends the job
  for all nodes anyway; the event (with its ``Resources``) is kept in ``notice_detail``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from email.message import Message
from types import FrameType, TracebackType

logger = logging.getLogger("skyspot.preemption")

DEFAULT_METADATA_URL = "http://169.254.169.254"
METADATA_URL_ENV = "SKYSPOT_METADATA_URL"
SUPPORTED_CLOUDS = ("aws", "gcp", "azure")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# IMDSv2 token lifetime in seconds (21600 = 6 h, the maximum AWS allows). It is
# refreshed _AWS_TOKEN_MARGIN_S seconds before it runs out, and at once on a 401.
_AWS_TOKEN_TTL_S = 21600
_AWS_TOKEN_MARGIN_S = 60.0
# Metadata servers answer in milliseconds; past this many seconds one is not answering.
_TIMEOUT_S = 2.0
_AZURE_API_VERSION = "2020-07-01"
_AZURE_NOTICE_TYPES = ("Preempt", "Terminate")
# Metadata answers are a few hundred bytes; cap reads so a misbehaving endpoint cannot
# make the poller buffer without bound (bytes).
_MAX_BODY = 1 << 20

# The metadata servers are link-local: never send these requests through an
# http_proxy from the environment (AWS also refuses token PUTs that carry
# X-Forwarded-For, which proxies add).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def poll_once(cloud: str, base_url: str, timeout_s: float = _TIMEOUT_S) -> dict | None:
    """Ask ``cloud``'s metadata server at ``base_url`` once for a preemption notice.

    Returns None when there is no notice, else what the cloud said (AWS: the
    instance-action JSON; GCP: ``{"preempted": "TRUE"}``; Azure: the event, plus
    ``DocumentIncarnation``). Raises ``ValueError`` for a cloud not in
    ``SUPPORTED_CLOUDS`` or an answer that cannot be read, and ``OSError`` (urllib's
    errors included) when the endpoint is unreachable, times out or answers with an
    unexpected HTTP status: "could not ask" is never reported as "no notice".
    """
    return _Checker(cloud, base_url, timeout_s).check()


class Preemption:
    """A sticky "stop soon" flag, set by SIGTERM, SIGINT, the cloud's notice or by hand.

    The trainer checks ``requested`` at step boundaries; when it is True it saves and
    exits with ``skyspot.PREEMPTED_EXIT_CODE``.
    """

    def __init__(
        self,
        cloud: str | None = None,
        *,
        poll_interval_s: float = 5.0,
        metadata_url: str | None = None,
        poll: bool = True,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self.cloud = cloud.lower() if cloud else None
        # 5 s is the polling period AWS recommends for its two-minute notice.
        self.poll_interval_s = poll_interval_s
        base = metadata_url or os.environ.get(METADATA_URL_ENV) or DEFAULT_METADATA_URL
        self.metadata_url = base.rstrip("/")
        self.poll = poll
        #: What the cloud said (see ``poll_once``), for the event log; None until a notice.
        self.notice_detail: dict | None = None
        # (reason, Unix time) of each request; only the first one is read. A list append
        # is atomic under the GIL, so the signal handler needs no lock, which matters
        # because the code it interrupts may hold any lock.
        self._requests: list[tuple[str, float]] = []
        self._previous: dict[int, object] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def requested(self) -> bool:
        return bool(self._requests)

    @property
    def reason(self) -> str | None:
        """The first reason recorded: "SIGTERM", "SIGINT", "notice:<cloud>" or a request's."""
        return self._requests[0][0] if self._requests else None

    @property
    def requested_at(self) -> float | None:
        """Unix time (s) of the first request, or None."""
        return self._requests[0][1] if self._requests else None

    @property
    def polling(self) -> bool:
        """True while the notice poller thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def request(self, reason: str) -> None:
        """Set the flag by hand (tests, tools). A reason already recorded is kept."""
        if not self._requests:
            self._requests.append((reason, time.time()))

    def install(self) -> Preemption:
        """Take over SIGTERM and SIGINT and start the notice poller; returns self.

        Must run in the main thread (Python delivers signals only there). Calling it
        again while installed does nothing. While installed, SIGINT and SIGTERM never
        stop the process by themselves: the trainer must check ``requested``; a process
        that hangs needs SIGKILL.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Preemption.install() must be called from the main thread")
        if self._previous:
            return self
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        if self.poll and self.cloud in SUPPORTED_CLOUDS:
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._poll_loop, name="skyspot-preemption-poller", daemon=True
            )
            self._thread.start()
        elif self.poll and self.cloud:
            logger.info("no preemption notices for cloud %r; watching signals only", self.cloud)
        return self

    def close(self) -> None:
        """Stop the poller and restore the previous signal handlers. The flag stays set."""
        self._stop.set()
        if self._thread is not None:
            # One check is at most three requests (AWS: token, 401, token again) of
            # _TIMEOUT_S each; a poller stuck longer is a daemon and dies with the process.
            self._thread.join(timeout=3 * _TIMEOUT_S + 1.0)
            self._thread = None
        if self._previous and threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Preemption.close() must be called from the main thread")
        for sig, previous in self._previous.items():
            # None means the handler was set outside Python; the default is the best
            # that can be put back.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def __enter__(self) -> Preemption:
        return self.install()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes of whatever it interrupted:
        # record and return. No I/O, no logging, no locks.
        self.request("SIGTERM" if signum == signal.SIGTERM else "SIGINT")

    def _poll_loop(self) -> None:
        checker = _Checker(self.cloud or "", self.metadata_url, _TIMEOUT_S)
        warned = False
        while not self._stop.is_set():
            try:
                detail = checker.check()
            except Exception as err:  # whatever goes wrong here must never end training
                if not warned:
                    logger.warning(
                        "preemption notices from %s at %s unavailable (%s); will keep trying"
                        " quietly",
                        self.cloud,
                        self.metadata_url,
                        err,
                    )
                    warned = True
                else:
                    logger.debug("preemption poll failed: %s", err)
            else:
                if detail is not None:
                    self.notice_detail = detail
                    self.request(f"notice:{self.cloud}")
                    logger.warning("preemption notice from %s: %s", self.cloud, detail)
                    return  # a notice is final: nothing later can make the VM stay
            self._stop.wait(self.poll_interval_s)


class _Checker:
    """One cloud's notice check, keeping what is worth keeping between checks (AWS's token)."""

    def __init__(self, cloud: str, base_url: str, timeout_s: float) -> None:
        if cloud not in SUPPORTED_CLOUDS:
            raise ValueError(
                f"no preemption notices for cloud {cloud!r}; "
                f"supported: {', '.join(SUPPORTED_CLOUDS)}"
            )
        self.cloud = cloud
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._aws_token: str | None = None
        self._aws_token_expires = 0.0  # time.monotonic() seconds

    def check(self) -> dict | None:
        if self.cloud == "aws":
            return self._aws()
        if self.cloud == "gcp":
            return self._gcp()
        return self._azure()

    def _aws(self) -> dict | None:
        url = f"{self.base_url}/latest/meta-data/spot/instance-action"
        for attempt in range(2):
            headers = {"X-aws-ec2-metadata-token": self._aws_session_token()}
            status, _, body = _http("GET", url, headers, self.timeout_s)
            if status == 401 and attempt == 0:
                self._aws_token = None  # expired or revoked: get a new one and ask again
                continue
            break
        if status == 404:
            return None
        if status != 200:
            raise OSError(f"GET {url}: HTTP {status}")
        try:
            detail = json.loads(body)
        except json.JSONDecodeError:
            detail = None
        # A 200 is the notice; an unreadable body does not make it less of one.
        return detail if isinstance(detail, dict) else {"raw": body}

    def _aws_session_token(self) -> str:
        if self._aws_token is None or time.monotonic() >= self._aws_token_expires:
            url = f"{self.base_url}/latest/api/token"
            headers = {"X-aws-ec2-metadata-token-ttl-seconds": str(_AWS_TOKEN_TTL_S)}
            status, _, body = _http("PUT", url, headers, self.timeout_s)
            if status != 200 or not body.strip():
                raise OSError(f"PUT {url}: HTTP {status}")
            self._aws_token = body.strip()
            self._aws_token_expires = time.monotonic() + _AWS_TOKEN_TTL_S - _AWS_TOKEN_MARGIN_S
        return self._aws_token

    def _gcp(self) -> dict | None:
        url = f"{self.base_url}/computeMetadata/v1/instance/preempted"
        status, headers, body = _http("GET", url, {"Metadata-Flavor": "Google"}, self.timeout_s)
        if status != 200:
            raise OSError(f"GET {url}: HTTP {status}")
        if headers.get("Metadata-Flavor") != "Google":
            raise ValueError(
                f"GET {url}: answer lacks 'Metadata-Flavor: Google'; not the GCP metadata server"
            )
        value = body.strip().upper()
        if value == "FALSE":
            return None
        if value == "TRUE":
            return {"preempted": "TRUE"}
        raise ValueError(f"GET {url}: expected TRUE or FALSE, got {body[:80]!r}")

    def _azure(self) -> dict | None:
        url = f"{self.base_url}/metadata/scheduledevents?api-version={_AZURE_API_VERSION}"
        status, _, body = _http("GET", url, {"Metadata": "true"}, self.timeout_s)
        if status != 200:
            raise OSError(f"GET {url}: HTTP {status}")
        try:
            doc = json.loads(body)
        except json.JSONDecodeError as err:
            raise ValueError(f"GET {url}: not JSON ({err})") from err
        events = doc.get("Events") if isinstance(doc, dict) else None
        if not isinstance(events, list):
            raise ValueError(f"GET {url}: no 'Events' list in {body[:80]!r}")
        for event in events:
            if isinstance(event, dict) and event.get("EventType") in _AZURE_NOTICE_TYPES:
                return {**event, "DocumentIncarnation": doc.get("DocumentIncarnation")}
        return None


def _http(
    method: str, url: str, headers: dict[str, str], timeout_s: float
) -> tuple[int, Message, str]:
    """(status, response headers, body) for any HTTP status; OSError if no answer."""
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            return response.status, response.headers, _text(response.read(_MAX_BODY))
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, _text(err.read(_MAX_BODY))


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")
