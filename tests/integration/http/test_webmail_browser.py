"""The webmail page in a real browser: Debian's chromium driven by Playwright.

Logs in, reads a message, sends one, and sees a new message arrive live
over the WebSocket; saves a screenshot of the inbox into the test's tmp dir.
Needs: apt chromium (at /usr/bin/chromium), pip playwright (no browser download).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from playwright.async_api import async_playwright, expect

from tests.integration.http.conftest import PASSWORD, deliver, make_mail

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


async def test_webmail_login_read_send_and_live_update(
    base_url: str, mailstore: Any, alice: Any, bob: Any, tmp_path: Path
) -> None:
    await deliver(mailstore, alice, make_mail(
        "Quarterly report", body="The numbers are in.",
        html="<p>The <b>numbers</b> are in.<script>document.title='pwned'</script></p>",
    ))
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(10_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(base_url + "/")

            # Log in.
            await page.fill("#login-address", "alice@example.test")
            await page.fill("#login-password", PASSWORD)
            await page.click("#login-submit")
            first = page.locator("#message-list li").first
            await expect(first).to_contain_text("Quarterly report")
            await expect(first).to_have_class("unread")
            await expect(page.locator("#live-status")).to_have_text("live")

            # Read it: the sanitized HTML shows, the script did not run, it becomes read.
            await first.click()
            await expect(page.locator("#reader-subject")).to_have_text("Quarterly report")
            body = page.frame_locator("#reader-html").locator("body")
            await expect(body).to_contain_text("The numbers are in.")
            assert await page.title() == "shardmail"
            await expect(first).not_to_have_class("unread")

            # Send one to Bob through the compose dialog.
            await page.click("#compose-button")
            await page.fill("#compose-to", "bob@example.test")
            await page.fill("#compose-subject", "Lunch on Friday?")
            await page.fill("#compose-text", "Noon at the usual place.")
            await page.click("#compose-send")
            await expect(page.locator("#toast")).to_have_text("Message sent")
            for _ in range(50):
                bob_inbox = await mailstore.mail(bob).get_mailbox(bob.id, "INBOX")
                if (await mailstore.mail(bob).status(bob.id, bob_inbox.id)).messages:
                    break
                await asyncio.sleep(0.1)
            stored = await mailstore.mail(bob).fetch(bob.id, bob_inbox.id, _all())
            assert [s.parsed.subject for s in stored] == ["Lunch on Friday?"]

            # New mail appears live, without reloading.
            await deliver(mailstore, alice, make_mail("Live delivery", sender="dave@remote.test"))
            live = page.locator("#message-list li").first
            await expect(live).to_contain_text("Live delivery", timeout=5_000)
            await expect(live).to_have_class("unread fresh")
            inbox_count = page.locator("#folder-list li[data-folder-name='INBOX'] .count")
            await expect(inbox_count).to_have_text("1")

            shot = tmp_path / "webmail-inbox.png"
            await page.screenshot(path=str(shot), full_page=True)
            print(f"webmail screenshot: {shot}")
            assert shot.stat().st_size > 10_000
            assert errors == []
        finally:
            await browser.close()


def _all() -> Any:
    from storage.model import UidSet

    return UidSet.all()
