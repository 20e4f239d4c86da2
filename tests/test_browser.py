"""The app in a real browser: Playwright drives the system's Chromium against an in-process server.

Upload an image, ask, watch the answer stream in, open the Attention tab, click a generated token and see
the overlay change. A screenshot lands in .cache/artifacts/app.png. Outside CI the test skips (with the
reason) when Chromium or Playwright is missing; in CI (.ci/run sets CI=1 and installs chromium) it must run.
"""
import os
import shutil
from pathlib import Path

import pytest

from lab.train import NANO_DIR

ARTIFACTS = Path(__file__).resolve().parent.parent / ".cache" / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _why_not():
    if not (NANO_DIR / "model.safetensors").exists():
        return "checkpoints/qwen2vl-nano is missing"
    if CHROMIUM is None:
        return "no system Chromium (apt-get install chromium; .ci/run does it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (it is in requirements.txt)"
    return None


if _why_not():
    if os.environ.get("CI"):
        raise RuntimeError(f"the browser test must run in CI, but {_why_not()}")
    pytest.skip(_why_not(), allow_module_level=True)


@pytest.fixture(scope="module")
def url():
    import qwen2vl_min as q
    from lab.ui import build_demo
    demo = build_demo(*q.load(NANO_DIR, device="cpu"), max_new_tokens=24)
    demo.queue(default_concurrency_limit=1).launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield demo.local_url
    demo.close()


def test_upload_ask_stream_and_inspect_attention(url):
    from playwright.sync_api import expect, sync_playwright

    from lab.examples import EXAMPLES, OUT
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.goto(url)
        page.locator("#ask input[type=file]").set_input_files(str(OUT / "scene.png"))
        box = page.locator("#ask textarea")
        question, _, answer = EXAMPLES[0]
        box.fill(question)
        expect(page.locator("#ask img").first).to_be_visible(timeout=20_000)   # the upload has landed
        box.press("Enter")
        bot = page.locator("#chat .message.bot, #chat [data-testid=bot]").last
        expect(bot).to_contain_text(answer.rstrip("."), timeout=60_000)
        page.get_by_role("tab", name="Attention").click()
        overlay = page.locator("#overlay img").first
        expect(overlay).to_be_visible(timeout=30_000)
        before = overlay.get_attribute("src")
        tokens = page.locator("#tokens .token")
        expect(tokens.first).to_be_visible()
        tokens.nth(1).click()                                           # the second generated token
        expect(overlay).not_to_have_attribute("src", before, timeout=30_000)
        for video in page.locator("video").all():    # headless Chromium paints a second copy of one clip only
            video.hover()                            # once it has been hovered: for the screenshot's sake
        page.mouse.move(0, 0)
        page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "app.png").stat().st_size > 10_000
