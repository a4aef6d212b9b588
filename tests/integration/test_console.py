"""The approvals console in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium): sign in, see a pending T3 request a real proxied request made, approve it as two
operators, watch the agent's retry pass; a wrong token; `<script>` in a value rendered as text.
A screenshot of the signed-in console is kept as a test artifact (VIENNA_TEST_ARTIFACTS, default
.artifacts/)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import TOKENS, Sidecar, Upstream, new_session

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("VIENNA_TEST_ARTIFACTS", REPO / ".artifacts"))


def _browser_or_skip() -> Any:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no chromium / chromedriver here (Debian: apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000",
                 "--no-proxy-server"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = _browser_or_skip()
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(condition: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the page is still rendering
            last = exc
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what} ({last})")


def sign_in(browser: Any, token: str) -> None:
    from selenium.webdriver.common.by import By

    field = browser.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()


def test_console_approve_t3_as_two_operators_and_the_retry_passes(
    browser: Any, sidecar: Sidecar, upstream: Upstream
) -> None:
    from selenium.webdriver.common.by import By

    # A real proxied request opens the T3 request; a T2 one carries <script> in its body.
    url = upstream.url("/repos/acme/console")
    refused = sidecar.request("DELETE", url)
    request_id = refused.json()["warrant_request"]["id"]
    hostile = "<script>window.pwned = 1</script><img src=x onerror=window.pwned=2>"
    sidecar.request(
        "POST",
        upstream.url("/items/console-xss"),
        data=hostile.encode(),
        headers={"Content-Type": "text/plain"},
    )

    browser.get(f"{sidecar.api_url}/console#{request_id}")
    headers = new_session().get(f"{sidecar.api_url}/console", timeout=10).headers
    assert (
        "script-src 'self'" in headers["Content-Security-Policy"]
        and "default-src 'none'" in headers["Content-Security-Policy"]
    )
    assert "Set-Cookie" not in headers

    # A wrong token: the API's reason, as text.
    sign_in(browser, "not-a-token")
    wait_until(lambda: browser.find_element(By.ID, "error").text == "token not recognised", "the refusal")
    assert browser.find_element(By.ID, "pending").get_attribute("hidden") is not None

    sign_in(browser, TOKENS["alice"])
    card = wait_until(lambda: browser.find_element(By.ID, f"card-{request_id}"), "the pending T3 card")
    text = card.text
    for expected in ("T3", "demo.delete_repo", "acme/console", "DELETE", url, "test-agent", "0 of 2"):
        assert expected in text, (expected, text)
    assert "highlight" in card.get_attribute("class")  # the deep link picks it out
    # <script> shown as text, never run.
    wait_until(
        lambda: hostile in browser.find_element(By.ID, "requests").text, "the hostile body shown as text"
    )
    assert browser.execute_script("return window.pwned === undefined")
    assert (
        browser.execute_script("return document.querySelectorAll('#requests script, #requests img').length")
        == 0
    )
    assert browser.execute_script("return sessionStorage.length") == 1 and browser.get_cookies() == []

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "console.png"))

    # T3 needs a justification: the page says so before asking the API.
    card.find_element(By.CSS_SELECTOR, "button.approve").click()
    wait_until(
        lambda: "needs a justification" in card.find_element(By.CSS_SELECTOR, ".card-error").text, "the hint"
    )
    card.find_element(By.TAG_NAME, "textarea").send_keys("ticket OPS-1: repo is archived")
    card.find_element(By.CSS_SELECTOR, "button.approve").click()
    wait_until(lambda: "1 of 2" in browser.find_element(By.ID, f"card-{request_id}").text, "alice's vote")
    # The same operator again: the API's 409 reason, shown on the card.
    card = browser.find_element(By.ID, f"card-{request_id}")
    card.find_element(By.TAG_NAME, "textarea").send_keys("again")
    card.find_element(By.CSS_SELECTOR, "button.approve").click()
    wait_until(
        lambda: "already voted" in card.find_element(By.CSS_SELECTOR, ".card-error").text,
        "the duplicate vote refusal",
    )

    browser.find_element(By.ID, "sign-out").click()
    assert browser.execute_script("return sessionStorage.length") == 0
    sign_in(browser, TOKENS["bob"])
    card = wait_until(lambda: browser.find_element(By.ID, f"card-{request_id}"), "the card for bob")
    card.find_element(By.TAG_NAME, "textarea").send_keys("confirmed with the owner")
    card.find_element(By.CSS_SELECTOR, "button.approve").click()
    wait_until(
        lambda: not browser.find_elements(By.ID, f"card-{request_id}"),
        "the approved request to leave the list",
    )
    wait_until(
        lambda: "warrant" in browser.find_element(By.ID, "events").text, "the warrant in recent decisions"
    )

    # The agent's retry with the warrant passes, once.
    warrant = sidecar.get_request(request_id)["warrant"]
    assert sidecar.request("DELETE", url, warrant=warrant).status_code == 200
    assert len(upstream.seen("/repos/acme/console")) == 1
    browser.save_screenshot(str(ARTIFACTS / "console-after.png"))
