"""Chinese text end to end: character-per-line CoNLL (BIO and BMES) through predict-conll with the fake
LLM, the Chinese prompts and occurrence hints over real HTTP, and (marked `label_studio`) through
import-conll, the connected backend and evaluate against a real Label Studio 1.23."""

from __future__ import annotations

import json

import pytest

from backend.tools.conll import build_units, read_conll
from tests.conftest import ZH_DATA, cli, figures, ls_args, predictions, project_id_from, run_cli, stored, tasks_of
from tests.fake_llm import ONE_TEXT, Reply, last_user_text

BIO = ZH_DATA / "sample.bio.conll"
BMES = ZH_DATA / "resume.bmes.conll"


def oracle(units, leave_out: str | None = None):
    """A fake LLM answering like a perfect model (a gazetteer would also list the 中 of 研发中心): every
    gold mention of the text asked about, in order, each with two characters of context on each side."""
    answers = {
        u.text: [
            {"text": e.text, "label": e.label, "context": u.text[max(0, e.start - 2):e.end + 2]}
            for e in u.entities if e.text != leave_out
        ]
        for u in units
    }

    def respond(body):
        text = ONE_TEXT.search(last_user_text(body)).group(1)
        return Reply(content=json.dumps({"entities": answers[text]}, ensure_ascii=False))

    return respond


def columns(path) -> list[list[str]]:
    return [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line]


@pytest.mark.parametrize("source, scheme, per", [(BIO, "IOB2", "document"), (BIO, "IOB2", "sentence"), (BMES, "BMES", "sentence")])
def test_predict_conll_sends_natural_chinese_and_writes_the_tags_back_exactly(tmp_path, llm, source, scheme, per):
    units = build_units(read_conll(source), per=per)
    llm.responder = oracle(units)
    out, figures = tmp_path / "out.conll", tmp_path / "figures.json"
    done = run_cli(llm, "predict-conll", str(source), "--out", str(out), "--per", per, "--scheme", scheme,
                   "--json", str(figures), "--quiet", PROMPT_LANGUAGE="zh")
    assert done.returncode == 0, done.stderr
    sent = [r["messages"][-1]["content"] for r in llm.requests]
    assert sorted(sent) == sorted(f"请标注这段文本中的命名实体：\n<text>\n{u.text}\n</text>" for u in units)
    assert all(" " not in u.text for u in units)
    assert all(r["messages"][0]["content"].startswith("你是命名实体识别（NER）的专业标注员。") for r in llm.requests)
    # the gold column as read, and the predicted column in the chosen scheme, tag for tag
    written = columns(out)
    assert [[token, gold] for token, gold, _ in written] == columns(source)
    assert [predicted for _, _, predicted in written] == [gold for _, gold in columns(source)]
    report = json.loads(figures.read_text())
    assert report["micro"]["strict"]["f1"] == 1.0
    assert report["micro"]["strict"]["gold"] == sum(len(u.entities) for u in units)


def test_an_occurrence_hint_from_the_llm_places_a_one_character_name_end_to_end(tmp_path, llm):
    source = tmp_path / "trap.conll"
    text, gold = "在过去的五年中，中美关系经历了起伏。", {8: "B-LOC", 9: "B-LOC"}
    source.write_text("".join(f"{ch} {gold.get(i, 'O')}\n" for i, ch in enumerate(text)), encoding="utf-8")

    def answer(hints: bool):
        def responder(body):
            entities = [{"text": "中", "label": "LOC"}, {"text": "美", "label": "LOC"}]
            if hints:
                # the Chinese prompt asks for it, and the schema lets it through
                item = body["response_format"]["json_schema"]["schema"]["properties"]["entities"]["items"]
                assert item["required"] == ["text", "label", "context"]
                assert '"context"' in body["messages"][0]["content"]
                entities = [dict(entities[0], context="，中美关系"), dict(entities[1], context=None)]
            return Reply(content=json.dumps({"entities": entities}, ensure_ascii=False))
        return responder

    predicted = {}
    for hints in (False, True):
        llm.reset()
        llm.responder = answer(hints)
        out = tmp_path / f"out-{hints}.conll"
        done = run_cli(llm, "predict-conll", str(source), "--out", str(out), "--quiet",
                       PROMPT_LANGUAGE="zh", OCCURRENCE_HINTS=str(hints).lower(), LABEL_ALL_MENTIONS="false")
        assert done.returncode == 0, done.stderr
        predicted[hints] = [i for i, (_, _, tag) in enumerate(columns(out)) if tag != "O"]
    assert predicted == {False: [6, 9], True: [8, 9]}  # without the hint, 中 lands in 年中


def test_hints_are_kept_in_the_response_cache(make_client, llm):
    from tests.conftest import predict
    from tests.fake_llm import entities_reply

    llm.replies.append(Reply(content=json.dumps({"entities": [{"text": "中", "label": "LOC", "context": "，中美"}]})))
    text = "年中，中美两国"
    first = predict(make_client(setup_project="1.1", prompt_language="zh"), [text])["results"]
    # a second app on the same MODEL_DIR answers from the shared cache: the hint must have been kept
    llm.replies.append(entities_reply([("中", "LOC")]))
    again = predict(make_client(setup_project="1.1", prompt_language="zh"), [text])["results"]
    assert len(llm.requests) == 1
    assert [[(r["value"]["start"], r["value"]["text"]) for r in answer["result"]] for answer in (first[0], again[0])] == [
        [(3, "中")], [(3, "中")]
    ]


def test_packed_answers_keep_their_hints(make_client, llm):
    from tests.conftest import predict
    from tests.fake_llm import PACKED_TEXT

    texts = ["年中，中美两国", "月中，中日两国"]

    def responder(body):
        assert "context" in body["messages"][0]["content"]  # the Chinese packing instructions ask for it
        hinted = {t: [{"text": "中", "label": "LOC", "context": "，中" + t[4]}] for t in texts}
        results = [{"id": i, "entities": hinted[t]} for i, t in PACKED_TEXT.findall(body["messages"][-1]["content"])]
        return Reply(content=json.dumps({"results": results}, ensure_ascii=False))

    llm.responder = responder
    answers = predict(make_client(setup_project="1.1", prompt_language="zh", pack_size=4), texts)["results"]
    assert len(llm.requests) == 1
    assert [[(r["value"]["start"], r["value"]["text"]) for r in a["result"]] for a in answers] == [[(3, "中")], [(3, "中")]]


def test_estimate_counts_the_natural_chinese_text_and_the_chinese_prompts(llm):
    from backend.infra.settings import load_settings
    from backend.ner.labelconfig import parse_label_config
    from backend.ner.task import NerTask
    from backend.ner.templates import load_templates
    from backend.tools.estimate import count_message_tokens
    from backend.tools.importer import label_config_for

    natural = figures(cli("estimate", str(BIO), "--examples", "0", env={"PROMPT_LANGUAGE": "zh"}).stdout)
    spaced = figures(cli("estimate", str(BIO), "--examples", "0", "--join", "space", env={"PROMPT_LANGUAGE": "zh"}).stdout)
    # independently: the Chinese messages of each natural sentence, counted with the same tokenizer
    settings = load_settings(openai_api_key="unused", prompt_language="zh", _env_file=None)
    units = build_units(read_conll(BIO), per="sentence")
    task = NerTask(parse_label_config(label_config_for(["LOC", "ORG", "PER"])).targets[0],
                   load_templates(settings.prompts_dir, settings.occurrence_hints))
    expected = sum(count_message_tokens(task.messages(u.text), settings.llm_model) for u in units)
    assert natural["prompt tokens"].startswith(f"{expected} ")
    assert int(spaced["prompt tokens"].split()[0]) > expected  # spaced characters cost more tokens
    assert llm.requests == []


# ---- a real Label Studio ----
@pytest.mark.label_studio
# one gold name the fake LLM does not know, found once in the file
@pytest.mark.parametrize("source, scheme, forgotten", [(BIO, "IOB2", "华盛顿"), (BMES, "BMES", "清华大学")])
def test_chinese_conll_through_label_studio_the_backend_and_evaluate(label_studio, backend_factory, llm, tmp_path, source, scheme, forgotten):
    units = build_units(read_conll(source), per="sentence")
    client = label_studio.client()
    title = f"中文 {source.stem}"

    # Label Studio wants titles of 3 characters or more: its reason is shown, not just "Validation error"
    short = cli("import-conll", str(source), *ls_args(label_studio), "--create", "简历", "--quiet")
    assert short.returncode == 1 and "title" in short.stderr and "3" in short.stderr, short.stderr

    done = cli("import-conll", str(source), *ls_args(label_studio), "--create", title, "--per", "sentence", "--quiet")
    assert done.returncode == 0, done.stderr
    project_id = project_id_from(done.stdout)
    tasks = tasks_of(client, project_id)
    # natural text: no space between characters, digits or letters
    assert [t.data["text"] for t in tasks] == [u.text for u in units]
    assert all(" " not in t.data["text"] for t in tasks)
    for task, unit in zip(tasks, units):
        (annotation,) = task.annotations
        assert stored(annotation["result"]) == {(e.start, e.end, e.label) for e in unit.entities}
        for region in annotation["result"]:
            assert task.data["text"][region["value"]["start"]:region["value"]["end"]] == region["value"]["text"]

    again = cli("import-conll", str(source), *ls_args(label_studio), "--project", str(project_id), "--per", "sentence", "--quiet")
    assert again.returncode == 0, again.stderr
    assert f"imported 0 tasks (0 gold entities), skipped {len(units)}" in again.stdout
    assert len(tasks_of(client, project_id)) == len(units)

    # the backend, with the Chinese prompts, pre-labels every task; the LLM does not know one name
    llm.responder = oracle(units, leave_out=forgotten)
    backend = backend_factory(workers=1, PROMPT_LANGUAGE="zh")
    client.ml.create(url=backend.url, project=project_id, title="llm-ner", is_interactive=False)
    label_studio.retrieve_predictions(project_id)
    assert all(r["messages"][0]["content"].startswith("你是") for r in llm.requests)
    tasks = tasks_of(client, project_id)
    predicted = [stored(predictions(t)[0]["result"]) for t in tasks]
    gold = [{(e.start, e.end, e.label) for e in u.entities} for u in units]
    assert predicted == [{g for g in doc if u.text[g[0]:g[1]] != forgotten} for doc, u in zip(gold, units)]

    figures = tmp_path / "figures.json"
    evaluation = cli("evaluate", *ls_args(label_studio), "--project", str(project_id), "--json", str(figures))
    assert evaluation.returncode == 0, evaluation.stderr
    report = json.loads(figures.read_text())
    found = sum(map(len, predicted))
    total = sum(map(len, gold))
    assert report["micro"]["strict"]["precision"] == 1.0
    assert report["micro"]["strict"]["recall"] == pytest.approx(found / total)

    # the same file offline, written back in its own scheme: the gold tags, but for the forgotten name
    out = tmp_path / "out.conll"
    offline = cli("predict-conll", str(source), "--out", str(out), "--per", "sentence", "--scheme", scheme, "--quiet", env=backend.env)
    assert offline.returncode == 0, offline.stderr
    rows = columns(out)
    assert [[token, tag] for token, tag, _ in rows] == columns(source)
    text = "".join(token for token, _, _ in rows)
    assert text.count(forgotten) == 1
    start = text.index(forgotten)
    expected = [tag if not (start <= i < start + len(forgotten)) else "O" for i, (_, tag, _) in enumerate(rows)]
    assert [predicted for _, _, predicted in rows] == expected
