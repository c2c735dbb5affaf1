"""The page at / in a real headless Chromium (Debian's chromium and chromium-driver, driven by selenium).

Upload the demo clip, ask, and the streamed answer appears piece by piece, equal to Pipeline.chat's; the
transcribe button gives Pipeline.transcribe's text; a recording from Chromium's fake microphone is sent as
WAV and answered as Pipeline.chat answers that WAV. A screenshot of the answered page is kept in
test-artifacts/ (or $MINAF3_TEST_ARTIFACTS), whose path the test prints. Where chromium is not installed
(apt-get install -y chromium chromium-driver; .ci/run installs them) the test is skipped, saying so.
"""

import base64
import os
import shutil
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from serve_support import ThreadServer

from minaf3.demo import CLIP_NAME

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no chromium/chromedriver on this machine (apt-get install -y chromium chromium-driver)",
)
TOKENS = 10
QUESTION = "What is in this audio?"
WAIT_SECONDS = 120
ARTIFACTS = Path(
    os.environ.get("MINAF3_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts")
)


@pytest.fixture(scope="module")
def server(demo_checkpoint):
    # The transcribe button asks for the server's default length: capped, as the random weights rarely stop.
    with ThreadServer(
        "--model", demo_checkpoint, "--served-model-name", "demo", "--max-new-tokens", 48
    ) as running:
        yield running.wait_ready()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1000,1000",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def text_of(browser, element_id: str) -> str:
    """An element's exact text (selenium's .text collapses white space)."""
    return browser.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


def wait_status(browser, *prefixes: str) -> str:
    """Wait until the status line starts with one of `prefixes` (or shows an error, which fails)."""

    def settled(driver):
        status = driver.find_element(By.ID, "status")
        if "error" in status.get_attribute("class"):
            raise AssertionError(f"the page shows an error: {status.text}")
        return status.text if status.text.startswith(prefixes) else False

    return WebDriverWait(browser, WAIT_SECONDS).until(settled)


def ask(browser) -> tuple[str, int]:
    """Click Ask and wait for the end; (the answer, how many times its text changed on the way).

    Mutation records, not observer callbacks: the browser delivers every change made within one task to one
    callback, so chunks that arrive together (a fast server) would count once."""
    browser.execute_script(
        "window.changes = 0; new MutationObserver((records) => window.changes += records.length)"
        ".observe(document.getElementById('answer'), {childList: true, characterData: true, subtree: true});"
    )
    browser.find_element(By.ID, "ask").click()
    wait_status(browser, "done")
    return text_of(browser, "answer"), browser.execute_script("return window.changes")


def test_page_uploads_asks_streams_transcribes_and_records(
    server, browser, demo_pipeline, demo_checkpoint, capsys
):
    clip = demo_checkpoint / CLIP_NAME
    browser.get(server.url + "/")
    WebDriverWait(browser, WAIT_SECONDS).until(lambda d: text_of(d, "model") == "demo")
    browser.find_element(By.ID, "file").send_keys(str(clip))
    wait_status(browser, "audio ready")
    question = browser.find_element(By.ID, "question")
    question.clear()
    question.send_keys(QUESTION)
    browser.find_element(By.ID, "max-tokens").send_keys(str(TOKENS))
    browser.find_element(By.ID, "temperature").send_keys("0")

    answer, changes = ask(browser)
    assert answer == demo_pipeline.chat(QUESTION, audio=str(clip), do_sample=False, max_new_tokens=TOKENS)
    assert changes > 2  # cleared, then filled piece by piece as the stream came in
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "serve_page.png"
    assert browser.save_screenshot(str(screenshot))
    with capsys.disabled():
        print(f"\nscreenshot of the answered page: {screenshot}")

    browser.find_element(By.ID, "transcribe").click()
    wait_status(browser, "done (transcript)")
    assert text_of(browser, "answer") == demo_pipeline.transcribe(str(clip), max_new_tokens=48).text

    # A recording from Chromium's fake microphone (a beep), made into WAV by the page.
    browser.find_element(By.ID, "record").click()
    wait_status(browser, "recording")
    time.sleep(1.0)  # record about a second of the fake device
    browser.find_element(By.ID, "record").click()
    wait_status(browser, "audio ready")
    sent = browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; window.minaf3Audio().then(done);"
    )
    wav = base64.b64decode(sent)
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    answer, _ = ask(browser)
    assert answer == demo_pipeline.chat(QUESTION, audio=wav, do_sample=False, max_new_tokens=TOKENS)
