"""The chat page at `/` in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
driven by Selenium): load it, use a key, send a message, see the reasoning (dimmed, collapsible)
and the answer stream in, stop a stream, start a new chat, find the conversation again after a
reload. Set GPTOSS_SCREENSHOT=path.png to keep a screenshot of the page."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from test_server_support import ScriptedRunner, harmony, live_server

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
KEY = "sk-page"
SCRIPTS = {
    "think first": "<|channel|>analysis<|message|>Two plus two is four.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4<|return|>",
    "fibonacci": "<|channel|>analysis<|message|>The user wants a Python function. An iterative loop "
    "avoids recursion depth limits and runs in linear time.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Here is an iterative version:\n\n```python\n"
    "def fibonacci(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n```\n\nIt runs in **O(n)** time and O(1) memory; `fibonacci(10)` is 55.<|return|>",
    "weather?": "<|channel|>analysis<|message|>I should call the tool.<|end|>"
    "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
    '{"city": "Paris"}<|call|>',
    "long story": "<|channel|>final<|message|>" + "Once upon a time there was a story. " * 60 + "<|return|>",
}


def script(prompt: str) -> list[int]:
    key = max(SCRIPTS, key=lambda k: prompt.rfind(k))
    return harmony(SCRIPTS[key] if key in prompt else "<|channel|>final<|message|>Hello!<|return|>")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runner = ScriptedRunner(script, step_seconds=0.02)  # slow enough to watch a stream, and stop it
    with live_server(runner, tmp_path_factory.mktemp("web"), api_keys=(KEY,)) as live:
        live.runner = runner
        yield live


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def wait(driver, condition, seconds: float = 20):
    return WebDriverWait(driver, seconds, poll_frequency=0.05).until(lambda d: condition())


def send(driver, text: str) -> None:
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def last_answer(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]


def idle(driver) -> bool:
    return driver.find_element(By.ID, "send").is_displayed()


def test_the_page_and_its_files_load_without_a_key(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert httpx.get(server.url + "/ui/app.js").status_code == 200
    assert httpx.get(server.url + "/v1/models").status_code == 401  # the API itself stays locked
    assert httpx.get(server.url + "/ui/missing.js").status_code == 404


def test_chat_in_the_browser(server, browser, tmp_path):
    driver = browser
    driver.get(server.url + "/")
    driver.execute_script("localStorage.clear()")
    driver.refresh()

    # Without the key: the server's refusal is shown, not swallowed.
    send(driver, "think first")
    wait(driver, lambda: "API key" in last_answer(driver).find_element(By.CLASS_NAME, "meta").text)
    wait(driver, lambda: idle(driver))

    driver.find_element(By.ID, "api-key").send_keys(KEY)
    select = driver.find_element(By.ID, "effort")
    select.find_element(By.CSS_SELECTOR, "option[value=high]").click()
    driver.find_element(By.ID, "new-chat").click()
    send(driver, "think first")
    wait(driver, lambda: last_answer(driver).find_element(By.CLASS_NAME, "content").text == "2 + 2 = 4")
    wait(driver, lambda: idle(driver))
    assert "Reasoning: high" in server.runner.prompt_log[-1]
    answer = last_answer(driver)
    reasoning = answer.find_element(By.CLASS_NAME, "reasoning")
    assert reasoning.tag_name == "details" and reasoning.get_attribute("open") is None  # collapsed when done
    reasoning.find_element(By.TAG_NAME, "summary").click()
    text = reasoning.find_element(By.CLASS_NAME, "reasoning-text")
    assert text.text == "Two plus two is four."
    content = answer.find_element(By.CLASS_NAME, "content")
    assert text.value_of_css_property("color") != content.value_of_css_property("color")  # dimmed
    assert "tokens/s" in answer.find_element(By.CLASS_NAME, "meta").text

    # Stop a long answer half way: the text stops growing and the slot is freed.
    send(driver, "long story")
    wait(driver, lambda: len(last_answer(driver).find_element(By.CLASS_NAME, "content").text) > 40)
    driver.find_element(By.ID, "stop").click()
    wait(driver, lambda: idle(driver))
    stopped = last_answer(driver).find_element(By.CLASS_NAME, "content").text
    assert 0 < len(stopped) < len(SCRIPTS["long story"]) - 100
    assert last_answer(driver).find_element(By.CLASS_NAME, "meta").text == "Stopped"
    wait(driver, lambda: not server.runner.active)
    time.sleep(0.3)
    assert last_answer(driver).find_element(By.CLASS_NAME, "content").text == stopped

    # Tools from the settings: the call is shown in the answer.
    tools = driver.find_element(By.ID, "tools")
    tools.send_keys('[{"type": "function", "function": {"name": "get_weather"')
    send(driver, "weather?")
    wait(driver, lambda: "not valid JSON" in last_answer(driver).find_element(By.CLASS_NAME, "meta").text)
    tools.send_keys("}}]")
    send(driver, "weather?")
    wait(driver, lambda: idle(driver) and last_answer(driver).find_elements(By.CLASS_NAME, "tool-call"))
    call = last_answer(driver).find_element(By.CLASS_NAME, "tool-call").text
    assert call == 'get_weather({"city": "Paris"})'
    assert "get_weather" in server.runner.prompt_log[-1]
    tools.clear()

    # A new chat, then both conversations survive a reload.
    driver.find_element(By.ID, "new-chat").click()
    assert not driver.find_elements(By.CSS_SELECTOR, ".message")
    driver.find_element(By.ID, "temperature").send_keys("\ue012" * 3)  # arrow left: 1.0 → 0.7
    send(driver, "Write fibonacci in Python")
    wait(driver, lambda: "O(1) memory" in last_answer(driver).find_element(By.CLASS_NAME, "content").text)
    wait(driver, lambda: idle(driver))
    assert last_answer(driver).find_element(By.TAG_NAME, "pre").text.startswith("def fibonacci")
    content = last_answer(driver).find_element(By.CLASS_NAME, "content")
    assert content.find_element(By.CSS_SELECTOR, "span code").text == "fibonacci(10)"
    assert content.find_element(By.TAG_NAME, "strong").text == "O(n)"
    driver.refresh()
    titles = [c.text for c in driver.find_elements(By.CLASS_NAME, "chat-link")]
    assert titles[:2] == ["Write fibonacci in Python", "think first"]
    assert driver.find_element(By.ID, "api-key").get_attribute("value") == KEY
    assert driver.find_element(By.ID, "temperature-value").text == "0.7"
    driver.find_elements(By.CLASS_NAME, "chat-link")[1].click()
    users = [m.text for m in driver.find_elements(By.CSS_SELECTOR, ".message.user")]
    assert users == ["think first", "long story", "weather?", "weather?"]

    # The screenshot: the fibonacci chat, its reasoning open.
    driver.find_elements(By.CLASS_NAME, "chat-link")[0].click()
    last_answer(driver).find_element(By.TAG_NAME, "summary").click()
    shot = tmp_path / "chat.png"
    assert driver.save_screenshot(str(shot)) and shot.read_bytes()[:4] == b"\x89PNG"
    if target := os.environ.get("GPTOSS_SCREENSHOT"):
        Path(target).write_bytes(shot.read_bytes())
