"""The chat page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium): a typed
message gets a streamed reply, Stop stops it, model output never becomes markup."""

from __future__ import annotations

import shutil
import time

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # no driver download: the system's
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def long_server(start_server):
    """SmolLM2, whose greedy story runs for many seconds: time to see it stream and to stop it (a tiny random model
    ends its replies too soon)."""
    from npulm import assets

    s = start_server(str(assets.model_path(assets.SMOLLM2)), ctx_size=2048, parallel=2, alias="smollm2")
    yield s
    s.stop()


def wait_for(condition, timeout: float = 30.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("timed out")


def test_page_streams_and_stops(browser, long_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(long_server.url + "/")
    wait_for(lambda: browser.find_element(By.ID, "model").text == "smollm2")
    temperature = browser.find_element(By.ID, "temperature")
    browser.execute_script("arguments[0].value = '0'", temperature)  # greedy: a known long reply
    message = "Write a long story about a cat who learns to fly."
    browser.find_element(By.ID, "input").send_keys(message, Keys.ENTER)
    reply = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .body"))[-1]
    first = wait_for(lambda: reply.text)
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user .body").text == message
    wait_for(lambda: len(reply.text) > len(first))  # more text arrives while streaming
    assert "tokens/s" in wait_for(lambda: browser.find_element(By.ID, "stats").text)
    assert long_server.state.engine.busy == 1
    browser.find_element(By.ID, "stop").click()
    wait_for(lambda: reply.find_element(By.XPATH, "..").get_attribute("data-done") == "1")
    assert "stopped" in browser.find_element(By.ID, "stats").text
    wait_for(lambda: long_server.state.engine.busy == 0, timeout=5)  # the server cancelled the generation
    stopped = reply.text
    time.sleep(0.5)
    assert reply.text == stopped
    assert browser.find_element(By.ID, "send").is_enabled()


def test_markdown_cannot_inject_html(browser, long_server):
    from selenium.webdriver.common.by import By

    browser.get(long_server.url + "/")
    html = browser.execute_script("""
        const div = document.createElement('div');
        div.id = 'md';
        div.appendChild(renderMarkdown(arguments[0]));
        document.body.appendChild(div);
        return div.innerHTML;""",
        "# Title\n**bold** and `<b>code</b>` <img src=x onerror=\"window.pwned=1\">\n"
        "[ok](https://example.org) [bad](javascript:window.pwned=1)\n```\n<script>window.pwned=1</script>\n```\n"
        "- one\n- <i>two</i>")
    md = browser.find_element(By.ID, "md")
    assert md.find_elements(By.TAG_NAME, "img") == [] and md.find_elements(By.TAG_NAME, "script") == []
    assert md.find_elements(By.TAG_NAME, "i") == []
    assert md.find_element(By.TAG_NAME, "strong").text == "bold"
    assert md.find_element(By.TAG_NAME, "code").text == "<b>code</b>"
    assert [a.get_attribute("href") for a in md.find_elements(By.TAG_NAME, "a")] == ["https://example.org/"]
    assert len(md.find_elements(By.TAG_NAME, "li")) == 2 and "&lt;img" in html
    assert browser.execute_script("return window.pwned") is None


def test_page_behind_an_api_key(browser, keyed_server):
    """With --api-key the page needs the key too: without credentials the browser gets a 401 (with a Basic challenge:
    its login dialog); with the Basic credentials a browser sends once the user typed the key there (set here through
    the DevTools protocol, as headless Chromium shows no dialog) the page loads, names the model and chats."""
    import base64

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(keyed_server.url + "/")
    assert browser.find_elements(By.ID, "input") == []
    basic = "Basic " + base64.b64encode(b"user:sesame").decode()
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": basic}})
    try:
        browser.get(keyed_server.url + "/")
        wait_for(lambda: browser.find_element(By.ID, "model").text == "tiny")
        browser.find_element(By.ID, "input").send_keys("Hello", Keys.ENTER)
        reply = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"))[-1]
        wait_for(lambda: reply.get_attribute("data-done") == "1")
        assert "tokens/s" in browser.find_element(By.ID, "stats").text
    finally:
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
