"""The operator console (dialogue/static) in headless Chromium, against the real service and a real line.

Playwright (PyPI) drives Debian's /usr/bin/chromium (`make install` installs it; no browser is downloaded).
Frames flow simulator → broker → the real inference worker → verdicts → the real recorder (SQLite + artifacts)
and the dialogue app's SSE stream; the browser signs in with the operator token, then:

- every flagged part appears in the live list within 5 s of its verdict (the verdict message's broker
  timestamp vs the time the console put it in the list, `data-seen-at`, on the same clock);
- the selected part shows its image, the heatmap and one outline per stored region, and its verdict;
- a follow-up asked in the chat box (`/` focuses it) is answered, and the turn is stored in the database;
- the `d` shortcut labels it a defect of the chosen type: the Label goes through the labels topic to the
  recorder, and `training_examples` returns it;
- the page runs under the service's Content-Security-Policy with nothing blocked (no violation on the console);
- a screenshot is written to the test's tmp_path (`console.png`, its path printed; `pytest -s` shows it).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from lineguard.events import Verdict
from storage.labels import training_examples

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="Debian's chromium is not installed at /usr/bin/chromium "
                                       "(`make install` installs it with apt-get)")

SHOWN_WITHIN_S = 5.0
FRAMES = 10


@pytest.fixture(scope="module")
def disc_model():
    """The default model (lite0, CPU) knowing one product, disc, from 4 simulated references: the console
    needs flagged parts, not the best detector, and calibrating one product costs half of two."""
    from inference.scorer import build_scorer
    from ingest.publisher import as_published
    from ingest.simulator import LineSimulator

    scorer = build_scorer(device="cpu")
    scorer.set_references("disc", [as_published(image, 90) for image in LineSimulator().normal_references("disc", 4)])
    return scorer


def publish_disc_frames(settings, n: int, *, seed: int, defect_rate: float) -> None:
    """n simulated disc parts onto the frames topic, as `lineguard ingest simulator` sends them (2 cameras)."""
    import asyncio

    from ingest.publisher import publish
    from ingest.sources import open_source

    asyncio.run(publish(open_source("simulator", products=("disc",), defect_rate=defect_rate, seed=seed), settings,
                        cameras=2, limit=n))


def in_thread(function, *args, **kwargs):
    """Playwright's sync API keeps an event loop running in this thread: asyncio.run needs another one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(function, *args, **kwargs).result()


def wait_for_js(page, expression: str, timeout_s: float = 30.0) -> None:
    """Poll `expression` from here: page.wait_for_function evaluates it with eval() inside the page, which the
    service's Content-Security-Policy (no 'unsafe-eval') rightly refuses; page.evaluate goes through CDP."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"still false after {timeout_s} s: {expression}"
        time.sleep(0.1)


def test_console_shows_flagged_parts_answers_and_labels(settings, disc_model, tmp_path):
    from dialogue_helpers import dialogue_settings_for, run_pipeline, serve, storage_settings_for
    from helpers import read_topic_sync
    from playwright.sync_api import expect, sync_playwright

    storage_settings = storage_settings_for(tmp_path)
    dialogue_settings = dialogue_settings_for(tmp_path / "dialogue")
    page_errors: list[str] = []
    with (run_pipeline(settings, storage_settings, disc_model) as line,
          serve(settings, storage_settings, dialogue_settings) as service,
          sync_playwright() as playwright):
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            # the service's Content-Security-Policy: Chromium reports anything it blocks on the console
            page.on("console", lambda message: page_errors.append(message.text)
                    if "Content Security Policy" in message.text else None)
            loaded = page.goto(f"{service.base_url}/")
            assert "frame-ancestors 'none'" in loaded.headers["content-security-policy"]

            # sign in once: the token goes to sessionStorage and the stream connects
            expect(page.locator("#token-dialog")).to_be_visible()
            page.fill("#token-input", service.tokens["operator"])
            page.click("#token-form button[type=submit]")
            expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=15_000)
            assert page.evaluate("sessionStorage.getItem('lineguard.token')") == service.tokens["operator"]
            expect(page.locator("#parts li")).to_have_count(0)

            # the line runs: flagged parts arrive over SSE
            in_thread(publish_disc_frames, settings, n=FRAMES, seed=1, defect_rate=0.6)
            line.wait_for_frames(FRAMES, timeout_s=120)
            messages = in_thread(read_topic_sync, settings, "verdicts", expect=FRAMES, idle_s=0.5)
            flagged = {}
            for message in messages:
                verdict = Verdict.from_bytes(message.value)
                if verdict.is_anomalous:
                    flagged[verdict.frame_id] = (verdict, message.timestamp / 1000)
            assert flagged, "the simulated line gave no flagged part; the test needs one"
            items = page.locator("#parts li")
            expect(items).to_have_count(len(flagged), timeout=10_000)
            for frame_id, (_, published_s) in flagged.items():
                seen_ms = page.locator(f"#parts li[data-frame-id='{frame_id}']").get_attribute("data-seen-at")
                delay_s = int(seen_ms) / 1000 - published_s
                assert delay_s <= SHOWN_WITHIN_S, f"{frame_id} shown {delay_s:.2f} s after its verdict"

            # the selected part: verdict, image, heatmap, one outline per region
            frame_id = items.first.get_attribute("data-frame-id")     # the newest, on top
            record = httpx.get(f"{service.base_url}/api/records/{frame_id}", headers=service.headers("viewer")).json()
            page.click(f"#parts li[data-frame-id='{frame_id}']")
            expect(page.locator("#detail-title")).to_have_text(frame_id)
            expect(page.locator(f"#parts li[data-frame-id='{frame_id}']")).to_have_attribute("aria-selected", "true")
            expect(page.locator("#verdict")).to_have_text("Anomalous")
            expect(page.locator("#first-answer")).to_have_text(record["answer"])
            expect(page.locator("#facts")).to_contain_text(f"{round(record['confidence'] * 100)} %")
            wait_for_js(page, "document.getElementById('part-image').naturalWidth > 0")
            wait_for_js(page, "document.getElementById('part-heatmap').naturalWidth > 0")
            expect(page.locator("#regions rect")).to_have_count(len(record["regions"]))

            # a follow-up in the chat box; `/` focuses it
            page.locator("#parts").focus()
            page.keyboard.press("/")
            expect(page.locator("#question")).to_be_focused()
            page.keyboard.type("Where is the defect?")
            page.keyboard.press("Enter")
            answer = page.locator("#conversation li.answer-turn")
            expect(answer).to_have_count(1, timeout=15_000)
            for position in record["positions"]:
                expect(answer).to_contain_text(position)
            stored = httpx.get(f"{service.base_url}/api/records/{frame_id}/conversation",
                               headers=service.headers("viewer")).json()["turns"]
            assert [(turn["question"], turn["intent"]) for turn in stored] == [("Where is the defect?", "position")]
            assert stored[0]["answer"] in answer.inner_text()

            # label it: the `d` shortcut, with the defect type typed in
            page.fill("#defect-type", "hairline crack")
            page.keyboard.press("Escape")            # leave the input, so the key is a shortcut
            page.keyboard.press("d")
            expect(page.locator("#label-result")).to_contain_text("Labelled defect (hairline crack) by alice")
            deadline = time.monotonic() + 15
            examples = []
            while time.monotonic() < deadline:
                examples = [e for e in training_examples(line.store) if e.frame_id == frame_id]
                if examples:
                    break
                time.sleep(0.2)
            assert examples, "the label did not reach the records database"
            assert (examples[0].is_defect, examples[0].defect_type, examples[0].operator) == \
                   (True, "hairline crack", "alice")
            expect(page.locator(f"#parts li[data-frame-id='{frame_id}'] .badge")).to_have_text("defect")

            # j moves down the list, k back up
            if len(flagged) > 1:
                page.keyboard.press("j")
                expect(page.locator("#detail-title")).to_have_text(items.nth(1).get_attribute("data-frame-id"))
                page.keyboard.press("k")
                expect(page.locator("#detail-title")).to_have_text(frame_id)

            wait_for_js(page, "document.getElementById('part-image').naturalWidth > 0")
            page.locator("#detail").evaluate("element => element.scrollTo(0, 0)")
            screenshot = tmp_path / "console.png"
            page.screenshot(path=str(screenshot))
            print(f"console screenshot: {screenshot}")
            assert screenshot.stat().st_size > 10_000
        finally:
            browser.close()
    assert not page_errors, page_errors
