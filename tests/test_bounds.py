"""Bounds of the open mode (issue 26, item 3): what one client can make a worker hold.

- examples per project by the size of their texts (MAX_EXAMPLE_CHARS) as well as by count;
- request bodies read at once per worker (REQUEST_BODY_BUDGET): one over the budget waits
  REQUEST_BODY_WAIT, then gets 503 with Retry-After; the budget comes back when a request ends.
(Label configs created per hour by /setup: tests/test_trust.py. The memory figure:
benchmarks/bench_body_memory.py, docs/benchmarks.md.)
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse

import httpx
import pytest

from tests.conftest import annotation_event, span
from tests.processes import wait_until


def test_examples_per_project_are_capped_by_the_characters_of_their_texts(make_client, settings):
    from backend.infra.storage import Database
    from backend.learning.store import ExampleStore

    client = make_client(setup_project="7", max_example_chars=100)
    text = "Jordan signed with the Chicago Bulls in 1984."  # 45 characters
    for i in (1, 2):
        assert client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", i, i, text, [])).json["outcome"] == "stored"
    third = client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 3, 3, text, []))
    assert third.status_code == 201 and third.json["outcome"].startswith("full"), third.json
    # a held annotation still updates
    update = annotation_event("ANNOTATION_UPDATED", 1, 1, text, [span(text, "Jordan", "PER")], updated_at="2025-02-01T00:00:00Z")
    assert client.post("/webhook", json=update).json["outcome"] == "stored"
    examples = ExampleStore(Database.in_dir(settings.model_dir), "7").examples()
    assert sorted(e.annotation_id for e in examples) == [1, 2]


def test_a_setting_below_max_request_bytes_is_refused_at_start(make_settings):
    from backend.infra.errors import ConfigError

    with pytest.raises(ConfigError, match="REQUEST_BODY_BUDGET"):
        make_settings(max_request_bytes=2_000_000, request_body_budget=1_000_000)
    assert make_settings(max_request_bytes=100_000_000).request_body_budget == 100_000_000  # unset: grows with it


def _held_body(url: str, length: int) -> socket.socket:
    """A client that sends its headers and the start of a large body, then holds the rest."""
    address = urlparse(url)
    sock = socket.create_connection((address.hostname, address.port))
    head = (f"POST /webhook HTTP/1.1\r\nHost: {address.hostname}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n")
    sock.sendall(head.encode() + b'{"action": "X", "project": {"id": 1}, "pad": "' + b"x" * 100_000)
    return sock


def test_bodies_beyond_the_workers_budget_get_503_with_retry_after_until_it_is_given_back(backend_factory):
    backend = backend_factory(workers=1, MAX_REQUEST_BYTES="2000000", REQUEST_BODY_BUDGET="2000000", REQUEST_BODY_WAIT="0")
    body = b'{"action": "X", "project": {"id": 1}, "pad": "' + b"x" * 1_000_000 + b'"}'
    post = lambda: httpx.post(backend.url + "/webhook", content=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert post().status_code == 200  # an unknown project: ignored, after its body was read
    held = _held_body(backend.url, 1_500_000)
    try:
        busy = []
        assert wait_until(lambda: busy.append(post()) or busy[-1].status_code == 503, 60), [r.status_code for r in busy]
        assert int(busy[-1].headers["Retry-After"]) > 0 and "REQUEST_BODY_BUDGET" in busy[-1].json()["error"]
        small = httpx.post(backend.url + "/webhook", json={"action": "X", "project": {"id": 1}}, timeout=60)
        assert small.status_code == 200  # a small body never waits for the budget
        assert httpx.get(backend.url + "/health", timeout=60).status_code == 200
    finally:
        held.close()  # the held request ends (its body never came): the budget is given back
    assert wait_until(lambda: post().status_code == 200, 60)
