"""The built-in chat page in a real headless browser (Debian's chromium through selenium): load it, send a message
with an image, and see the streamed answer equal the API's for the same request."""

import base64
import os
import shutil
import urllib.error
import urllib.request

import pytest

from compiled import compile_artifact, llm_shape, visual_budget
from conftest import random_image
from test_serve import client, start_server, stop_server

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (BROWSER and DRIVER):
        message = "no browser: apt install chromium chromium-driver"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI must have it: .ci/run installs it)")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # no driver download: Debian's
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_server(checkpoints, tmp_path_factory):
    ws = tmp_path_factory.mktemp("webui_ws")
    visual = compile_artifact("qwen2_5_vl_visual.yaml", checkpoints["tiny"], ws, *visual_budget())
    llm = compile_artifact("qwen2_5_vl_llm.yaml", checkpoints["tiny"], ws, *llm_shape(), "--batch-size", "2")
    base, proc = start_server(str(llm), str(visual), "--api-key", "k", "--served-model-name", "tiny-vl",
                              "--max-images-per-request", "3")
    yield base, ws, (llm, visual)
    stop_server(proc)


def wait_reply(driver, count, timeout=120):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def finished(d):
        replies = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        return len(replies) >= count and replies[count - 1].get_attribute("data-state") in ("done", "error")

    WebDriverWait(driver, timeout).until(finished)
    reply = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[count - 1]
    return reply.get_attribute("data-state"), reply.find_element(By.CSS_SELECTOR, ".text").get_property("textContent")


def test_chat_page_streams_the_same_answer_as_the_api(browser, page_server):
    from selenium.webdriver.common.by import By

    base, ws, _ = page_server
    path = ws / "page.png"
    random_image(56, 84, seed=7).save(path)
    browser.get(base + "/")
    assert "tiny-vl" in browser.find_element(By.ID, "model-name").text
    assert "context 320 tokens" in browser.find_element(By.ID, "model-limits").text
    assert "up to 3 images" in browser.find_element(By.ID, "model-limits").text
    browser.find_element(By.ID, "api-key").send_keys("k")
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("12")
    browser.find_element(By.ID, "file").send_keys(str(path))
    browser.find_element(By.ID, "prompt").send_keys("What is in the picture?")
    browser.find_element(By.ID, "send").click()
    state, text = wait_reply(browser, 1)
    assert state == "done", browser.find_element(By.ID, "error").text
    # The same request through the API (the page sends the file's bytes as a data: URI).
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    out = client(base).chat.completions.create(model="tiny-vl", max_tokens=12, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What is in the picture?"}]}])
    assert text and text == out.choices[0].message.content and out.usage.completion_tokens >= 1

    # A second turn carries the history; a wrong key is shown as the server's error, not a blank answer.
    browser.find_element(By.ID, "api-key").clear()
    browser.find_element(By.ID, "api-key").send_keys("wrong")
    browser.find_element(By.ID, "prompt").send_keys("And now?")
    browser.find_element(By.ID, "send").click()
    state, _ = wait_reply(browser, 2)
    assert state == "error" and "invalid API key" in browser.find_element(By.ID, "error").text


def test_chat_page_is_self_contained_and_can_be_turned_off(page_server):
    base, _, (llm, visual) = page_server
    html = urllib.request.urlopen(base + "/", timeout=10).read().decode()
    assert "http://" not in html and "https://" not in html  # nothing from a CDN: hosts are offline
    for asset in ("/webui/app.js", "/webui/style.css"):
        body = urllib.request.urlopen(base + asset, timeout=10).read().decode()
        assert "http://" not in body and "https://" not in body
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/webui/../server.py", timeout=10)
    assert err.value.code == 404
    base2, proc = start_server(str(llm), str(visual), "--no-webui")
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base2 + "/", timeout=10)
        assert err.value.code == 404
    finally:
        stop_server(proc)
