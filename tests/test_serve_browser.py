"""The chat page in headless Chromium (Debian `chromium` + its chromedriver, driven by Selenium).

Types a ShapeWorld prompt, uploads a canvas, sends, and waits until the generated images appear in
the page as they are drawn; saves a screenshot to out/test-serve-browser/chat.png.
"""

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from generation_model import trained_tiny_model, training_prompt
from live_server import live_server
from duetgen.infer.pipeline import DuetGenPipeline
from duetgen.serve.server import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = Path(__file__).resolve().parents[1] / "out" / "test-serve-browser" / "chat.png"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                                reason="needs Debian chromium and chromedriver at /usr/bin (apt-get install chromium chromium-driver)")]
torch.set_num_threads(1)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="duetgen-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1100,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_chat_page_streams_text_and_images(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    text, canvas = training_prompt(0)
    canvas_path = tmp_path / "canvas.png"
    canvas.resize((128, 128)).save(canvas_path)
    pipe = DuetGenPipeline(trained_tiny_model(), model_id="tiny-fit")
    with live_server(create_app(pipe)) as url:
        browser.get(url)
        wait = WebDriverWait(browser, 120)
        wait.until(lambda d: "preset tiny" in d.find_element(By.ID, "model-info").text)
        browser.find_element(By.ID, "prompt").send_keys(text)
        browser.find_element(By.ID, "image-input").send_keys(str(canvas_path))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))
        browser.find_element(By.CSS_SELECTOR, "details.settings summary").click()  # open the settings
        browser.find_element(By.ID, "steps").send_keys("3")
        browser.find_element(By.ID, "send").click()

        # the user's bubble shows the uploaded canvas; the answer's images appear as they are drawn
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.user img.input"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant img.generated"))
        wait.until(lambda d: "image(s)" in d.find_element(By.ID, "status").text)
        generated = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant img.generated")
        assert generated
        for img in generated:
            assert img.get_attribute("src").startswith("data:image/png;base64,")
            assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 32
        answer_text = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .text").text
        assert answer_text.startswith("Step")
        status = browser.find_element(By.ID, "status").text
        assert status.startswith(f"{len(generated)} image(s)")
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .error")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOT))

        # bad input from the page: an error message in the page, and the server keeps serving
        browser.find_element(By.ID, "prompt").send_keys("x" * 4001)
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .error"))
        assert "413" in browser.find_element(By.CSS_SELECTOR, ".msg.assistant .error").text
    assert SCREENSHOT.stat().st_size > 1000
