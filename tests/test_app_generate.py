"""The "Text to image / video / 3D" sub-tab over HTTP and in a browser, on atoken-tiny.

The shared test app runs the untrained random-tiny, for which no generator exists, so this module
starts its own app on the bundled atoken-tiny (and restores the handlers' configuration after).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from atoken.io.media import read_image
from tests.app_support import launch_app
from tests.test_app_browser import CHROMIUM, TIMEOUT, open_tab, shot


@pytest.fixture(scope="module")
def server():
    from app import handlers
    from app.models import ModelManager

    previous = (handlers.M, handlers.LIMITS)
    url, demo = launch_app(ModelManager("atoken-tiny"))
    yield url
    demo.close()
    if previous[0] is not None:
        handlers.configure(*previous)


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server, verbose=False)


def test_generate_is_in_the_api_and_makes_an_image_quickly(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert "/generate" in names
    client.predict("a photo of a red circle.", "image", 4.0, 25, 0, api_name="/generate")
    t0 = time.perf_counter()  # warm: the text tower and the generator are loaded
    image, video, splat, latent, info = client.predict(
        "a photo of a blue square.", "image", 4.0, 25, 1, api_name="/generate"
    )
    seconds = time.perf_counter() - t0
    assert seconds < 10, f"an image prompt took {seconds:.1f} s"
    pixels = read_image(image)
    assert pixels.shape == (256, 256, 3)  # 64 px shown 4x
    assert video is None and splat is None
    assert read_image(latent).shape == (256, 256, 3)  # 4x4 tokens, 64 px per token
    assert info["tokens"] == 16 and info["latent_shape"] == [16, 48]
    assert info["generator"] == "atoken-tiny-gen"


def test_generate_video_has_two_latent_frames(client):
    _, video, _, latent, info = client.predict(
        "a video of a green star moving left.", "video", 4.0, 10, 2, api_name="/generate"
    )
    assert Path(video["video"] if isinstance(video, dict) else video).stat().st_size > 1000
    assert read_image(latent).shape == (256, 512, 3)  # two latent frames side by side
    assert info["tokens"] == 32


BAD = [
    (("a photo.", "image", 4.0, 1000, 0), "steps must be from 1 to 100", "maximum value 100"),
    (("a photo.", "image", 99.0, 10, 0), "guidance must be from 0 to 15", "maximum value 15"),
    (("a photo.", "sound", 4.0, 10, 0), "kind must be one of", "not in the list of choices"),
    (("x" * 301, "image", 4.0, 10, 0), "the limit is 300", None),
    (("a photo.", "image", 4.0, 10, 2**40), "seed must be from 0 to 4294967295", None),
    (("   ", "image", 4.0, 10, 0), "type a prompt", None),
]


@pytest.mark.parametrize("args, message, gradio_message", BAD)
def test_bad_inputs_are_refused_readably(client, args, message, gradio_message):
    # over HTTP Gradio's own slider / radio checks may answer first; both name the limit
    expected = message if gradio_message is None else f"{message}|{gradio_message}"
    with pytest.raises(AppError, match=expected):
        client.predict(*args, api_name="/generate")


@pytest.mark.parametrize("args, message, gradio_message", BAD)
def test_the_handler_checks_every_input_itself(server, args, message, gradio_message):
    import gradio as gr

    from app.generate_tab import generate_handler

    class Req:
        session_hash = "generate-test"

    # what a raw request can send past Gradio's preprocessing reaches these checks
    with pytest.raises(gr.Error, match=message):
        generate_handler(*args, "atoken-tiny", Req(), progress=lambda *a, **k: None)


def test_tokenizers_without_a_generator_are_named(server):
    import gradio as gr

    from app.generate_tab import generator_for

    with pytest.raises(gr.Error, match="No text-to-latent generator exists for random-tiny"):
        generator_for("random-tiny")


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get)")
def test_text_to_image_then_zero_shot_in_the_browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT)
        page.goto(server)
        page.wait_for_selector("#image-input")
        open_tab(page, "Generation")
        open_tab(page, "Text to image / video / 3D")
        assert not page.locator("#gen-send").is_enabled()
        prompt = page.locator("#gen-prompt textarea")
        for _ in range(3):  # the sub-tab draws its children when it opens: fill once it stays
            prompt.fill("a photo of a yellow heart.")
            page.wait_for_timeout(500)
            if prompt.input_value() == "a photo of a yellow heart.":
                break
        page.click("#gen-run")
        for sel in ("#gen-image", "#gen-latent"):
            page.wait_for_function(
                "s => [...document.querySelectorAll(s + ' img')]"
                ".some(i => i.complete && i.naturalWidth > 0)",
                arg=sel,
            )
        page.wait_for_selector("#gen-info :text('a photo of a yellow heart.')")
        width = page.evaluate("() => document.querySelector('#gen-image img').naturalWidth")
        assert width == 256
        shot(page, "generate_tab")
        page.click("#gen-send")
        page.wait_for_selector("#gen-send-note :text('Sent to the Zero-shot tab')")
        open_tab(page, "Zero-shot")
        assert page.get_by_label("image tab").is_checked()
        labels = "yellow heart, blue square, red circle"
        box = page.locator("#zs-labels textarea")
        page.get_by_label("softmax").check()
        for _ in range(3):  # a freshly drawn tab may still fill its preset into the box
            box.fill(labels)
            page.wait_for_timeout(500)
            if box.input_value() == labels:
                break
        page.click("#zs-run")
        page.wait_for_function(
            "() => { const p = document.querySelector('#zs-plot .js-plotly-plot');"
            " return p && p.data && p.data[0].y.slice().sort().join() === "
            "'blue square,red circle,yellow heart'; }"
        )
        probs = page.evaluate("() => document.querySelector('#zs-plot .js-plotly-plot').data[0].x")
        assert abs(float(np.sum(probs)) - 1) < 1e-3
        browser.close()
