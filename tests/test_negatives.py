"""A pre-label the annotator deletes is remembered and shown to the LLM as a mistake not to repeat."""

from tests.conftest import NER_CONFIG, predict, region_tuples
from tests.fake_llm import entities_reply

FIRST = "The Government met Acme Corp in Springfield."
SECOND = "The Government later met Initech in Springfield."


def test_a_deleted_draft_entity_becomes_a_negative_in_the_next_prompt(client, llm):
    llm.replies.append(entities_reply([("The Government", "ORG"), ("Acme Corp", "ORG"), ("Springfield", "LOC")]))
    (first,) = predict(client, [FIRST], project="8.1")["results"]
    draft = first["result"]
    assert region_tuples(draft, "text") == ["The Government", "Acme Corp", "Springfield"]
    # the annotator deletes "The Government" and submits
    corrected = [r for r in draft if r["value"]["text"] != "The Government"]
    payload = {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": 50, "task": 1, "result": corrected, "was_cancelled": False, "updated_at": "2026-11-25T10:00:00Z"},
        "task": {"id": 1, "data": {"text": FIRST}},
        "project": {"id": 8, "label_config": NER_CONFIG},
    }
    assert client.post("/webhook", json=payload).status_code == 201
    predict(client, [SECOND], project="8.2", first_id=2)
    messages = llm.requests[-1]["messages"]
    assert '"The Government" as ORG' in messages[0]["content"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "The Government" not in messages[2]["content"]
