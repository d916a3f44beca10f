"""The app in a real browser: Playwright driving Debian's Chromium (``apt-get install chromium``).

Each test uploads an example in one tab, clicks, and checks that the results appear; a
screenshot of every tab goes to ``test-output/browser/`` (and to ``$ATOKEN_SCREENSHOTS`` when
set, which ``scripts/screenshots.py`` uses for the README).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.app_support import (
    EXAMPLES,
    MESHES,
    OUTPUT,
    VIDEO,
    app_server,
    text_as_png,
    thin_rod,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get)"),
]
SHOTS = OUTPUT / "browser"
TIMEOUT = 60_000  # ms per wait; the slowest step (a first MiniLM load) takes about 10 s


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"],
        )
        yield b
        b.close()


def _open_page(browser):
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(TIMEOUT)
    pg.goto(app_server()["url"])
    pg.wait_for_selector("#image-input")
    return pg


@pytest.fixture(scope="module")
def page(browser):
    """One page (one session) for the tests that chain results between tabs."""
    pg = _open_page(browser)
    yield pg
    pg.close()


@pytest.fixture
def fresh_page(browser):
    """A page of its own: a new session, untouched by what earlier tests left on theirs."""
    pg = _open_page(browser)
    yield pg
    pg.close()


def shot(page, name: str, selector: str | None = None) -> Path:
    """Save a screenshot (of an element or the page) under the test output folder."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    if os.environ.get("ATOKEN_SCREENSHOTS"):  # README pictures: no toasts left by earlier tests
        page.add_style_tag(content=".toast-wrap { display: none !important; }")
    if selector:
        page.locator(selector).screenshot(path=str(path))
    else:
        page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("ATOKEN_SCREENSHOTS")
    if extra:  # README copies: 256-colour PNGs (a third of the size, still lossless UI text)
        from PIL import Image

        Path(extra).mkdir(parents=True, exist_ok=True)
        with Image.open(path) as im:
            small = im.convert("RGB").quantize(
                256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
            )
            small.save(Path(extra) / path.name, optimize=True)
    assert path.stat().st_size > 10_000
    return path


def upload(page, selector: str, path: Path | str) -> None:
    page.locator(f"{selector} input[type=file]").set_input_files(str(path))


def open_tab(page, name: str) -> None:
    """Click a tab and wait until it is selected.

    Under load the 3D test once waited 60 s for a viewer in a tab that had not opened; a lost
    click is the likely cause, and a second click is what a user would do. (A click that hangs
    because the page's main thread is busy, e.g. software WebGL drawing the duck's Gaussians in
    screenshot mode, still fails after the default timeout.)
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    tab = page.get_by_role("tab", name=name, exact=True)
    for _ in range(3):
        tab.click()
        try:
            page.wait_for_function(
                "n => [...document.querySelectorAll('[role=tab]')].some("
                "t => t.textContent.trim() === n && t.getAttribute('aria-selected') === 'true')",
                arg=name,
                timeout=5_000,
            )
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"tab {name!r} did not open after 3 clicks")


def loaded_images(page, selector: str) -> int:
    """Images inside ``selector`` that finished loading with real pixels."""
    return page.evaluate(
        "s => [...document.querySelectorAll(s + ' img')]"
        ".filter(i => i.complete && i.naturalWidth > 0).length",
        selector,
    )


def wait_plot(page, selector: str) -> None:
    page.wait_for_selector(f"{selector} .js-plotly-plot .main-svg")


def wait_video(page, selector: str) -> None:
    """A <video> with a source that the browser could decode (it knows its size)."""
    page.wait_for_function(
        "s => { const v = document.querySelector(s + ' video');"
        " return v && v.readyState >= 1 && v.videoWidth > 0; }",
        arg=selector,
    )


def canvas_size(page, selector: str) -> tuple[float, float]:
    box = page.locator(f"{selector} canvas").first.bounding_box()
    return (box["width"], box["height"]) if box else (0.0, 0.0)


def test_image_tab(page):
    open_tab(page, "Image")
    upload(page, "#image-input", EXAMPLES / "astronaut.png")
    page.wait_for_function("() => document.querySelector('#image-preview img')?.naturalWidth > 0")
    page.click("#image-run")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#image-slider img')]"
        ".filter(i => i.complete && i.naturalWidth > 0).length >= 2"
    )
    page.wait_for_selector("#image-metrics :text('psnr')")
    page.wait_for_selector("#image-metrics :text('perceptual_means')")
    assert loaded_images(page, "#image-heatmap") == 1
    for plot in ("#latent-hist", "#latent-scatter", "#latent-pooled"):
        wait_plot(page, plot)
    assert loaded_images(page, "#latent-pca") == 1 and loaded_images(page, "#latent-maps") == 1
    assert "safetensors" in page.locator("#image-files").inner_text()
    shot(page, "image_tab")


def test_codec_panel_after_a_reconstruction(page):
    open_tab(page, "Image")
    upload(page, "#image-input", EXAMPLES / "coffee.png")
    page.get_by_text("Against JPEG / WebP / AVIF at the same bits").click()  # open the panel
    page.click("#image-run")
    # a new run empties the panel: its numbers were for the last reconstruction
    page.wait_for_selector("#codec-table :text('compare this reconstruction')")
    page.wait_for_selector("#image-metrics :text('perceptual')")
    page.click("#codec-run")
    page.wait_for_selector("#codec-table :text('How the tokens')")
    table = page.locator("#codec-table").inner_text()
    for name in ("tokens", "JPEG", "WebP", "AVIF"):
        row = next(line for line in table.splitlines() if line.strip().startswith(name))
        numbers = [float(x) for x in re.findall(r"\d+\.\d+", row)]
        assert len(numbers) >= 4, row  # bpp, PSNR, SSIM, perceptual distance
    page.wait_for_function(
        "() => [...document.querySelectorAll('#codec-gallery img')]"
        ".filter(i => i.complete && i.naturalWidth > 0).length >= 4"
    )
    wait_plot(page, "#codec-plot")
    legend = page.locator("#codec-plot .legend").text_content()
    assert "JPEG" in legend and "AVIF" in legend and "tokens" in legend
    assert page.locator("#codec-plot .scatterlayer .trace").count() >= 6
    assert ".avif" in page.locator("#codec-files").inner_text()
    assert "Traceback" not in page.inner_text("body")
    shot(page, "codec_panel", "#codec-panel")


# toasts shown so far on the page (a MutationObserver counts them, installed on first use)
TOASTS_JS = """() => {
  if (window.__toasts === undefined) {
    window.__toasts = 0;
    new MutationObserver(ms => ms.forEach(m => m.addedNodes.forEach(n => {
      if (n.nodeType === 1 && (n.matches('.toast-body') || n.querySelector('.toast-body')))
        window.__toasts++;
    }))).observe(document.body, {childList: true, subtree: true});
  }
  return window.__toasts;
}"""


def count_text(page, text: str) -> int:
    """How many times ``text`` shows on the page (toasts included).

    Gradio's screen-reader live region (``.sr-only``, off screen) repeats a validation message
    for a second, up to 5 s late (it announces at most once per 5 s): that is not on the page
    a visitor sees, so it is not counted."""
    return page.evaluate(
        "t => document.body.innerText.split(t).length - 1 - [...document.querySelectorAll("
        "'.sr-only')].reduce((n, e) => n + e.textContent.split(t).length - 1, 0)",
        text,
    )


def where_text(page, text: str) -> list[str]:
    """The elements whose own text holds ``text``: id of the nearest ancestor with one, class."""
    return page.evaluate(
        "t => [...document.querySelectorAll('body *')].filter(e => [...e.childNodes].some("
        "n => n.nodeType === 3 && n.textContent.includes(t))).map("
        "e => ((e.closest('[id]') || {}).id || '?') + ' ' + e.className)",
        text,
    )


def test_bad_upload_shows_a_readable_message_and_the_next_run_works(page, tmp_path):
    open_tab(page, "Image")
    before = page.locator("#image-input").bounding_box()["height"]
    upload(page, "#image-input", text_as_png(tmp_path))
    message = "is not an image file atoken can read"
    # said once, under the preview, when the file arrives: no error toast, no "Error (2)"
    page.wait_for_selector(f"#image-preview-info :text('{message}')")
    page.wait_for_timeout(1500)  # a second preview run would have shown by now
    assert count_text(page, message) == 1, where_text(page, message)
    assert page.locator(".toast-body").count() == 0
    # the upload box keeps its size (it collapsed to a sliver after a non-image)
    assert page.locator("#image-input").bounding_box()["height"] >= before - 2
    page.click("#image-run")
    # the run's refusal says it again, once, at the input
    page.wait_for_selector(f"#image-input .validation-error:has-text('{message}')")
    page.wait_for_timeout(1000)
    assert count_text(page, message) == 2, where_text(page, message)
    assert "Error (2)" not in page.inner_text("body")
    assert "Traceback" not in page.inner_text("body")
    upload(page, "#image-input", EXAMPLES / "chelsea.png")
    page.click("#image-run")
    page.wait_for_selector("#image-metrics :text('psnr')")


def test_video_tab(page):
    open_tab(page, "Video")
    upload(page, "#video-input", EXAMPLES / "astronaut_pan.mp4")
    page.locator("#video-run").click()
    wait_video(page, "#video-side")
    wait_video(page, "#video-pca")
    wait_plot(page, "#video-psnr")
    page.wait_for_selector("#video-metrics :text('psnr_mean')")
    page.wait_for_selector("#video-metrics :text('perceptual_mean')")
    assert "side_by_side" in page.locator("#video-files").inner_text()
    shot(page, "video_tab")


def test_video_tab_says_what_the_settings_cover_before_the_run(page):
    open_tab(page, "Video")
    clear = page.locator("#video-input button[aria-label='Clear']")
    if clear.count():  # the video tab test left its clip there
        clear.first.click()
    upload(page, "#video-input", VIDEO / "bigbuckbunny_512x288.mp4")  # 132 frames, 5.3 s
    page.wait_for_selector("#video-info :text('132 frames')")
    info = page.locator("#video-info").inner_text()
    assert "Only the first 64 of 132 frames (2.6 s of 5.3 s) will be reconstructed" in info, info
    clear.first.click()
    upload(page, "#video-input", EXAMPLES / "astronaut_pan.mp4")  # 32 frames: all of it
    page.wait_for_selector("#video-info :text('All of it will be reconstructed')")
    assert "32 frames" in page.locator("#video-info").inner_text()


def test_zero_shot_tab_from_the_image_tab(page):
    open_tab(page, "Zero-shot")
    page.get_by_label("image tab").check()
    page.locator("#zs-labels textarea").fill("cat, astronaut, rocket")
    page.get_by_label("softmax").check()
    page.click("#zs-run")
    page.wait_for_function(  # the plot shows exactly the typed labels
        "() => { const p = document.querySelector('#zs-plot .js-plotly-plot');"
        " return p && p.data && p.data[0].y.slice().sort().join() === 'astronaut,cat,rocket'; }"
    )
    page.wait_for_selector("#zs-verdict :text('Most likely of these labels')")
    total = page.evaluate(
        "() => document.querySelector('#zs-plot .js-plotly-plot').data[0].x.reduce((a, b) => a + b)"
    )
    assert abs(total - 1) < 1e-3  # softmax over the typed labels
    shot(page, "zeroshot_tab")


def test_generation_tab(page):
    open_tab(page, "Generation")
    open_tab(page, "Interpolation")
    # enabled by the image tab's reconstruction (continuous tokens: no FSQ editing)
    assert page.locator("#interp-run").is_enabled()
    upload(page, "#interp-b", EXAMPLES / "coffee.png")
    page.click("#interp-run")
    wait_video(page, "#interp-video")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#interp-gallery img')]"
        ".filter(i => i.naturalWidth > 0).length >= 8"
    )
    shot(page, "generation_tab")
    open_tab(page, "Posterior variations")
    assert page.locator("#var-run").is_enabled()
    seed_box = page.locator("#var-seed input")
    before = seed_box.input_value()
    page.click("#var-run")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#var-gallery img')]"
        ".filter(i => i.naturalWidth > 0).length >= 4"
    )
    page.wait_for_function("b => document.querySelector('#var-seed input').value !== b", arg=before)
    assert seed_box.input_value().isdigit()  # the drawn seed was written back


def test_token_editing_with_a_painted_mask(page):
    open_tab(page, "Image")
    before = page.locator("#image-preview-info").inner_text()
    upload(page, "#image-input", EXAMPLES / "astronaut.png")  # whatever an earlier test left
    page.wait_for_function(  # the upload arrived: its preview replaced the last one
        "b => { const t = document.querySelector('#image-preview-info').innerText;"
        " return t !== b && t.includes('Model input'); }",
        arg=before,
    )
    page.locator("#image-tokens").get_by_label("discrete (FSQ)").check()
    page.click("#image-run")
    open_tab(page, "Generation")
    open_tab(page, "Token editing (FSQ)")
    # enabled once the FSQ reconstruction is in (continuous tokens leave it disabled)
    page.wait_for_function("() => !document.querySelector('#edit-run').disabled")
    canvas = page.locator("#edit-canvas canvas").first
    canvas.wait_for()
    for _ in range(3):
        # the editor can still be drawing the new background, which drops a stroke made
        # meanwhile; the app then refuses in a toast ("Paint over the part of the image..."),
        # and a person paints again
        toasts = page.evaluate(TOASTS_JS)
        box = canvas.bounding_box()
        x0, y0 = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3
        page.mouse.move(x0, y0)
        page.mouse.down()
        for i in range(1, 11):
            page.mouse.move(x0 + i * box["width"] * 0.03, y0 + i * box["height"] * 0.02)
        page.mouse.up()
        page.click("#edit-run")
        page.wait_for_function(
            "n => [...document.querySelectorAll('#edit-slider img')]"
            ".filter(i => i.complete && i.naturalWidth > 0).length >= 2"
            " || window.__toasts > n",
            arg=toasts,
        )
        if loaded_images(page, "#edit-slider") >= 2:
            break
    assert loaded_images(page, "#edit-slider") >= 2, page.inner_text("body")[:2000]
    assert "Traceback" not in page.inner_text("body")
    shot(page, "token_editing")


def test_a_failed_model_load_keeps_the_panel_usable(fresh_page):
    """A load that fails says so in the status line; the dropdown is not covered and works."""
    page = fresh_page
    manager = app_server()["manager"]
    real = manager.load

    def broken(key):
        if key == "random-tiny-d":
            raise RuntimeError("checkpoint random-tiny-d is damaged (test)")
        return real(key)

    def choose(key: str) -> None:
        page.locator("#model-key input").click()
        # an option reads "✓ name (where it comes from)"
        option = page.get_by_role("option").filter(has_text=re.compile(rf"^\W*{re.escape(key)} \("))
        option.click()
        page.click("#model-load")

    if not page.locator("#model-key").is_visible():
        page.locator("#model-panel button").first.click()
    manager.load = broken
    try:
        choose("random-tiny-d")
        page.wait_for_selector("#model-status :text('Could not load')")
        assert "damaged" in page.locator("#model-status").inner_text()
        # the dropdown went back to the session's model and nothing covers it
        assert page.locator("#model-key input").input_value().startswith("random-tiny (")
        assert page.locator("#model-key .error, #model-key [class*=error]").count() == 0
    finally:
        manager.load = real
    choose("random-tiny-d")  # the same panel, clicked again, now loads
    page.wait_for_function(
        "() => !document.querySelector('#model-status').innerText.includes('Could not load')"
        " && document.querySelector('#model-status').innerText.includes('random-tiny-d')"
    )
    choose("random-tiny")  # and back: every pick in the same panel works
    page.wait_for_function(
        "() => document.querySelector('#model-key input').value.startsWith('random-tiny (')"
        " && !document.querySelector('#model-status').innerText.includes('random-tiny-d')"
    )


# The 3D tests come last: once the 3D tab has drawn, Gradio's viewers keep redrawing in software
# WebGL (SwiftShader) even with the tab hidden, about one CPU core for as long as the page lives.
# On a 2-core machine that starved the tests after them (clicks waited 60 s for the page).


def test_3d_tab_viewer_renders_when_the_tab_opens(page, tmp_path):
    open_tab(page, "3D")
    upload(page, "#mesh-input", MESHES / "duck.glb")
    page.wait_for_selector("#mesh-view canvas")
    page.wait_for_function(
        "() => { const c = document.querySelector('#mesh-view canvas');"
        " return c && c.clientWidth > 100 && c.clientHeight > 100; }"
    )
    w, h = canvas_size(page, "#mesh-view")
    assert w > 100 and h > 100  # not collapsed
    page.locator("#mesh-input button[aria-label='Clear']").click()
    # a few hundred voxels: seconds on CPU; the README screenshot shows the duck instead
    mesh = MESHES / "duck.glb" if os.environ.get("ATOKEN_SCREENSHOTS") else thin_rod(tmp_path)
    upload(page, "#mesh-input", mesh)
    page.wait_for_function(
        f"() => document.querySelector('#mesh-input').innerText.includes('{mesh.stem}')"
    )
    page.click("#mesh-run")
    page.wait_for_selector("#mesh-metrics :text('gaussians')")
    page.wait_for_function(
        "() => { const c = document.querySelector('#gs-view canvas');"
        " return c && c.clientWidth > 100 && c.clientHeight > 100; }"
    )
    wait_video(page, "#mesh-turntable")
    open_tab(page, "Image")  # away and back: the viewers keep their size
    open_tab(page, "3D")
    assert min(canvas_size(page, "#gs-view")) > 100 and min(canvas_size(page, "#mesh-view")) > 100
    shot(page, "3d_tab")


def test_3d_result_classifies(page):
    open_tab(page, "Zero-shot")
    page.get_by_label("3D tab").check()
    page.click("#zs-run")
    wait_plot(page, "#zs-plot")
