"""Pre-labels seen in the real UI: an annotator opens a task in Label Studio 1.23 (headless Chromium)
and finds the entities already marked, predicted by the backend the moment the task opened."""

from __future__ import annotations

import pytest

from tests.conftest import ARTIFACTS

pytestmark = [pytest.mark.label_studio, pytest.mark.browser]

USER, PASSWORD = "ls-robot", "browser-basic-pass-3d1f"
TEXT = "Grace Hopper joined the Navy in New York."
EXPECTED = [(0, 12, "PER", "Grace Hopper"), (24, 28, "ORG", "Navy"), (32, 40, "LOC", "New York")]


def test_opening_a_task_in_the_labeling_ui_shows_the_predicted_entities_as_regions(label_studio, connected_project, backend_factory, llm, browser):
    llm.gazetteer = {"Grace Hopper": "PER", "Navy": "ORG", "New York": "LOC"}
    backend = backend_factory(workers=2, BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD)
    project = connected_project([TEXT], title="pre-labels in the UI", backend=backend,
                                auth_method="BASIC_AUTH", basic_auth_user=USER, basic_auth_pass=PASSWORD)
    (task,) = project.tasks()
    assert project.predictions(task.id) == []  # nothing predicted until the task is opened

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(label_studio.url + "/user/login/")
    page.fill("input[name=email]", label_studio.email)
    page.fill("input[name=password]", label_studio.password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url, timeout=60_000)

    page.goto(f"{label_studio.url}/projects/{project.id}/data?task={task.id}")
    # regions of the text: Label Studio marks each as a highlight span carrying its label and offsets
    highlights = page.locator(".lsf-richtext span.htx-highlight")
    highlights.nth(len(EXPECTED) - 1).wait_for(timeout=90_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "prelabels.png"))

    shown = sorted(
        (int(h.get_attribute("data-start")), int(h.get_attribute("data-end")),
         h.get_attribute("data-label").split(":", 1)[1], h.inner_text())
        for h in highlights.all()
    )
    assert shown == EXPECTED
    # the Regions panel lists them by label and text
    outliner = page.locator(".lsf-outliner-item__title")
    listed = sorted((item.locator(".lsf-labels-list").first.inner_text().strip(),
                     item.locator(".lsf-outliner-item__text").inner_text().strip()) for item in outliner.all())
    assert listed == sorted((label, text) for _, _, label, text in EXPECTED)

    # they came from this backend, predicted when the task opened, under its current model_version
    (prediction,) = project.predictions(task.id)
    version = project.model_version(auth=(USER, PASSWORD))
    assert prediction.model_version == version
    tab = page.locator(".lsf-annotation-button__name", has_text="llm-ner-")
    assert tab.count() == 1 and tab.inner_text().endswith(version[-6:])
    assert len(llm.requests) == 1 and TEXT in llm.requests[0]["messages"][-1]["content"]
