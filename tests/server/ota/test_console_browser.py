"""The operator console in a real browser: headless Chromium driven by Selenium against
``fedota serve`` (issue 24 item 5).

One server and one browser session for the module; the tests run in order (sign in,
every page, pause and resume by clicking, a forged POST, sign out) and save the
screenshots the README shows (``docs/img/console-*.png``). Chromium and chromedriver
are Debian's: installed here with apt-get when missing and the tests run as root (as in
CI); skipped, saying so, otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

from tests.server.ota.console_helpers import OPERATOR_KEY, seed_fleet
from tests.server.ota.ota_helpers import auth, free_port, settings_env
from tests.server.ota.serve_helpers import REPO, fedota_serve

pytestmark = pytest.mark.slow
SHOTS = REPO / "docs" / "img"


def chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing Debian's packages if root."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found  # type: ignore[return-value]
    if os.geteuid() != 0:
        pytest.skip(
            "chromium/chromedriver missing and not root: run "
            "`apt-get install -y chromium chromium-driver` to run the console browser tests"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}", pytrace=False)
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "apt-get installed chromium but it is not on PATH"
    return binary, driver


@pytest.fixture(scope="module")
def server(tuf_keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("console")
    env = settings_env(f"sqlite:///{tmp / 'ota.db'}", tmp / "storage", tuf_keys.write(tmp / "keys"))
    port = free_port()
    with fedota_serve(env, port, tmp, workers=1):
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=30) as client:
            seed_fleet(client, tuf_keys)
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    binary, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1440,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.implicitly_wait(5)
    try:
        yield driver
    finally:
        driver.quit()


def shot(browser: webdriver.Chrome, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1440, min(max(int(height) + 160, 700), 2000))
    assert browser.save_screenshot(str(SHOTS / f"console-{name}.png"))
    browser.set_window_size(1440, 1000)


def follow(browser: webdriver.Chrome, by: str, what: str) -> None:
    """Click what loads a new page, and wait until it has."""
    old = browser.find_element(By.TAG_NAME, "html")
    browser.find_element(by, what).click()
    WebDriverWait(browser, 10).until(expected_conditions.staleness_of(old))


def text_of(browser: webdriver.Chrome, css: str) -> str:
    return browser.find_element(By.CSS_SELECTOR, css).text


def test_sign_in_refuses_a_wrong_key_and_sets_a_strict_httponly_cookie(server, browser) -> None:
    browser.get(f"{server}/console/fleet")
    assert browser.current_url == f"{server}/console/login"  # nobody signed in yet
    browser.find_element(By.ID, "key").send_keys("operator-key-but-wrong-0000")
    follow(browser, By.ID, "sign-in")
    assert "not an operator or admin key" in text_of(browser, ".flash.error")
    shot(browser, "login")
    browser.find_element(By.ID, "key").send_keys(OPERATOR_KEY)
    follow(browser, By.ID, "sign-in")
    assert browser.current_url == f"{server}/console/fleet"
    cookie = browser.get_cookie("fedota_console")
    assert cookie is not None
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/console" and cookie["expiry"] > 0


def test_every_page_opens_with_the_fleet_it_shows(server, browser) -> None:
    browser.get(f"{server}/console/fleet")
    assert text_of(browser, "#total-devices") == "40"
    assert text_of(browser, "#state-count-revoked") == "1"
    assert text_of(browser, "#state-count-failed") == "4"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#adoption-chart polyline.series")) == 2
    shot(browser, "fleet")

    follow(browser, By.ID, "nav-devices")
    first_page = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#devices tbody code")]
    follow(browser, By.ID, "next-page")
    second_page = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#devices tbody code")]
    assert len(first_page) == 2 * 25 and second_page  # id and base per row
    ids = first_page[::2] + second_page[::2]
    assert len(ids) == 40 and ids == sorted(ids)  # keyset pages: all, once, in order
    follow(browser, By.ID, "first-page")
    browser.find_element(By.NAME, "state").send_keys("failed")
    follow(browser, By.ID, "search")
    states = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#devices .badge")]
    assert states == ["failed"] * 4
    shot(browser, "devices")
    follow(browser, By.CSS_SELECTOR, "#devices tbody a")
    assert text_of(browser, "#device-state") == "failed"
    history = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#history .badge")]
    assert history == ["failed", "installed"]  # newest first

    follow(browser, By.ID, "nav-releases")
    release = text_of(browser, "#release-2")
    assert "delta v1→v2" in release and "full v2" in release
    assert "7.7 / 1e-05" in release and "ffa" in release and "golden_loss = 2.3" in release
    shot(browser, "releases")

    follow(browser, By.ID, "nav-audit")
    audit = text_of(browser, "#audit")
    assert "rollout.auto_pause" in audit and "release.publish" in audit


def test_pause_and_resume_a_rollout_by_clicking(server, browser) -> None:
    follow(browser, By.ID, "nav-rollouts")
    assert "failure rate 0.400 over 10 reports" in text_of(browser, "#progress-2")
    assert text_of(browser, "#state-1") == "active"
    follow(browser, By.ID, "pause-1")
    assert text_of(browser, "#did") == "Done: pause."
    assert text_of(browser, "#state-1") == "paused · operator"
    assert api_state(server, 1) == "paused"
    follow(browser, By.ID, "resume-1")
    assert text_of(browser, "#state-1") == "active"
    assert api_state(server, 1) == "active"
    transitions = text_of(browser, "#transitions")
    assert "pause" in transitions and "resume" in transitions
    follow(browser, By.ID, "nav-rollouts")
    shot(browser, "rollouts")
    follow(browser, By.ID, "nav-audit")
    assert "rollout.pause" in text_of(browser, "#audit")


def api_state(server: str, rollout_id: int) -> str:
    response = httpx.get(f"{server}/v1/rollouts/{rollout_id}", headers=auth("operator"))
    assert response.status_code == 200, response.text
    return str(response.json()["state"])


def test_a_post_without_or_with_a_wrong_csrf_token_is_refused(server, browser) -> None:
    follow(browser, By.ID, "nav-rollouts")
    browser.execute_script(  # a forged form: the right session cookie, a wrong token
        "document.querySelector('form[action$=\"/rollouts/1/pause\"] input[name=csrf]')"
        ".value = 'forged-token';"
    )
    follow(browser, By.ID, "pause-1")
    assert "CSRF token missing or wrong" in browser.page_source
    assert api_state(server, 1) == "active"

    cookie = browser.get_cookie("fedota_console")
    assert cookie is not None
    jar = {"fedota_console": cookie["value"]}
    with httpx.Client(base_url=server, cookies=jar) as client:
        assert client.get("/console/rollouts").status_code == 200  # the cookie is good
        for body in ({}, {"csrf": ""}, {"csrf": "x" * 43}):
            refused = client.post("/console/rollouts/1/pause", data=body)
            assert refused.status_code == 403, refused.text
    assert api_state(server, 1) == "active"


def test_sign_out_ends_the_session(server, browser) -> None:
    browser.get(f"{server}/console/fleet")
    follow(browser, By.ID, "logout")
    assert browser.current_url == f"{server}/console/login"
    browser.get(f"{server}/console/rollouts")
    assert browser.current_url == f"{server}/console/login"
