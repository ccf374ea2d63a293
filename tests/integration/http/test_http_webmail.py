"""Webmail behaviour in a real browser (Debian's chromium through Playwright,
as in test_webmail_browser): remote images stay blocked until asked for."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from playwright.async_api import Page, async_playwright, expect

from tests.integration.http.conftest import PASSWORD, deliver, make_mail
from tests.integration.http.test_webmail_browser import CHROMIUM, CHROMIUM_ARGS

# A 1x1 transparent GIF: what a tracking pixel is.
PIXEL = bytes.fromhex(
    "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b"
)


@pytest.fixture
async def tracker() -> AsyncIterator[tuple[str, list[str]]]:
    """A remote image host on loopback; the list records every request."""
    hits: list[str] = []

    async def pixel(request: web.Request) -> web.Response:
        hits.append(request.path_qs)
        return web.Response(body=PIXEL, content_type="image/gif")

    app = web.Application()
    app.router.add_get("/{name}", pixel)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", hits
    finally:
        await runner.cleanup()


async def open_browser(base_url: str, width: int, height: int) -> AsyncIterator[Page]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(10_000)
            await page.goto(base_url + "/")
            await page.fill("#login-address", "alice@example.test")
            await page.fill("#login-password", PASSWORD)
            await page.click("#login-submit")
            await expect(page.locator("#live-status")).to_have_text("live")
            yield page
        finally:
            await browser.close()


@pytest.fixture
async def page(base_url: str, alice: Any) -> AsyncIterator[Page]:
    async for opened in open_browser(base_url, 1280, 800):
        yield opened


async def test_remote_images_load_only_when_asked(
    page: Page, mailstore: Any, alice: Any, tracker: tuple[str, list[str]]
) -> None:
    host, hits = tracker
    await deliver(mailstore, alice, make_mail(
        "Newsletter", body="Our news.",
        html=f'<p>Our news.</p><img src="{host}/open.gif?u=alice" width="1" height="1">'
             f'<img src="{host.removeprefix("http:")}/logo.gif" alt="logo">',
    ))
    await deliver(mailstore, alice, make_mail("Plain note", body="hi", html="<p>Just text.</p>"))
    await page.reload()
    await page.locator("#message-list li", has_text="Plain note").click()
    await expect(page.frame_locator("#reader-html").locator("body")).to_contain_text("Just text.")
    await expect(page.locator("#remote-images")).to_be_hidden()

    await page.locator("#message-list li", has_text="Newsletter").click()
    await expect(page.frame_locator("#reader-html").locator("body")).to_contain_text("Our news.")
    await page.wait_for_timeout(1000)  # ample time for an image fetch to have happened
    assert hits == [], "a remote image loaded before the reader asked"
    await expect(page.locator("#remote-images-button")).to_be_visible()

    await page.click("#remote-images-button")
    await expect(page.locator("#remote-images")).to_be_hidden()
    for _ in range(50):
        if len(hits) >= 2:
            break
        await page.wait_for_timeout(100)
    assert sorted(hits) == ["/logo.gif", "/open.gif?u=alice"]


async def test_the_list_is_in_date_order_and_live_imports_sit_by_their_date(
    page: Page, mailstore: Any, alice: Any
) -> None:
    now = dt.datetime.now(dt.UTC)
    await deliver(mailstore, alice, make_mail("this week", date=now - dt.timedelta(days=3)))
    await deliver(mailstore, alice, make_mail("last year", date=now - dt.timedelta(days=365)))
    await deliver(mailstore, alice, make_mail("today", date=now - dt.timedelta(hours=1)))
    await page.reload()
    subjects = page.locator("#message-list li .subject")
    await expect(subjects).to_have_text(["today", "this week", "last year"])
    await expect(page.locator("#live-status")).to_have_text("live")
    # Arrives live over the WebSocket: an old message goes where its date says.
    await deliver(mailstore, alice, make_mail("last month", date=now - dt.timedelta(days=30)))
    await expect(subjects).to_have_text(["today", "this week", "last month", "last year"])


@pytest.mark.parametrize(
    ("size", "shown"),
    [(0, "0 bytes"), (777, "777 bytes"), (1_468_006, "1.4 MB"), (25 * 1024 * 1024, "25 MB")],
)
async def test_attachment_sizes_are_decoded_and_readable(
    page: Page, mailstore: Any, alice: Any, size: int, shown: str
) -> None:
    data = random.randbytes(size)
    await deliver(mailstore, alice, make_mail(
        "With attachment", attachment=("photo.jpg", "image/jpeg", data)))
    await page.reload()
    await page.locator("#message-list li", has_text="With attachment").click()
    await expect(page.locator("#reader-attachments li")).to_have_text(
        f"photo.jpg (image/jpeg, {shown})")


PHONE = (390, 844)  # CSS pixels of a current mid-size phone


async def assert_inside(page: Page, selector: str) -> None:
    """The element is shown and lies wholly within the viewport's width."""
    box = await page.locator(selector).first.bounding_box()
    assert box is not None, f"{selector} is not shown"
    assert box["width"] > 0 and box["height"] > 0, selector
    assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE[0] + 0.5, (selector, box)


async def assert_no_sideways_scroll(page: Page) -> None:
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE[0], f"the page is {width} px wide on a {PHONE[0]} px screen"


async def test_the_webmail_works_on_a_390_px_phone(
    base_url: str, mailstore: Any, alice: Any, tmp_path: Any
) -> None:
    for n in range(4):
        await deliver(mailstore, alice, make_mail(
            f"A long subject line that must wrap on a phone screen, number {n}",
            body="Body text. " * 40,
            html="<p>" + "Wide content " * 60 + "</p>"
                 '<table width="900"><tr><td>x</td></tr></table>',
        ))
    async for page in open_browser(base_url, *PHONE):
        await expect(page.locator("#message-list li")).to_have_count(4)
        await assert_no_sideways_scroll(page)
        for selector in ("#compose-button", "#search-input", "#logout-button",
                         "#folder-list li", "#message-list li"):
            await assert_inside(page, selector)
        await page.screenshot(path=str(tmp_path / "phone-list.png"))

        await page.locator("#message-list li").first.click()
        body = page.frame_locator("#reader-html").locator("body")
        await expect(body).to_contain_text("Wide content")
        await assert_no_sideways_scroll(page)
        for selector in ("#reader-subject", "#reader-html", "#reply-button", "#delete-button",
                         "#back-button"):
            await assert_inside(page, selector)
        await page.screenshot(path=str(tmp_path / "phone-reader.png"))

        await page.click("#back-button")
        await assert_inside(page, "#message-list li")
        await page.click("#compose-button")
        await assert_inside(page, "#compose-send")
        await assert_inside(page, "#compose-to")
        await assert_no_sideways_scroll(page)
        print(f"phone screenshots in {tmp_path}")
