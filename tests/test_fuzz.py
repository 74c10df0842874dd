"""Fuzzing every endpoint of the real server (gunicorn, 2 workers) with generated bad requests.

Whatever arrives, the answer is never a 5xx, an error is JSON saying what is wrong, and the server
still pre-labels correctly afterwards.
"""

from __future__ import annotations

import base64
import copy
import json
from collections import Counter

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import NER_CONFIG, region_tuples

USER, PASSWORD = "fuzz-user", "fuzz-pass-51c0"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
MAX_REQUEST_BYTES = 100_000
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

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=30),
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
        ["mutate", "mutate", "mutate", "json", "bytes", "config", "long_text", "huge", "deep", "auth", "method", "path", "ctype"]
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
    elif kind == "ctype":
        headers["Content-Type"] = draw(st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]))
    return "POST", endpoint, headers, json.dumps(body).encode()


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
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) >= 400, statuses  # they really were bad requests

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
