"""
The web demo (`python -m evl_hf.app`) in a real browser: the app runs in a subprocess, headless Chromium (Debian's
`chromium` and `chromium-driver`, which scripts/install.sh installs) is driven with Selenium, and what the page shows
is checked against `pipeline("video-classification")` run here.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from helpers import save_tiny_classifier, write_clip
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from transformers import pipeline

from evl_hf.data.synthetic import render_clip


LABELS = {i: name for i, name in enumerate(["left", "right", "up", "down", "still"])}
TOP_K = 3
SERVER_START_TIMEOUT = 90  # seconds; importing Gradio and torch on a busy 2-core machine takes most of it
PAGE_TIMEOUT = 30  # seconds for any one thing to appear in the page
TOP_LABEL = "#labels [data-testid=label-output-value]"  # gr.Label's headline: its top class


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("evl-app-model"), LABELS, decoder_scale=0.5)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A clip to upload, an example clip (in a class folder, as videofolders keep them) and a file that is no video."""
    directory = tmp_path_factory.mktemp("evl-app-clips")
    examples = directory / "examples"
    (examples / "moving_right").mkdir(parents=True)
    rng = np.random.default_rng(0)
    return {
        # 48 frames at 25 fps: 16 sampled frames, longer than one 4-frame window, so the timeline has several.
        "upload": write_clip(directory / "moving_left.mp4", render_clip("moving_left", 48, 64, rng)),
        "example": write_clip(examples / "moving_right" / "clip_0.mp4", render_clip("moving_right", 48, 64, rng)),
        "examples_dir": examples,
        "not_a_video": _write_text(directory / "notes.mp4", "These are notes, not a video.\n"),
    }


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(saved_model, clips, tmp_path_factory):
    """`python -m evl_hf.app` on a free port, answering HTTP; stopped after the module's tests."""
    workdir = tmp_path_factory.mktemp("evl-app-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
        # Uploads and example copies stay in this test's folder, not the shared /tmp/gradio.
        GRADIO_TEMP_DIR=str(workdir / "gradio"),
    )  # fmt: skip
    command = [sys.executable, "-m", "evl_hf.app", "--model", str(saved_model), "--port", str(port),
               "--top_k", str(TOP_K), "--examples", str(clips["examples_dir"])]  # fmt: skip
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if server.poll() is not None:
                pytest.fail(f"The app exited ({server.returncode}) before serving:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                log = log_path.read_text()[-3000:]
                pytest.fail(f"The app did not answer {url} in {SERVER_START_TIMEOUT}s:\n{log}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through the system chromedriver (never Selenium Manager, which would download one)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")  # Debian's name, Ubuntu's
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        missing = [name for name, path in (("chromium", binary), ("chromedriver", driver_path)) if not path]
        pytest.skip(
            f"The browser test needs {' and '.join(missing)}: apt-get install chromium chromium-driver "
            "(scripts/install.sh does)."
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1600", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(argument)
    # The page's network requests, to check that it reaches nothing but the app.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(browser, condition, what: str):
    try:
        return WebDriverWait(browser, PAGE_TIMEOUT).until(condition)
    except TimeoutException:
        pass  # failed below, outside the handler, so that the report is ours and not Selenium's empty message
    toasts = [element.text for element in browser.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")]
    pytest.fail(f"Timed out after {PAGE_TIMEOUT}s waiting for {what}; messages in the page: {toasts}")


def open_page(browser, url):
    browser.get(url)
    return wait_for(
        browser, expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#video input[type=file]")),
        "the video upload box",
    )  # fmt: skip


def video_loaded(name: str):
    """The video box plays `name` (Gradio shows its player once the upload is on the server)."""
    selector = f"#video video[data-testid=Video-player][src$='/{name}']"
    return expected_conditions.presence_of_element_located((By.CSS_SELECTOR, selector))


def classify_in_page(browser, url, clip: Path):
    """Upload `clip`, press Classify, wait for every output, and read the labels the page shows."""
    open_page(browser, url).send_keys(str(clip))
    wait_for(browser, video_loaded(clip.name), f"the upload of {clip.name}")
    return press_classify_and_read(browser)


def press_classify_and_read(browser):
    browser.find_element(By.CSS_SELECTOR, "#submit").click()
    wait_for(browser, expected_conditions.presence_of_element_located((By.CSS_SELECTOR, TOP_LABEL)), "the labels")
    top_label = browser.find_element(By.CSS_SELECTOR, TOP_LABEL).text
    shown = []
    for entry in browser.find_elements(By.CSS_SELECTOR, "#labels .confidence-set"):
        meter = entry.find_element(By.CSS_SELECTOR, "meter")
        shown.append({
            "label": meter.get_attribute("aria-label"),
            "score": float(meter.get_attribute("value")),  # the exact score the app sent
            "percent": entry.find_element(By.CSS_SELECTOR, ".confidence").text,  # what the user reads
        })  # fmt: skip
    return top_label, shown


def check_labels(top_label, shown, expected):
    assert top_label == expected[0]["label"]
    assert [entry["label"] for entry in shown] == [entry["label"] for entry in expected]
    np.testing.assert_allclose([entry["score"] for entry in shown], [entry["score"] for entry in expected], atol=1e-6)
    assert [entry["percent"] for entry in shown] == [f"{round(entry['score'] * 100)}%" for entry in expected]


def check_pictures(browser):
    """The timeline plot and the heatmap grid are shown as images (PNG data or files served by the app)."""
    for element_id, what in (("timeline", "the timeline plot"), ("heatmaps", "the attention heatmaps")):
        image = wait_for(
            browser, expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, f"#{element_id} img")), what
        )
        wait_for(browser, lambda _: image.get_attribute("naturalWidth") not in (None, "0"), f"{what} to load")
        assert int(image.get_attribute("naturalWidth")) > 200 and int(image.get_attribute("naturalHeight")) > 100


def requested_hosts(browser) -> set[str]:
    hosts = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            request_url = urlparse(message["params"]["request"]["url"])
            if request_url.scheme not in ("data", "blob", "about"):
                hosts.add(request_url.netloc)
    return hosts


def test_the_page_classifies_an_upload_and_an_example_like_the_pipeline(browser, saved_model, clips, app_url):
    classifier = pipeline("video-classification", model=str(saved_model))
    expected = classifier(str(clips["upload"]), top_k=TOP_K)
    # A wrongly wired label or score must show: the top score stands clear of the second, in exact and shown figures.
    assert expected[0]["score"] - expected[1]["score"] > 0.05, expected

    top_label, shown = classify_in_page(browser, app_url, clips["upload"])
    check_labels(top_label, shown, expected)
    check_pictures(browser)

    # The example clip: picked from the examples under the upload box, then classified.
    open_page(browser, app_url)
    wait_for(browser, expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "button.gallery-item")),
             "the example clips").click()  # fmt: skip
    wait_for(browser, video_loaded(clips["example"].name), "the example clip in the video box")
    top_label, shown = press_classify_and_read(browser)
    expected_example = classifier(str(clips["example"]), top_k=TOP_K)
    # What the page showed for the upload would not pass for the example's.
    assert abs(expected_example[0]["score"] - expected[0]["score"]) > 1e-3, (expected_example, expected)
    check_labels(top_label, shown, expected_example)
    check_pictures(browser)

    assert requested_hosts(browser) == {urlparse(app_url).netloc}


def test_a_file_that_is_not_a_video_gets_an_error_message_and_the_app_goes_on(browser, clips, app_url):
    open_page(browser, app_url).send_keys(str(clips["not_a_video"]))
    wait_for(browser, video_loaded(clips["not_a_video"].name), "the upload of the text file")
    browser.find_element(By.CSS_SELECTOR, "#submit").click()

    def our_message(_):
        texts = [element.text for element in browser.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]")]
        return next((text for text in texts if "Cannot read this video" in text), False)

    message = wait_for(browser, our_message, "the error message")
    assert "notes.mp4: not a readable video file" in message
    assert str(clips["not_a_video"].parent) not in message and "gradio" not in message  # the name, not the temp path
    assert not browser.find_elements(By.CSS_SELECTOR, TOP_LABEL)
    # The server is still up and answers the next request.
    top_label, _ = classify_in_page(browser, app_url, clips["upload"])
    assert top_label in LABELS.values()



def test_examples_are_every_video_under_the_folder(clips, tmp_path, caplog):
    """`--examples DIR` offers every video under DIR, whatever FFmpeg container it is in (each clip below is the
    real container its suffix names), not only mp4-like ones; a folder with none is said to give no examples."""
    from evl_hf.app import find_examples
    from helpers import index_coded_frames

    frames = index_coded_frames(8, 32, 32)
    containers = {"clip.mpg": "mpeg2video", "clip.mpeg": "mpeg1video", "clip.ts": "libx264", "clip.m2ts": "libx264",
                  "clip.3gp": "libx264", "clip.flv": "libx264", "clip.mp4": "libx264"}  # fmt: skip
    (tmp_path / "examples" / "class").mkdir(parents=True)
    for name, codec in containers.items():
        write_clip(tmp_path / "examples" / "class" / name, frames, codec=codec)
    (tmp_path / "examples" / "notes.txt").write_text("not a video")
    assert [Path(path).name for path in find_examples(tmp_path / "examples")] == sorted(containers)
    (tmp_path / "empty").mkdir()
    with caplog.at_level("WARNING"):
        assert find_examples(tmp_path / "empty") == []
    assert f"{tmp_path / 'empty'}: no video files" in caplog.text


def test_uploads_are_limited_in_size(monkeypatch):
    """`--max_file_size` reaches Gradio's launch (an upload over it is refused by Gradio's server), 1 GB by default."""
    import evl_hf.app

    launched = []

    class Demo:
        def launch(self, **kwargs):
            launched.append(kwargs)

    built = []
    monkeypatch.setattr(evl_hf.app, "build_demo", lambda *args, **kwargs: built.append(kwargs) or Demo())
    evl_hf.app.main(["--model", "unused"])
    evl_hf.app.main(["--model", "unused", "--max_file_size", "20mb", "--frame_sampling_rate", "4"])
    assert [kwargs["max_file_size"] for kwargs in launched] == ["1gb", "20mb"]
    assert [kwargs["frame_sampling_rate"] for kwargs in built] == [None, 4]
    assert all(kwargs["share"] is False for kwargs in launched)
    for bad in ("1.5gb", "0", "abc"):  # refused by name before the model loads
        with pytest.raises(SystemExit):
            evl_hf.app.main(["--model", "unused", "--max_file_size", bad])
    assert len(launched) == 2


def test_a_checkpoint_sampling_uniformly_needs_a_timeline_stride_given_once(saved_model, clips, tmp_path):
    """Its processor has no fixed stride for the timeline's windows: the page used to fail every request. Now the
    stride is asked for when the page is built, by `frame_sampling_rate` (`--frame_sampling_rate`)."""
    import evl_hf.app
    from evl_hf import EVLVideoProcessor

    uniform = tmp_path / "uniform"
    shutil.copytree(saved_model, uniform)
    EVLVideoProcessor.from_pretrained(saved_model, frame_sampling="uniform").save_pretrained(uniform)
    with pytest.raises(ValueError, match="give `frame_sampling_rate`"):
        evl_hf.app.build_demo(uniform)
    demo = evl_hf.app.build_demo(uniform, frame_sampling_rate=2)
    (analyse,) = [block.fn for block in demo.fns.values() if block.fn.__name__ == "analyse"]
    labels, _, _ = analyse(str(clips["upload"]))
    expected = pipeline("video-classification", model=str(uniform))(str(clips["upload"]), top_k=5)
    assert labels == {entry["label"]: entry["score"] for entry in expected}
    with pytest.raises(SystemExit) as ended:  # the command line says so in one line
        evl_hf.app.main(["--model", str(uniform)])
    assert ended.value.code == 1


def test_a_regression_model_shows_its_values_not_confidences(clips, tmp_path):
    # One output without a problem_type trains as a regression; the page showed its value in a gr.Label, as a
    # confidence (3.7 as 370%).
    import gradio as gr

    import evl_hf.app

    directory = save_tiny_classifier(tmp_path / "one-output", {0: "speed"})
    demo = evl_hf.app.build_demo(directory)
    (header,) = [block for block in demo.blocks.values() if isinstance(block, gr.Markdown)]
    assert "(1 output, a regression)" in header.value, header.value
    (shown,) = [block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "labels"]
    assert isinstance(shown, gr.JSON) and not isinstance(shown, gr.Label)
    (analyse,) = [block.fn for block in demo.fns.values() if block.fn.__name__ == "analyse"]
    values, _, _ = analyse(str(clips["upload"]))
    (expected,) = pipeline("video-classification", model=str(directory))(str(clips["upload"]))
    assert values == {"speed": expected["score"]} and expected["score"] != 1.0
    # A regression of several outputs shows all of them, whatever top_k ranks.
    three = save_tiny_classifier(tmp_path / "three-outputs", {0: "speed", 1: "size", 2: "angle"})
    config = json.loads((three / "config.json").read_text())
    (three / "config.json").write_text(json.dumps({**config, "problem_type": "regression"}))
    demo = evl_hf.app.build_demo(three, top_k=2)
    (analyse,) = [block.fn for block in demo.fns.values() if block.fn.__name__ == "analyse"]
    values, figure, _ = analyse(str(clips["upload"]))
    assert sorted(values) == ["angle", "size", "speed"]
    # and the timeline draws every output (a value outside a window's top 2 was left out, or drawn as 0)
    assert sorted(line.get_label() for line in figure.axes[0].get_lines()) == ["angle", "size", "speed"]
