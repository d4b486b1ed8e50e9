"""End to end in a real headless Chromium against `xmodal serve` (waitress) on loopback.

Uses Debian's chromium (/usr/bin/chromium) through playwright; no browser download.
Screenshots of each page land in test-artifacts/ for people to look at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from server_fixtures import running_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("XMODAL_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)"
)


@pytest.fixture(scope="module")
def server(demo_bundle):
    with running_server(demo_bundle[1], threads=4) as (host, port):
        yield f"http://{host}:{port}"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


# Every result image has its pixels (Chromium counts a lazy image it has not fetched
# yet as complete, so `complete` alone is not enough).
GRID_LOADED = (
    "() => [...document.querySelectorAll('.grid img')].every(i => i.complete && i.naturalWidth > 0)"
)


def _all_images_loaded(page) -> bool:
    return page.evaluate(GRID_LOADED)


def test_type_a_query_see_images_open_detail(server, browser, demo_bundle) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server + "/")
    page.fill("#q", "a large blue square")
    page.keyboard.press("Enter")
    page.wait_for_selector(".grid img")
    page.wait_for_function(GRID_LOADED)
    assert page.locator(".grid .card").count() == 24
    assert _all_images_loaded(page)
    assert "a large blue square" in page.inner_text("h1")
    page.screenshot(path=str(ARTIFACTS / "search.png"), full_page=True)

    page.click(".grid .card a >> nth=0")  # opens the viewer; its "Details" the page
    page.click("dialog#viewer .viewer-details")
    page.wait_for_selector("text=More like this")
    page.wait_for_function(
        "() => [...document.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.locator(".captions li").count() >= 3  # the image's linked captions
    assert page.locator(".grid .card").count() == 12
    page.screenshot(path=str(ARTIFACTS / "detail.png"), full_page=True)

    page.goto(server + "/status")
    assert "60 indexed" in page.inner_text("main")
    page.screenshot(path=str(ARTIFACTS / "status.png"), full_page=True)
    page.close()


def test_upload_an_image_see_captions(server, browser, demo_bundle) -> None:
    root = demo_bundle[0]
    image = sorted((root / "images" / "test").glob("*.png"))[5]
    own = {
        r["caption"]
        for r in map(json.loads, (root / "test.jsonl").read_text().splitlines())
        if r["image"].endswith(image.name)
    }
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server + "/image")
    page.set_input_files("#image", str(image))  # the page's script submits on change
    page.wait_for_selector(".captions li")
    texts = [t.split(" ", 1)[1] for t in page.locator(".captions li").all_inner_texts()]
    assert texts[0] in own
    assert "/image?id=" in page.url  # the results have their own address
    page.wait_for_function("() => document.querySelector('figure.query img').naturalWidth > 0")
    page.reload()
    page.wait_for_selector(".captions li")
    again = [t.split(" ", 1)[1] for t in page.locator(".captions li").all_inner_texts()]
    assert again == texts  # a reload shows the same search
    page.wait_for_function(
        "() => [...document.querySelectorAll('.grid img')].every(i => i.complete)"
    )
    assert _all_images_loaded(page)
    page.screenshot(path=str(ARTIFACTS / "image-search.png"), full_page=True)
    page.close()


def test_phone_width_layout(server, browser) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    page.goto(server + "/?q=a+small+green+star")
    page.wait_for_selector(".grid img")
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 390  # no sideways scrolling
    box = (
        "(s) => { const r = document.querySelector(s).getBoundingClientRect(); return r.toJSON(); }"
    )
    form = page.evaluate(box, "form.search")["height"]
    assert form <= 120  # the first results show without scrolling past a tall form
    first = page.evaluate(box, ".grid img")["top"]
    assert first < 844 / 3
    page.screenshot(path=str(ARTIFACTS / "search-phone.png"))
    page.close()


CONTRAST = """(sel) => {
  const rgb = s => s.match(/[0-9.]+/g).slice(0, 3).map(Number);
  const lum = c => { const [r, g, b] = c.map(v => { v /= 255;
    return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  const el = document.querySelector(sel);
  const a = lum(rgb(getComputedStyle(el).borderTopColor));
  const b = lum(rgb(getComputedStyle(el.parentElement).backgroundColor || 'rgb(255,255,255)'));
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
}"""


def test_inputs_are_visible_and_named(server, browser) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server + "/")
    page.evaluate("() => { document.body.style.background = '#fff'; }")
    for sel in ("#q", "#k", "#min_score"):
        assert page.evaluate(CONTRAST, sel) >= 3.0, sel  # WCAG 1.4.11, non-text contrast
    page.goto(server + "/image")
    assert page.get_by_role("button", name="Choose an image to search with").count() == 1
    assert page.evaluate("() => document.querySelector('link[rel=icon]').href").endswith(".svg")
    page.close()


def test_real_server_answers_413_with_json(server) -> None:
    boundary = "xmodalboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + b"\x00" * (2 * 1024 * 1024)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(
        server + "/api/search/image",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 413
    assert "error" in json.loads(err.value.read())


def test_load_more_appends_as_you_scroll(server, browser) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server + "/?q=a+small+yellow+cross")
    # The second page may already be on its way: the link sits within the observer's 400 px
    # margin on a tall screen, so only the first 24 cards are compared.
    first_ids = page.eval_on_selector_all(".grid .card a", "as => as.map(a => a.href)")[:24]
    assert len(first_ids) == 24
    for shown in (48, 60):  # the demo bundle holds 60 images, 24 a page
        page.mouse.wheel(0, 20000)
        page.wait_for_function(f"() => document.querySelectorAll('.grid .card').length >= {shown}")
    hrefs = page.eval_on_selector_all(".grid .card a", "as => as.map(a => a.href)")
    assert len(hrefs) == 60 and len(set(hrefs)) == 60 and hrefs[:24] == first_ids
    assert page.locator("#more").count() == 0  # the last page has no link
    assert page.locator("ul.grid").count() == 1  # appended in place, one grid
    page.close()


def test_drop_zone_opens_the_picker_and_says_why_it_refuses(server, browser, tmp_path) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server + "/image")
    with page.expect_file_chooser() as chooser:
        page.click("#drop-help")  # anywhere in the zone, not only the button
    assert chooser.value is not None
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    page.set_input_files("#image", str(text))
    page.wait_for_selector("#drop-problem:not([hidden])")
    assert "not an image" in page.inner_text("#drop-problem")
    assert "/image?id=" not in page.url  # nothing was sent
    assert page.get_attribute("#drop", "role") == "button"
    page.close()
    phone = browser.new_context(
        viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True
    )
    tab = phone.new_page()
    tab.goto(server + "/image")
    assert "Ctrl+V" not in tab.inner_text("#drop")  # touch screens are told to tap
    assert "Tap" in tab.inner_text("#drop")
    phone.close()


def test_viewer_keys_and_return_to_the_same_place(server, browser) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 700})
    page.goto(server + "/?q=a+large+purple+heart&k=24")
    page.wait_for_selector(".grid img")
    cards = page.locator(".grid .card a")
    third = cards.nth(14)  # a row down the page: opening it scrolls the page there
    third.click()
    page.wait_for_selector("dialog#viewer[open]")
    before = page.evaluate("() => window.scrollY")
    assert before > 0
    src = lambda: page.get_attribute(".viewer-image", "src")  # noqa: E731
    assert src() == third.get_attribute("data-full")
    page.wait_for_function(
        "() => document.querySelector('.viewer-image').complete"
        " && document.querySelector('.viewer-image').naturalWidth > 0"
    )
    page.screenshot(path=str(ARTIFACTS / "viewer.png"))
    page.keyboard.press("ArrowRight")
    assert src() == cards.nth(15).get_attribute("data-full")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    assert src() == cards.nth(13).get_attribute("data-full")
    alt = page.get_attribute(".viewer-image", "alt")
    assert alt and alt == cards.nth(13).locator("img").get_attribute("alt")
    assert page.get_attribute(".viewer-search", "href").startswith("/image?image_id=")
    page.keyboard.press("Escape")
    page.wait_for_selector("dialog#viewer", state="hidden")
    assert page.evaluate("() => window.scrollY") == before  # the same place in the results
    assert "/?q=" in page.url
    # the browser's back closes the viewer too, and stays on the results
    third.click()
    page.wait_for_selector("dialog#viewer[open]")
    page.go_back()
    page.wait_for_selector("dialog#viewer", state="hidden")
    assert "/?q=" in page.url and page.evaluate("() => window.scrollY") == before
    # "search with this image" runs a search by image for the indexed image
    cards.nth(0).click()
    page.click(".viewer-search")
    page.wait_for_selector(".captions li")
    assert "image_id=" in page.url and page.locator("figure.query img").count() == 1
    page.close()


def test_without_javascript_a_result_opens_its_detail_page(server, browser) -> None:
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(server + "/?q=a+small+red+square")
    page.click(".grid .card a >> nth=0")
    page.wait_for_selector("text=More like this")
    assert "/images/" in page.url
    page.click("text=Back to results")
    assert "/?q=" in page.url
    context.close()


def test_match_labels_and_the_no_good_match_notice(server, browser, demo_bundle) -> None:
    from urllib.parse import quote

    caption = json.loads((demo_bundle[0] / "test.jsonl").read_text().splitlines()[0])["caption"]
    for width, name in ((1280, "labels"), (390, "labels-phone")):
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(server + "/?q=" + quote(caption))
        scores = page.locator(".grid .card .score").all_inner_texts()
        assert len(scores) == 24 and scores[0].startswith("Match"), scores[:3]
        # One number per card, in ranking order: the shipped calibration's probabilities.
        probs = page.eval_on_selector_all(".grid .score", "ss => ss.map(s => +s.dataset.p)")
        assert probs == sorted(probs, reverse=True) and probs[0] > probs[-1]
        shown = re.compile(r"(Match|Partial|Weak) (<1|>99|[1-9][0-9]?)%")
        assert all(shown.fullmatch(s) for s in scores), scores
        assert page.locator("#no-match").count() == 0
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

        page.goto(server + "/?q=" + quote("a photo of a dog on the beach"))
        assert page.locator("#no-match").is_visible()
        assert "No good match" in page.inner_text("#no-match")
        assert page.locator(".grid .label-match").count() == 0
        assert page.locator(".grid .card").count() == 24  # the closest are still shown
        page.screenshot(path=str(ARTIFACTS / f"no-match-{name.split('-')[-1]}.png"))
        page.close()


def test_filter_row_collapsed_on_phones_and_filters_results(server, browser) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    page.goto(server + "/?q=a+small+green+star")
    page.wait_for_selector(".grid img")
    assert not page.is_visible("#folder")  # collapsed: the results come first
    page.click(".filters summary")
    assert page.is_visible("#folder") and page.is_visible("#min_width")
    page.screenshot(path=str(ARTIFACTS / "filters-phone.png"))
    page.close()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server + "/?q=a+small+green+star")
    page.click(".filters summary")
    page.select_option("#type", "png")  # every demo image: all 24 stay
    page.click("form.search button[type=submit]")
    page.wait_for_selector(".grid img")
    assert "type=png" in page.url and page.locator(".grid .card").count() == 24
    assert page.is_visible("#type")  # a filter in force keeps the row open
    page.fill("#min_width", "100000")  # wider than any demo image: nothing passes
    page.click("form.search button[type=submit]")
    page.wait_for_load_state()
    assert "min_width=100000" in page.url and page.locator(".grid .card").count() == 0
    page.screenshot(path=str(ARTIFACTS / "filters.png"), full_page=True)
    page.close()


def test_folder_and_date_filters_in_the_page(server, browser, demo_bundle) -> None:
    # The demo images sit in one indexed folder and were all written today.
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server + "/?q=a+small+green+star&k=12")
    cases = [
        ("#folder", str(demo_bundle[0] / "images" / "test"), 12),  # the indexed root itself
        ("#folder", "elsewhere", 0),  # no such subfolder under it
        ("#taken_after", "2001-01-01", 12),
        ("#taken_before", "2001-01-01", 0),
    ]
    for selector, value, shown in cases:
        page.goto(server + "/?q=a+small+green+star&k=12")
        page.click(".filters summary")
        page.fill(selector, value)
        page.click("form.search button[type=submit]")
        page.wait_for_load_state()
        assert f"{selector[1:]}=" in page.url
        assert page.locator(".grid .card").count() == shown, (selector, value)
        if not shown:
            assert "No images" in page.inner_text("main")
    page.close()
