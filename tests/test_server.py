"""The protocol endpoints, driven through Flask's test client; the LLM is the fake HTTP server."""

import json

import pytest

from tests.conftest import NER_CONFIG, predict, region_tuples, region_tuples_per_task
from tests.fake_llm import Reply, entities_reply


def setup_project(client, project="7", config=NER_CONFIG, **extra):
    return client.post("/setup", json={"project": project, "schema": config, "hostname": "http://ls", "access_token": "tok", **extra})



def test_health_answers_up(client):
    response = client.get("/health")
    assert response.status_code == 200 and response.json["status"] == "UP"


@pytest.mark.parametrize("extra_params", [None, "", '{"temperature": 0}', {"temperature": 0}])
def test_setup_returns_a_model_version_for_extra_params_as_string_or_object(client, extra_params):
    response = setup_project(client, extra_params=extra_params)
    assert response.status_code == 200
    assert response.json["model_version"].startswith("llm-ner-")


def test_setup_refuses_an_unsupported_config_with_what_is_supported(client):
    response = setup_project(client, config='<View><Image name="i" value="$img"/></View>')
    assert response.status_code == 422
    assert "<Labels" in response.json["error"]


def test_setup_refuses_extra_params_that_are_not_json(client):
    response = setup_project(client, extra_params="{nope")
    assert response.status_code == 400 and "extra_params" in response.json["error"]


def test_predict_gives_exact_spans_one_entry_per_task_in_order(client, llm):
    llm.gazetteer = {"Tim Cook": "PER", "Apple": "ORG", "Cupertino": "LOC"}
    texts = ["Tim Cook leads Apple.", "Nothing here.", "Apple is in Cupertino. Apple again."]
    results = predict(client, texts, project="7.1700000000")["results"]
    version = setup_project(client).json["model_version"]
    for text, entry in zip(texts, results, strict=True):
        assert entry["model_version"] == version
        for region in entry["result"]:
            value = region["value"]
            assert text[value["start"]:value["end"]] == value["text"]
            assert (region["from_name"], region["to_name"], region["type"]) == ("label", "text", "labels")
    assert [region_tuples(entry["result"], "text", "start", "label") for entry in results] == [
        [("Tim Cook", 0, "PER"), ("Apple", 15, "ORG")],
        [],
        [("Apple", 0, "ORG"), ("Cupertino", 12, "LOC"), ("Apple", 23, "ORG")],
    ]


def test_every_region_has_the_wire_shape_and_a_unique_id(client, llm):
    from backend.protocol.wire import SpanResult

    llm.gazetteer = {"Apple": "ORG", "Cupertino": "LOC"}
    results = predict(client, ["Apple is in Cupertino. Apple again.", "Apple."])["results"]
    regions = [r for entry in results for r in entry["result"]]
    assert len(regions) == 4
    for region in regions:
        assert SpanResult.model_validate(region).to_json() == region
    assert len({r["id"] for r in regions}) == len(regions)


def test_predict_drops_hallucinated_text_and_unknown_labels(client, llm):
    llm.replies.append(entities_reply([("Berlin", "LOC"), ("Paris", "CITY"), ("Madrid", "LOC")]))
    (entry,) = predict(client, ["Madrid and Paris."])["results"]
    assert region_tuples(entry["result"], "text", "label") == [("Madrid", "LOC")]


def test_a_failed_llm_call_leaves_that_task_unanswered_not_missing_nor_empty(client, llm):
    llm.gazetteer = {"Rome": "LOC"}
    llm.responder = lambda body: Reply(status=401, error_message="Incorrect API key provided: sk-abc***xyz") if "fail" in body["messages"][-1]["content"] else llm.gazetteer_reply(body)
    answer = predict(client, ["Rome one.", "please fail", "Rome three."])
    # [] for the failed task: Label Studio stores nothing and asks again; an empty prediction would block it
    assert answer["results"][1] == []
    assert region_tuples_per_task(answer, "text") == [["Rome"], None, ["Rome"]]


def test_structured_output_falls_back_through_every_form_to_text(client, llm):
    llm.gazetteer = {"Oslo": "LOC"}
    llm.reject_response_format = True
    assert region_tuples_per_task(predict(client, ["Oslo."]), "text") == [["Oslo"]]
    formats = [r.get("response_format") for r in llm.requests]
    assert [f and f["type"] for f in formats] == ["json_schema", "json_object", "json_object", None]
    # json_object with the schema (llama-cpp-python's form), then plain json_object
    assert formats[1]["schema"] == formats[0]["json_schema"]["schema"] and "schema" not in formats[2]


def test_json_schema_request_carries_the_label_enum_and_temperature_zero(client, llm):
    predict(client, ["x"])
    request = llm.requests[0]
    assert request["temperature"] == 0
    schema = request["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["entities"]["items"]["properties"]["label"]["enum"] == ["PER", "ORG", "LOC", "MISC"]


def test_one_repair_turn_shows_the_model_its_error(client, llm):
    llm.replies.extend([Reply(content="Entities: Lima (LOC)"), entities_reply([("Lima", "LOC")])])
    assert region_tuples_per_task(predict(client, ["Lima."]), "text") == [["Lima"]]
    repair = llm.requests[1]["messages"]
    assert repair[-2] == {"role": "assistant", "content": "Entities: Lima (LOC)"}
    assert "could not be used" in repair[-1]["content"]


@pytest.mark.parametrize(
    "body",
    [
        {"choices": []},
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]},
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": [{"type": "text", "text": "x"}]}}]},
        {"choices": "nope", "usage": "nope"},
        {"id": "x"},
    ],
)
def test_off_spec_completion_bodies_leave_the_task_unanswered(client, llm, body):
    llm.responder = lambda request: Reply(raw_body=json.dumps(body).encode())
    assert predict(client, ["Lima.", "Oslo."])["results"] == [[], []]


def test_after_a_failed_repair_the_task_is_unanswered(client, llm):
    llm.replies.extend([Reply(content="nope"), Reply(content="still nope")])
    assert predict(client, ["Lima."])["results"] == [[]]
    assert len(llm.requests) == 2


def test_predict_without_label_config_uses_the_one_from_setup(client, llm):
    llm.gazetteer = {"Kyiv": "LOC"}
    setup_project(client, project="9")
    assert region_tuples_per_task(predict(client, ["Kyiv"], project="9.1", config=None), "text") == [["Kyiv"]]


def test_a_task_missing_its_text_key_is_unanswered_and_the_others_answered(client, llm):
    response = client.post("/predict", json={"tasks": [{"id": 1, "data": {"body": "x"}}, {"id": 2, "data": {"text": "y"}}], "project": "1", "label_config": NER_CONFIG})
    assert response.status_code == 200
    assert response.json["results"][0] == [] and response.json["results"][1]["result"] == []  # "y": no entity


@pytest.mark.parametrize(
    "body, status",
    [
        (b"not json", 400),
        (b"[1, 2]", 400),
        (b'{"tasks": "x"}', 400),
        (b'{"tasks": [{"id": 1}]}', 400),
        (b'{"tasks": [], "project": "1"}', 400),
    ],
)
def test_bad_predict_bodies_get_4xx_with_a_message(client, body, status):
    response = client.post("/predict", data=body, content_type="application/json")
    assert response.status_code == status
    assert response.json["error"]


def test_model_object_is_kept_across_requests(app, client):
    setup_project(client, project="5")
    registry = app.extensions["llm_ner"]["registry"]
    first = registry._models["5"]
    setup_project(client, project="5")
    predict(client, ["a"], project="5.123")
    assert registry._models["5"] is first


def test_model_version_changes_with_the_label_config(client):
    before = setup_project(client).json["model_version"]
    after = setup_project(client, config=NER_CONFIG.replace('value="MISC"', 'value="EVENT"')).json["model_version"]
    assert before != after


def test_webhook_acknowledges_unknown_events(client):
    setup_project(client, project="3")
    response = client.post("/webhook", json={"action": "SOMETHING_NEW", "project": {"id": 3}})
    assert response.status_code == 201


def test_metrics_are_prometheus_text(client):
    client.get("/health")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert b"llm_ner_requests_total" in response.data
