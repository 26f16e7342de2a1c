"""Data engine: HTML extraction to ordered items / Markdown, and the rule-based text clean-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from duetgen.data.engine.document import Doc, ImageItem, TextItem
from duetgen.data.engine.extract import ExtractConfig, ExtractError, decode_html, extract
from duetgen.data.engine.stages import reorder_by_group
from duetgen.data.engine.text import clean_block, strip_step_prefix, title_to_question

PAGES = Path(__file__).parent / "fixtures" / "engine" / "pages"


def page(name: str, url: str | None = "https://howto.example/pages/x.html") -> Doc:
    d = Doc(id=name, url=url, html=(PAGES / name).read_bytes())
    return extract(d, ExtractConfig())


def test_wikihow_like_page_keeps_body_and_images_in_place():
    d = page("bathe-a-cat.html")
    assert d.title == "How to Bathe a Cat"
    md = d.markdown()
    # boilerplate is gone: navigation, breadcrumbs, share bar, comments, sidebar, footer, scripts, ad slot
    for junk in ("Home &amp; Garden", "Pets", "Share on Facebook", "Great tips!", "Related Articles", "About us",
                 "dataLayer", "ads.example.com", "reader photo", "Advertisement"):
        assert junk not in md, junk
    srcs = [x.src for x in d.images]
    assert "/img/site-logo.png" not in srcs and "/img/icon-print.png" not in srcs and "/img/step7.jpg" not in srcs
    assert srcs == ["/img/step1.jpg", "/img/step2.jpg", "/img/step2-again.jpg", "/img/sale-728x90.png",
                    "/img/step3.jpg", "/img/step4.jpg", "/img/step5.jpg", "/img/get-app-qr.png",
                    "/img/step6.jpg", "/img/spacer.png"]
    # images stand where they stood: step 1's photo right before step 1's text
    i = next(k for k, x in enumerate(d.items) if isinstance(x, ImageItem) and x.src == "/img/step1.jpg")
    assert isinstance(d.items[i + 1], TextItem) and "Trim your cat's claws" in d.items[i + 1].text
    assert d.items[i].group == d.items[i + 1].group is not None and d.items[i + 1].kind == "step"
    assert "![Trimmed cat claws](/img/step1.jpg)" in md and "## Part 2: Washing Your Cat" in md
    # text links become Markdown links with absolute URLs (the clean-up removes them later)
    assert "[choosing a cat shampoo](https://www.example-petshop.com/shampoo)" in md


def test_instructables_like_ordered_steps_and_lists():
    d = page("repot-a-plant.html")
    assert d.title == "Repot a Houseplant"
    steps = [x.text for x in d.texts if x.kind == "step"]
    assert len(steps) == 5 and steps[0].startswith("Water the plant one day")
    assert [x.text for x in d.texts if x.kind == "list"] == ["A new pot with drainage holes", "Fresh potting mix", "A trowel and gloves"]
    assert "Log in" not in d.markdown() and "Pinterest" not in d.markdown() and "Related Projects" not in d.markdown()


def test_legacy_encoding_is_decoded_from_meta():
    d = page("creme-brulee-cp1252.html")
    assert d.meta["encoding"] == "cp1252"
    assert d.title == "How to Make Crème Brûlée"
    text = " ".join(t.text for t in d.texts)
    assert "It’s easier than it looks – you need 4 egg yolks" in text and "80°C" in text and "…" in text
    assert "Accueil" not in text
    assert decode_html("caf\u00e9".encode("cp1252")) == ("café", "cp1252")  # undeclared, not UTF-8: WHATWG default
    assert decode_html("café".encode("utf-8")) == ("café", "utf-8")


def test_lazy_loaded_src_and_base_href():
    html = """<html><head><base href="https://cdn.example/site/"></head><body><article><h1>T</h1>
    <img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" data-src="photos/a.jpg"><p>text</p></article></body></html>"""
    d = extract(Doc(id="x", url=None, html=html), ExtractConfig())
    assert d.url == "https://cdn.example/site/" and d.images[0].src == "photos/a.jpg"
    canon = '<html><head><link rel="canonical" href="https://ex.example/p"></head><body><p>hi</p></body></html>'
    assert extract(Doc(id="y", url=None, html=canon), ExtractConfig()).url == "https://ex.example/p"
    # a page with its own URL keeps it (session 14 audit: <base href="/"> made every page's URL the site root);
    # its images still resolve against the base
    d = extract(Doc(id="z", url="https://ex.example/how/to", html=html.replace("https://cdn.example/site/", "/")),
                ExtractConfig())
    assert (d.url, d.base_url) == ("https://ex.example/how/to", "https://ex.example/")
    from duetgen.data.engine.document import StageStats
    from duetgen.data.engine.fetch import FetchConfig, FetchError
    from duetgen.data.engine.stages import FetchImages

    stage, asked = FetchImages(FetchConfig()), []
    stage._fetch = lambda url: asked.append(url) or FetchError("http_error", url)  # (no network: what is asked for)
    list(stage([d], StageStats("fetch_images")))
    assert asked == ["https://ex.example/photos/a.jpg"]


def test_hostile_pages_are_refused_with_a_reason():
    deep = "<html><body><p>start</p>" + "<div>" * 5000 + "x" + "</div>" * 5000 + "<p>end</p></body></html>"
    with pytest.raises(ExtractError) as e:
        extract(Doc(id="deep", url=None, html=deep), ExtractConfig())
    assert e.value.reason == "too_deeply_nested"
    big = "<html><body>" + "<p>" + "a" * (50 * 1024 * 1024) + "</p></body></html>"  # a 50 MB page
    with pytest.raises(ExtractError) as e:
        extract(Doc(id="big", url=None, html=big), ExtractConfig())
    assert e.value.reason == "page_too_large"
    with pytest.raises(ExtractError) as e:
        extract(Doc(id="empty", url=None, html="   "), ExtractConfig())
    assert e.value.reason == "empty_page"
    # moderately deep (300 levels, more than libxml2's default 256) still extracts fully
    ok = "<html><body>" + "<div>" * 300 + "<p>deep text</p>" + "</div>" * 300 + "<p>after</p></body></html>"
    d = extract(Doc(id="ok", url=None, html=ok), ExtractConfig())
    assert [t.text for t in d.texts] == ["deep text", "after"]


def test_control_characters_and_binary_pages_never_crash_extraction():
    """A page with NUL / control bytes (a binary body served as text/html) crashed the whole run in lxml when the
    boilerplate around them was dropped (ValueError: All strings must be XML compatible): now they are removed."""
    html = "<html><body><article><p>Rinse\x00 the cat\x01.</p><nav>menu</nav>\x00tail\x0b text<p>more\ufffe</p>"
    d = extract(Doc(id="ctl", url=None, html=html + "</article></body></html>"), ExtractConfig())
    assert [t.text for t in d.texts] == ["Rinse the cat.", "tail text", "more"]
    refs = "<html><body><nav>m</nav>a&#1;b<article><p>x&#x1F;y&#xFFFE;z&#11</p></article><footer>f</footer>t</body></html>"
    d = extract(Doc(id="refs", url=None, html=refs), ExtractConfig())  # the parser makes these characters itself
    assert [t.text for t in d.texts] == ["xyz"]
    import random

    noise = bytes(random.Random(0).getrandbits(8) for _ in range(20000))
    try:
        extract(Doc(id="noise", url=None, html=noise), ExtractConfig())
    except ExtractError:  # refused with a reason is fine; any other exception is not
        pass


def test_clean_block_rules():
    assert clean_block("Avoid the eyes!!!   Visit http://www.example-vets.org/tips for more tips.") == "Avoid the eyes!"
    assert clean_block("Read about [cat shampoo](https://shop.example/s?id=1) first .") == "Read about cat shampoo first."
    assert clean_block("Use 2 &amp; 3 <b>cups</b>&nbsp;of water") == "Use 2 & 3 cups of water"
    for junk in ("Advertisement", "Share on Facebook", "Was this article helpful?", "© 2024 HomeHowTo. All rights reserved.",
                 "Photo credit: Sam", "»", "Related Articles"):
        assert clean_block(junk) == "", junk
    assert clean_block("Share the load with a friend when lifting.") == "Share the load with a friend when lifting."
    assert strip_step_prefix("Step 3: Fill the tub.") == ("Fill the tub.", True)
    assert strip_step_prefix("2. Dry it.") == ("Dry it.", True)
    assert strip_step_prefix("2.5 cups of flour") == ("2.5 cups of flour", False)


def test_title_to_question():
    assert title_to_question("How to Bathe a Cat") == "How do I bathe a cat?"
    assert title_to_question("Repot a Houseplant") == "How do I repot a houseplant?"
    assert title_to_question("How to Set Up a USB Drive on an iPhone") == "How do I set up a USB drive on an iPhone?"
    assert title_to_question("Why is my bread dense?") == "Why is my bread dense?"
    assert title_to_question("   ") == ""


def test_reorder_moves_step_image_after_its_text():
    a, b = ImageItem("a.jpg", group=1), TextItem("step one", "step", group=1)
    c, d = ImageItem("c.jpg", group=2), TextItem("step two", "step", group=2)
    loose = ImageItem("loose.jpg")
    intro = TextItem("intro")
    assert reorder_by_group([intro, a, b, loose, c, d]) == [intro, b, a, loose, d, c]
