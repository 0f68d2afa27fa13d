"""skyspot.preemption against a loopback metadata server that is as strict as the clouds'.

The fake answers the three clouds' documented requests: AWS IMDSv2 (token PUT, 401
without a valid token, instance-action 404 then 200), GCP (403 without
``Metadata-Flavor: Google``, FALSE then TRUE) and Azure Scheduled Events (400 without
``Metadata: true`` or an api-version, an empty Events list then one event). Signal tests
run in a child process so that no handler leaks into pytest.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from skyspot.preemption import DEFAULT_METADATA_URL, METADATA_URL_ENV, Preemption, poll_once

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))  # tools/ is not a package
from metadata_server import (  # noqa: E402
    AWS_ACTION_PATH,
    AZURE_EVENT,
    AZURE_EVENTS_PATH,
    GCP_PREEMPTED_PATH,
    FakeMetadata,
)

CLOUDS = ["aws", "gcp", "azure"]

EXPECTED_DETAIL = {
    "aws": {"action": "terminate", "time": "2026-11-24T08:22:00Z"},
    "gcp": {"preempted": "TRUE"},
    "azure": {**AZURE_EVENT, "DocumentIncarnation": 2},
}


@pytest.fixture
def fake() -> Iterator[FakeMetadata]:
    server = FakeMetadata()
    yield server
    server.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as err:
        with err:
            return err.code


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fake_refuses_requests_without_the_required_headers(fake: FakeMetadata) -> None:
    # The poll_once tests below only pass if the client sends what each cloud demands.
    assert http_status(fake.url + AWS_ACTION_PATH) == 401
    assert http_status(fake.url + AWS_ACTION_PATH, {"X-aws-ec2-metadata-token": "bogus"}) == 401
    assert http_status(fake.url + GCP_PREEMPTED_PATH) == 403
    assert http_status(fake.url + AZURE_EVENTS_PATH + "?api-version=2020-07-01") == 400
    assert http_status(fake.url + AZURE_EVENTS_PATH, {"Metadata": "true"}) == 400
    assert sum(fake.gets.values()) == 0


@pytest.mark.parametrize("cloud", CLOUDS)
def test_poll_once_before_and_after_notice(fake: FakeMetadata, cloud: str) -> None:
    assert poll_once(cloud, fake.url) is None
    assert poll_once(cloud, fake.url + "/") is None  # a trailing slash is fine
    fake.notice = True
    assert poll_once(cloud, fake.url) == EXPECTED_DETAIL[cloud]
    assert fake.gets[cloud] == 3


@pytest.mark.parametrize("action", ["terminate", "stop", "hibernate"])
def test_every_aws_action_is_a_notice(fake: FakeMetadata, action: str) -> None:
    fake.aws_action, fake.notice = action, True
    assert poll_once("aws", fake.url) == {"action": action, "time": "2026-11-24T08:22:00Z"}


@pytest.mark.parametrize(
    ("event_type", "counts"),
    [
        ("Preempt", True),
        ("Terminate", True),
        ("Freeze", False),
        ("Reboot", False),
        ("Redeploy", False),
    ],
)
def test_azure_counts_only_events_that_end_the_vm(
    fake: FakeMetadata, event_type: str, counts: bool
) -> None:
    fake.azure_event_type, fake.notice = event_type, True
    detail = poll_once("azure", fake.url)
    if counts:
        assert detail is not None and detail["EventType"] == event_type
        assert detail["EventId"] == AZURE_EVENT["EventId"]
    else:
        assert detail is None


def test_gcp_answer_without_flavor_header_is_not_believed(fake: FakeMetadata) -> None:
    fake.gcp_flavor_header = False
    fake.notice = True
    with pytest.raises(ValueError, match="Metadata-Flavor"):
        poll_once("gcp", fake.url)


def test_poll_once_reports_errors_instead_of_no_notice(fake: FakeMetadata) -> None:
    with pytest.raises(OSError):
        poll_once("gcp", f"http://127.0.0.1:{closed_port()}")
    fake.broken = True
    with pytest.raises(OSError, match="HTTP 500"):
        poll_once("aws", fake.url)
    with pytest.raises(ValueError, match="lambda"):
        poll_once("lambda", fake.url)


@pytest.mark.parametrize("cloud", CLOUDS)
def test_poller_sets_flag_soon_after_notice(fake: FakeMetadata, cloud: str) -> None:
    handlers = [signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)]
    with Preemption(cloud, poll_interval_s=0.05, metadata_url=fake.url) as preemption:
        assert preemption.polling
        assert wait_until(lambda: fake.gets[cloud] >= 3)
        assert not preemption.requested and preemption.reason is None
        fake.notice = True
        noticed = time.monotonic()
        assert wait_until(lambda: preemption.requested, timeout_s=2.0)
        assert time.monotonic() - noticed < 2.0
        assert preemption.reason == f"notice:{cloud}"
        assert preemption.notice_detail == EXPECTED_DETAIL[cloud]
        assert preemption.requested_at == pytest.approx(time.time(), abs=2.0)
    assert not preemption.polling
    assert preemption.requested  # the flag outlives close()
    assert [signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)] == handlers


def test_aws_poller_reuses_its_token_and_renews_it_on_401(fake: FakeMetadata) -> None:
    with Preemption("aws", poll_interval_s=0.02, metadata_url=fake.url) as preemption:
        assert wait_until(lambda: fake.gets["aws"] >= 5)
        assert fake.token_puts == 1  # one 6-hour token serves every check
        fake.tokens.clear()  # the metadata service forgets it (expiry, say)
        fake.notice = True
        assert wait_until(lambda: preemption.requested)
    assert preemption.reason == "notice:aws"
    assert fake.token_puts == 2


def test_metadata_url_comes_from_the_environment(
    fake: FakeMetadata, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(METADATA_URL_ENV, raising=False)
    assert Preemption("aws").metadata_url == DEFAULT_METADATA_URL
    monkeypatch.setenv(METADATA_URL_ENV, fake.url)
    fake.notice = True
    with Preemption("gcp", poll_interval_s=0.05) as preemption:
        assert wait_until(lambda: preemption.requested)
    assert preemption.metadata_url == fake.url
    assert preemption.reason == "notice:gcp"


def test_unreachable_endpoint_warns_once_and_keeps_polling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    caplog.set_level(logging.DEBUG, logger="skyspot.preemption")

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "skyspot.preemption"]

    with Preemption("aws", poll_interval_s=0.02, metadata_url=url) as preemption:
        assert wait_until(lambda: len(failures()) >= 5)
        assert preemption.polling  # errors did not end the poller
        assert not preemption.requested
    assert not preemption.polling
    records = failures()
    warnings = [r for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "unavailable" in warnings[0].getMessage()
    assert all(r.levelno == logging.DEBUG for r in records if r is not warnings[0])


def test_poller_survives_server_errors_then_sees_notice(
    fake: FakeMetadata, caplog: pytest.LogCaptureFixture
) -> None:
    fake.broken = True
    caplog.set_level(logging.WARNING, logger="skyspot.preemption")
    with Preemption("azure", poll_interval_s=0.02, metadata_url=fake.url) as preemption:
        time.sleep(0.2)  # about ten failed checks
        assert not preemption.requested and preemption.polling
        fake.broken, fake.notice = False, True
        assert wait_until(lambda: preemption.requested)
    assert preemption.notice_detail == EXPECTED_DETAIL["azure"]
    messages = [r.getMessage() for r in caplog.records if r.name == "skyspot.preemption"]
    assert len([m for m in messages if "unavailable" in m]) == 1
    assert len([m for m in messages if "preemption notice from azure" in m]) == 1


@pytest.mark.parametrize(("cloud", "poll"), [(None, True), ("lambda", True), ("aws", False)])
def test_no_poller_without_a_supported_cloud(cloud: str | None, poll: bool) -> None:
    with Preemption(cloud, poll_interval_s=0.05, poll=poll) as preemption:
        assert not preemption.polling
        names = [thread.name for thread in threading.enumerate()]
        assert "skyspot-preemption-poller" not in names
        assert not preemption.requested


def test_request_by_hand_keeps_the_first_reason() -> None:
    preemption = Preemption()
    assert (preemption.requested, preemption.reason, preemption.requested_at) == (False, None, None)
    preemption.request("tool")
    preemption.request("SIGTERM")
    assert preemption.requested and preemption.reason == "tool"
    assert preemption.requested_at == pytest.approx(time.time(), abs=1.0)


def test_install_only_from_the_main_thread() -> None:
    errors: list[BaseException] = []

    def install() -> None:
        try:
            Preemption().install()
        except BaseException as err:  # collected for the assertion below
            errors.append(err)

    thread = threading.Thread(target=install)
    thread.start()
    thread.join(timeout=5)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)


# Installs Preemption, signals itself, reports, closes, then signals itself again: with the
# previous handler back, that second signal must end the process the default way.
SIGNAL_CHILD = r"""
import json, os, signal, sys, time
from skyspot.preemption import Preemption

sig = signal.Signals[sys.argv[1]]
# As a process started in the foreground has them: a shell without job control starts a
# background job (`make test &`) with SIGINT ignored, and this child would inherit that.
signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
before = signal.getsignal(sig)
preemption = Preemption(None).install()
os.kill(os.getpid(), sig)
deadline = time.monotonic() + 5
while not preemption.requested and time.monotonic() < deadline:
    time.sleep(0.001)
preemption.close()
print(json.dumps({"requested": preemption.requested, "reason": preemption.reason,
                  "restored": signal.getsignal(sig) == before}), flush=True)
os.kill(os.getpid(), sig)
time.sleep(5)
print("survived the second signal", flush=True)
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_signal_sets_flag_without_killing_and_close_restores(name: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.run(
        [sys.executable, "-c", SIGNAL_CHILD, name],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=15,
    )
    first_line = child.stdout.splitlines()[0] if child.stdout else ""
    assert json.loads(first_line) == {"requested": True, "reason": name, "restored": True}, (
        child.stderr
    )
    assert "survived" not in child.stdout
    # Default SIGTERM kills; Python's default SIGINT handler raises KeyboardInterrupt,
    # and an unhandled one makes the interpreter exit by SIGINT too.
    assert child.returncode == -signal.Signals[name]
