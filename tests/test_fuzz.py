"""Fuzzing every endpoint of the real server (gunicorn, 2 workers) with generated bad requests.

Whatever arrives, the answer is never a 5xx, an error is JSON saying what is wrong, and the server
still pre-labels correctly afterwards. Besides shapes and types, the requests carry the sizes and
numbers an independent probe broke the server with: ids beyond 64 bits, NaN and Infinity, times far
ahead, lone surrogates, id lists of up to 150,000, thousands of regions, texts over MAX_TEXT_CHARS,
chunked bodies with malformed chunks or over MAX_REQUEST_BYTES.
"""

from __future__ import annotations

import base64
import copy
import json
import socket
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import NER_CONFIG, region_tuples

USER, PASSWORD = "fuzz-user", "fuzz-pass-51c0"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
MAX_REQUEST_BYTES = 2_000_000
MAX_TEXT_CHARS = 2_000
EXAMPLES = 700

VALID = {
    "/setup": {"project": "1", "schema": NER_CONFIG, "hostname": "http://ls", "access_token": "t", "extra_params": "{}"},
    "/predict": {"tasks": [{"id": 1, "data": {"text": "Ada Lovelace"}}], "project": "1.1700000000", "label_config": NER_CONFIG,
                 "params": {"login": None, "password": None, "context": None}},
    "/webhook": {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": 1, "task": 1, "result": [{"from_name": "label", "to_name": "text", "type": "labels",
                                                       "value": {"start": 0, "end": 3, "text": "Ada", "labels": ["PER"]}}]},
        "task": {"id": 1, "data": {"text": "Ada wrote."}},
        "project": {"id": 1},
    },
}
# where in each valid body a generated value is put (or the key removed)
PATHS = {
    "/setup": [("project",), ("schema",), ("extra_params",), ("hostname",), ("access_token",), ("model_version",)],
    "/predict": [("tasks",), ("project",), ("label_config",), ("tasks", 0), ("tasks", 0, "data"), ("tasks", 0, "id"),
                 ("tasks", 0, "data", "text"), ("params",), ("params", "context"), ("context",)],
    "/webhook": [("action",), ("project",), ("project", "id"), ("annotation",), ("annotation", "result"),
                 ("annotation", "result", 0, "value"), ("annotation", "result", 0, "value", "start"), ("task",),
                 ("task", "data"), ("task", "data", "text"), ("annotation", "task")],
}

# text with lone surrogates too (json.dumps writes them as \udXXX escapes, which are not valid JSON text)
any_text = st.text(alphabet=st.characters(codec=None, categories=None), max_size=30)
# the numbers the probe used: ids around SQLite's 64-bit limit, NaN and infinities, absurd times
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 2**63 - 1, 2**63, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["NaN", "1e300", "9999-12-31T00:00:00Z", "2999-01-01", "1970-01-01T00:00:00Z", "", "soon"]),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
TAGS = ["View", "Labels", "Label", "Text", "Foo", "Image", "Choices", "HyperText", "script", "Relations"]
label_configs = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda tags, names, values: "<View>" + "".join(
            f'<{t} name="{n}" toName="{n}" value="{v}"/>' for t, n, v in zip(tags, names, values)
        ) + "</View>",
        st.lists(st.sampled_from(TAGS), max_size=5), st.lists(st.text(max_size=6), max_size=5),
        st.lists(st.sampled_from(["$text", "text", "$", "PER", "", "$x"]), max_size=5),
    ),
    st.just('<View><Labels name="l" toName="t"><Label value="A"/></Labels><Text name="t" value="$text"/>'),  # unclosed
    st.just('<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><View>&b;</View>'),
)


def put(body: dict, path: tuple, value: object, delete: bool) -> dict:
    body = copy.deepcopy(body)
    node = body
    for key in path[:-1]:
        node = node[key]
    if delete:
        node.pop(path[-1], None) if isinstance(node, dict) else node.pop(path[-1])
    else:
        node[path[-1]] = value
    return body


@st.composite
def bad_requests(draw):
    """(method, path, headers, content) of one request that is wrong in one generated way."""
    endpoint = draw(st.sampled_from(["/setup", "/predict", "/webhook"]))
    kind = draw(st.sampled_from(
        ["mutate", "mutate", "mutate", "json", "bytes", "config", "long_text", "huge", "deep", "auth", "method", "path", "ctype",
         "numbers", "numbers", "sizes", "chunked"]
    ))
    headers = {"Content-Type": "application/json", **AUTH}
    body: object = VALID[endpoint]
    if kind == "mutate":
        path = draw(st.sampled_from(PATHS[endpoint]))
        body = put(VALID[endpoint], path, draw(json_values), delete=draw(st.booleans()))
    elif kind == "json":
        body = draw(json_values)
    elif kind == "bytes":
        return "POST", endpoint, headers, draw(st.binary(max_size=200))
    elif kind == "config":
        endpoint = draw(st.sampled_from(["/setup", "/predict"]))
        key = "schema" if endpoint == "/setup" else "label_config"
        body = put(VALID[endpoint], (key,), draw(label_configs), delete=False)
    elif kind == "long_text":
        endpoint = "/predict"
        size = draw(st.integers(MAX_TEXT_CHARS + 1, MAX_TEXT_CHARS * 20))
        body = put(VALID["/predict"], ("tasks", 0, "data", "text"), "Ada " * (size // 4 + 1), delete=False)
    elif kind == "huge":
        return "POST", endpoint, headers, b'{"x": "' + b"a" * (MAX_REQUEST_BYTES + draw(st.integers(1, 50_000))) + b'"}'
    elif kind == "deep":
        depth = draw(st.integers(1_000, 19_000))  # within MAX_REQUEST_BYTES: the decoder, not the size limit, is tested
        return "POST", endpoint, headers, (b"[" * depth + b"]" * depth) if draw(st.booleans()) else (b'{"a":' * depth)
    elif kind == "auth":
        headers = {"Content-Type": "application/json"}
        choice = draw(st.sampled_from(["none", "wrong", "garbage", "bearer"]))
        if choice == "wrong":
            creds = f"{draw(st.text(max_size=12))}:{draw(st.text(max_size=12))}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(creds).decode()
        elif choice == "garbage":
            headers["Authorization"] = "Basic " + draw(st.text(alphabet="abc!@#=:", min_size=1, max_size=20))
        elif choice == "bearer":
            headers["Authorization"] = "Bearer " + draw(st.text(alphabet="abcdef0123", min_size=1, max_size=20))
        endpoint = draw(st.sampled_from(["/setup", "/predict", "/metrics"]))
    elif kind == "method":
        method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]))
        return method, draw(st.sampled_from(["/setup", "/predict", "/webhook", "/health", "/metrics"])), headers, b"{}"
    elif kind == "path":
        odd = st.sampled_from(["//", "////setup", "//predict", "/%", "/%zz", "/..", "/setup/..", "/predict%00"])
        return "POST", draw(odd | st.text(alphabet="abcxyz/._-%", max_size=20).map(lambda p: "/" + p)), headers, b"{}"
    elif kind == "numbers":  # a generated number (or time) where an id or a time goes
        endpoint = draw(st.sampled_from(["/predict", "/webhook", "/webhook"]))
        where = {"/predict": [("tasks", 0, "id")],
                 "/webhook": [("annotation", "id"), ("annotation", "task"), ("task", "id"), ("annotation", "updated_at"),
                              ("annotation", "result", 0, "value", "end")]}[endpoint]
        body = put(VALID[endpoint], draw(st.sampled_from(where)), draw(numbers), delete=False)
    elif kind == "sizes":  # events as large as one webhook may be, or larger
        endpoint = "/webhook"
        event = draw(st.sampled_from(["deleted", "regions", "text", "tasks"]))
        if event == "deleted":
            count = draw(st.sampled_from([0, 1, 1000, 100_000, 100_001, 150_000]))
            annotations = [{"id": i} for i in range(1, count + 1)]
            body = {"action": "ANNOTATIONS_DELETED", "annotations": annotations, "project": {"id": 1}}
        elif event == "regions":
            region = VALID["/webhook"]["annotation"]["result"][0]
            regions = [region] * draw(st.sampled_from([5000, 5001, 9000]))
            body = put(VALID["/webhook"], ("annotation", "result"), regions, delete=False)
        elif event == "text":
            text = "Ada " * draw(st.integers(MAX_TEXT_CHARS // 4, MAX_TEXT_CHARS))
            body = put(VALID["/webhook"], ("task", "data", "text"), text, delete=False)
        else:
            tasks = [{"id": i, "data": {"text": "Ada"}} for i in range(draw(st.sampled_from([0, 10, 1001])))]
            body = {"action": "TASKS_CREATED", "tasks": tasks, "project": {"id": 1}}
    elif kind == "chunked":  # sent raw: a malformed chunk size, or more than MAX_REQUEST_BYTES in chunks
        endpoint = draw(st.sampled_from(["/setup", "/predict", "/webhook"]))
        if draw(st.booleans()):
            chunks = draw(st.sampled_from([b"zz\r\n{}\r\n0\r\n\r\n", b"-5\r\n{}\r\n0\r\n\r\n", b"5\r\n{}\r\n",
                                           b"ffffffffffffffffffff\r\n{}\r\n0\r\n\r\n"]))
        else:
            piece = b"a" * 65536
            count = MAX_REQUEST_BYTES // len(piece) + 2
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(count)) + b"0\r\n\r\n"
        return "CHUNKED", endpoint, headers, chunks
    elif kind == "ctype":
        headers["Content-Type"] = draw(st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]))
    return "POST", endpoint, headers, json.dumps(body).encode()


def send_chunked(url: str, path: str, headers: dict[str, str], chunks: bytes) -> httpx.Response:
    """POST with Transfer-Encoding: chunked, the chunks as given (httpx only sends well-formed ones)."""
    host, port = url.removeprefix("http://").split(":")
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        try:
            sock.sendall(head.encode() + chunks)
            sock.shutdown(socket.SHUT_WR)  # all sent: a body cut short ends here, not at the server's read timeout
        except OSError:
            pass  # refused and closed before the whole body was sent: the answer is still to be read
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    body = rest.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in rest else b""
    return httpx.Response(int(status_line.split()[1]), content=body)


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")  # megabyte bodies have long reprs
def test_hundreds_of_generated_bad_requests_get_4xx_json_never_5xx_and_the_server_still_works(backend_factory, llm):
    backend = backend_factory(
        workers=2, BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD,
        MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES), MAX_TEXT_CHARS=str(MAX_TEXT_CHARS),
    )
    http = httpx.Client(base_url=backend.url, timeout=60)
    assert http.post("/setup", json=VALID["/setup"], headers=AUTH).status_code == 200  # project 1 is known
    statuses: Counter = Counter()
    failures: list[str] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(bad_requests())
    def send(request):
        method, path, headers, content = request
        if method == "CHUNKED":
            response = send_chunked(backend.url, path, headers, content)
        else:
            # an absolute URL: httpx refuses a relative one whose path starts with "//", the server must not
            response = http.request(method, backend.url + path, headers=headers, content=content)
        statuses[response.status_code] += 1
        if response.status_code >= 500:
            failures.append(f"{method} {path} {content[:120]!r} -> {response.status_code} {response.text[:200]}")
        elif response.status_code >= 400:
            error = response.json().get("error")
            assert isinstance(error, str) and error and "Traceback" not in error, (path, response.text)

    send()
    print("statuses of the generated requests:", dict(statuses))
    assert not failures, "\n".join(failures[:10])
    assert sum(statuses.values()) >= 500
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) >= 350, statuses  # they really were bad requests
    assert {400, 413} <= set(statuses), statuses

    # still correct afterwards: exact pre-labels, health, and no worker died on the way
    llm.gazetteer = {"Ada Lovelace": "PER", "London": "LOC"}
    assert http.get("/health").json()["status"] == "UP"
    http.post("/setup", json={"project": "2", "schema": NER_CONFIG}, headers=AUTH)
    text = "Ada Lovelace lived in London."
    response = http.post("/predict", json={"tasks": [{"id": 9, "data": {"text": text}}], "project": "2.1"}, headers=AUTH)
    assert response.status_code == 200
    (entry,) = response.json()["results"]
    assert region_tuples(entry["result"], "start", "end", "label") == [(0, 12, "PER"), (22, 28, "LOC")]
    log = backend.log()
    assert "Traceback" not in log and "unexpected error" not in log
    assert log.count("Booting worker") == 2, "a worker crashed and was restarted"
