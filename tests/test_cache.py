"""The persistent response cache, driven through /predict: what is asked once is never asked again.
Every test runs on both store engines (SQLite under MODEL_DIR, PostgreSQL)."""

from __future__ import annotations

import pytest

from tests.conftest import NER_CONFIG, metric, open_store, predict, region_tuples_per_task
from tests.fake_llm import Reply

pytestmark = pytest.mark.usefixtures("database_url")

SPAN = ("text", "start", "label")  # how a pre-label is compared here
TEXTS = ["Ada Lovelace lived in London.", "Nothing here.", "Paris and London."]


@pytest.fixture
def gazetteer(llm):
    llm.gazetteer = {"Ada Lovelace": "PER", "London": "LOC", "Paris": "LOC"}


def test_repredicting_unchanged_tasks_makes_no_llm_call_and_gives_the_same_spans(make_client, llm, gazetteer):
    client = make_client()
    first = predict(client, TEXTS)
    assert len(llm.requests) == 3
    hits = metric("llm_ner_cache_total", result="hit")
    second = predict(client, TEXTS)
    assert len(llm.requests) == 3
    assert region_tuples_per_task(second, *SPAN) == region_tuples_per_task(first, *SPAN)
    assert second["model_version"] == first["model_version"]
    assert metric("llm_ner_cache_total", result="hit") == hits + 3


def test_the_cache_survives_a_restart_and_is_shared_by_every_app_on_the_model_dir(make_client, llm, gazetteer):
    predict(make_client(), TEXTS)
    assert len(llm.requests) == 3
    predict(make_client(), TEXTS)  # a new app object: as another worker, or after a restart
    assert len(llm.requests) == 3


def test_only_changed_texts_are_asked_again(make_client, llm, gazetteer):
    client = make_client()
    predict(client, TEXTS)
    body = predict(client, [TEXTS[0], "Paris, again.", TEXTS[2]])
    assert len(llm.requests) == 4
    assert "Paris, again." in llm.requests[-1]["messages"][-1]["content"]
    assert region_tuples_per_task(body, *SPAN)[1] == [("Paris", 0, "LOC")]


def test_a_new_model_version_asks_again(make_client, llm, gazetteer):
    client = make_client()
    before = predict(client, TEXTS)["model_version"]
    # a label config that only changes a colour changes no prompt, but it does change model_version
    recoloured = NER_CONFIG.replace('background="red"', 'background="purple"')
    after = predict(client, TEXTS, config=recoloured)["model_version"]
    assert after != before
    assert len(llm.requests) == 6


def test_another_llm_model_asks_again(make_client, llm, gazetteer):
    predict(make_client(), TEXTS)
    predict(make_client(llm_model="other-model"), TEXTS)
    assert len(llm.requests) == 6
    assert llm.requests[-1]["model"] == "other-model"


def test_failed_calls_are_not_cached(make_client, llm, gazetteer):
    client = make_client(llm_max_retries=0)
    llm.replies.append(Reply(status=500))
    assert region_tuples_per_task(predict(client, [TEXTS[0]]), *SPAN) == [None]  # unanswered: Label Studio asks again
    assert region_tuples_per_task(predict(client, [TEXTS[0]]), *SPAN) == [[("Ada Lovelace", 0, "PER"), ("London", 22, "LOC")]]
    assert len(llm.requests) == 2


def test_llm_cache_false_always_asks(make_client, llm, gazetteer):
    client = make_client(llm_cache=False)
    predict(client, TEXTS)
    predict(client, TEXTS)
    assert len(llm.requests) == 6


def test_the_cache_keeps_at_most_llm_cache_max_rows_dropping_the_oldest(make_client, make_settings, llm, gazetteer, monkeypatch):
    from backend.llm import cache

    monkeypatch.setattr(cache, "PRUNE_EVERY", 1)
    client = make_client(llm_cache_max_rows=100)
    texts = [f"Paris {i}." for i in range(105)]
    predict(client, texts[:60])
    predict(client, texts[60:])
    assert len(cache.ResponseCache(open_store(make_settings()))) == 100
    llm.requests.clear()
    predict(client, texts[-3:])  # the newest are still there
    assert llm.requests == []


def test_the_key_tells_apart_prompts_that_differ_only_in_where_the_text_is_split():
    from backend.llm.cache import cache_key

    one = [{"role": "user", "content": "ab"}]
    split = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    moved = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    keys = {cache_key(m, model="m") for m in (one, split, moved)}
    assert len(keys) == 3
    assert cache_key(one, model="m") == cache_key([dict(one[0])], model="m")
    assert cache_key(one, model="m") != cache_key(one, model="n")
    # a field's value cannot pose as the start of the next field
    assert cache_key([{"content": "x", "role": "user"}], model="m") != cache_key([{"content": "xrole=4:user", "role": ""}], model="m")


def test_answers_are_in_the_shared_database_when_predict_returns(make_client, make_settings, llm, gazetteer):
    # answers are written in batches; a /predict writes its own before answering, so a worker in
    # another process (which has no view of this one's memory) finds them at once
    client = make_client()
    predict(client, TEXTS)
    assert open_store(make_settings()).query("SELECT COUNT(*) AS n FROM llm_cache")[0]["n"] == len(TEXTS)


def test_a_cache_that_cannot_be_written_never_fails_predict(make_client, make_settings, llm, gazetteer, caplog):
    # e.g. SQLite still "database is locked" after its busy timeout, or PostgreSQL gone: the answers
    # are lost from the cache (asked again next time), the annotator still gets them now
    import sqlite3
    from contextlib import contextmanager

    import psycopg

    from backend.infra.storage import Database

    class Locked(Database):
        @contextmanager
        def transaction(self, durable=True):
            if self.engine == "sqlite":
                raise sqlite3.OperationalError("database is locked")
            raise psycopg.OperationalError("database is locked")
            yield

    client = make_client()
    store = client.application.extensions["llm_ner"]["services"].cache  # the one the app writes through
    settings = make_settings()
    locked = Locked.open(settings.model_dir, settings.database_url and settings.database_url.get_secret_value())
    shared, store.db = store.db, locked  # only the cache's writes fail
    try:
        body = predict(client, TEXTS)
    finally:
        store.db = shared
    assert region_tuples_per_task(body, *SPAN)[0] == [("Ada Lovelace", 0, "PER"), ("London", 22, "LOC")]
    assert "answers not written (database is locked)" in caplog.text
    llm.requests.clear()
    predict(client, TEXTS)
    assert len(llm.requests) == len(TEXTS)  # nothing was cached: every text is asked again
