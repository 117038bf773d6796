"""The search page at GET / in a real headless Chromium (Debian's chromium + chromedriver, Selenium).

    .venv/bin/python -m pytest -q tests/test_search_page.py
    REPFORGE_SCREENSHOT=docs/search-page.png .venv/bin/python -m pytest -q tests/test_search_page.py

A real app (tiny timm ViT, the digits test set indexed with where each row came from) behind
a token; the browser opens /?id=..., gives the token when the page asks, waits until k
thumbnails have decoded, uploads a file through the page, clicks a result, and saves a
screenshot. Skipped, saying why, only when no Chromium is installed (.ci/run installs it).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.test_serve_live import START_TIMEOUT_S, TOKEN, tiny_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
K = 5

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no chromium + chromedriver installed (apt-get install chromium chromium-driver; .ci/run does)",
)


@pytest.fixture(scope="module")
def page_app(ray_local, digits_data, tmp_path_factory):
    import pyarrow.parquet as pq
    import torch

    from serve.control import start_app, stop_app
    from system import storage
    from system.embed.batch import embed_images, embeddings_metadata, embeddings_table, with_source
    from system.index import build_index
    from tests.conftest import free_port

    root = tmp_path_factory.mktemp("page")
    files = storage.parquet_files(digits_data[1])
    table = pq.read_table(files[0])
    ids, images = table.column("id").to_pylist()[:300], table.column("image").to_pylist()[:300]
    model, meta = tiny_model(root, 0, "model")
    with torch.inference_mode():
        vectors = embed_images(model, meta["preprocessing"], images)
    passthrough = {"label": table.column("label").to_pylist()[:300]}
    embeddings = embeddings_table(ids, vectors, passthrough, embeddings_metadata(meta))
    (root / "emb").mkdir()  # with where each row came from, as `repforge embed` writes it
    pq.write_table(with_source(embeddings, files[0]), root / "emb" / "p.parquet")
    build_index(str(root / "emb"), str(root / "index"), progress=False)
    (root / "token").write_text(TOKEN)
    args = {"model": str(root / "model"), "index": str(root / "index"), "token_file": str(root / "token")}
    url = start_app({**args, "replica_cpus": 0}, port=free_port(), timeout_s=START_TIMEOUT_S)
    try:
        yield url, ids, images, root
    finally:
        stop_app()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition(driver)
        if value:
            return value
        time.sleep(0.2)
    status = driver.execute_script("return document.getElementById('status').textContent")
    raise AssertionError(f"timed out waiting for {what}; page status: {status!r}")


def decoded_thumbnails(driver) -> list[str]:
    """Ids of the result cards whose thumbnail has decoded (naturalWidth > 0)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#results .hit')]"
        ".filter(c => { const i = c.querySelector('img'); return i.complete && i.naturalWidth > 0; })"
        ".map(c => c.dataset.id)"
    )


def answer_token_prompt(driver) -> None:
    # The page asks once (window.prompt) when the API answers 401.
    from selenium.common.exceptions import NoAlertPresentException

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            alert = driver.switch_to.alert
        except NoAlertPresentException:
            time.sleep(0.1)
            continue
        alert.send_keys(TOKEN)
        alert.accept()
        return
    raise AssertionError("the page never asked for the token")


def test_search_page_in_a_real_browser(page_app, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By

    url, ids, images, _ = page_app
    first = ids[7]
    browser.get(f"{url}/?id={first}&k={K}")
    answer_token_prompt(browser)
    # k thumbnails decoded; the query item first (its own nearest neighbour).
    shown = wait_for(
        browser, lambda d: len(decoded_thumbnails(d)) == K and decoded_thumbnails(d), "k thumbnails"
    )
    assert shown[0] == first and len(set(shown)) == K
    assert browser.find_element(By.ID, "k").get_attribute("value") == str(K)
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
    assert "score" in cards[0].text and "label" in cards[0].text
    # Upload a file through the page: an image of the index, so its own id comes back first.
    picked = tmp_path / "query.png"
    Image.open(io.BytesIO(images[42])).save(picked)
    browser.find_element(By.ID, "file").send_keys(str(picked))
    wait_for(
        browser,
        lambda d: (got := decoded_thumbnails(d)) and got[0] == ids[42] and len(got) == K,
        "the uploaded image's neighbours",
    )
    assert "id" not in browser.current_url.split("?", 1)[-1].split("&")[0]  # an upload is no ?id=
    # Click a result: the page searches by it and puts it in the URL.
    target = browser.find_elements(By.CSS_SELECTOR, "#results .hit")[1]
    clicked = target.get_attribute("data-id")
    target.click()
    wait_for(
        browser,
        lambda d: (got := decoded_thumbnails(d)) and got[0] == clicked,
        "the clicked item's neighbours",
    )
    assert f"id={clicked.replace('/', '%2F')}" in browser.current_url
    screenshot = os.environ.get("REPFORGE_SCREENSHOT") or str(Path(tempfile.gettempdir()) / "search-page.png")
    assert browser.save_screenshot(screenshot)
    assert Image.open(screenshot).size[0] > 0
