"""The live-captioning page in a real headless Chromium (Selenium): `casa-hf serve` started as the README says, a video
file generated here is chosen, played, sampled, captioned and charted; then Chromium's fake webcam.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Set CASA_SAVE_SCREENSHOT=1 to refresh
`results/serve_page.png`, the README's screenshot.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from casa_hf.training.synthetic_vqa import Scene, render

pytestmark = pytest.mark.slow  # headless Chromium

ROOT = Path(__file__).resolve().parents[1]
COLOURS = ("red", "green", "blue", "yellow")


def write_video(path: Path, seconds: int = 4, fps: int = 10, size: int = 112) -> None:
    """A VP8 WebM video: one shape whose colour changes every second."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 2_000_000
        for second in range(seconds):
            image = render(Scene(COLOURS[second % 4], "circle", 1, 0.5, 0.5), size, rng)
            for _ in range(fps):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture
def server():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "casa_hf.cli", "serve", "--model", "tiny", "--port", str(port)]
    process = subprocess.Popen(command, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/health")
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "casa-hf serve did not come up"
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=10)


def live_sessions(server: str) -> int:
    return json.loads(urllib.request.urlopen(f"{server}/health").read())["sessions"]


def chromium() -> webdriver.Chrome:
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, (
        "install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    options.add_argument("--autoplay-policy=no-user-gesture-required")
    options.add_argument("--use-fake-device-for-media-stream")  # a synthetic webcam
    options.add_argument("--use-fake-ui-for-media-stream")  # and the permission granted
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_page_captions_a_video_file_and_the_webcam(server, tmp_path):
    video = tmp_path / "shapes.webm"
    screenshot = bool(os.environ.get("CASA_SAVE_SCREENSHOT"))
    write_video(video, seconds=12 if screenshot else 4)  # the README's screenshot shows a longer run
    browser = chromium()
    try:
        browser.get(server)
        WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "model").text == "tiny")
        browser.find_element(By.ID, "file").send_keys(str(video))
        for field, value in (("fps", "3"), ("window", "64")):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        browser.find_element(By.ID, "start").click()
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#captions .caption"))
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "stop").get_attribute("disabled"))  # ended
        captions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#captions .caption")]
        # a 4 s video sampled at 3 frames per second, in real time: frames that come while one is captioned are
        # skipped, as in a live feed, so a busy machine captions fewer
        assert len(captions) >= 3, captions
        assert all(text.split("] ", 1)[1].strip() for text in captions), captions  # each frame got a caption
        said = {text.split("] ", 1)[1].split(" ")[0].rstrip(".") for text in captions}
        assert said & set(COLOURS), captions  # the model names colours it saw in the video
        points = browser.execute_script("return points.map(p => [p.time_to_first_token_ms, p.cache_tokens])")
        assert len(points) == len(captions) and all(ttft > 0 and tokens > 0 for ttft, tokens in points)
        assert max(tokens for _, tokens in points) <= 4 + 64 + 30  # the 64-token window bounds it (+ sink, one turn)
        assert "TTFT" in browser.find_element(By.ID, "stats").text
        status = browser.find_element(By.ID, "status").text
        assert not status, status
        WebDriverWait(browser, 10).until(lambda b: live_sessions(server) == 0)  # the page deletes its session
        shot = ROOT / "results" / "serve_page.png" if screenshot else tmp_path / "page.png"
        assert browser.save_screenshot(str(shot))

        browser.find_element(By.ID, "webcam").click()  # then Chromium's fake webcam, until Stop
        WebDriverWait(browser, 20).until(lambda b: b.execute_script("return video.srcObject !== null"))
        browser.find_element(By.ID, "start").click()
        WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#captions .caption")) >= 2)
        assert live_sessions(server) == 1
        browser.find_element(By.ID, "stop").click()
        WebDriverWait(browser, 30).until(lambda b: b.execute_script("return session === null && !running"))
        assert not browser.find_element(By.ID, "status").text
        WebDriverWait(browser, 10).until(lambda b: live_sessions(server) == 0)
    finally:
        browser.quit()
