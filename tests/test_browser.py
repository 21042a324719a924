"""The page in a real browser: Debian's chromium, driven by playwright's Python API, with a fake microphone that
plays the shipped speech clip. It opens /, presses Start, and the video element must play at >= 20 fps (frames
counted with requestVideoFrameCallback). Skipped only where chromium is absent (`.ci/run` installs it)."""
import shutil
import time
import wave

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
pytest.importorskip("aiortc", reason="the serve extra is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

from bench.serve import serving  # noqa: E402
from runtime import AvatarPipeline  # noqa: E402
from runtime.config import TOY_ASSETS  # noqa: E402
from runtime.media import load_audio  # noqa: E402

# Headless chromium on a closed network: no background fetches, and plain host candidates instead of mDNS names,
# which aiortc cannot resolve.
FLAGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", "--no-sandbox", "--disable-gpu",
         "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-features=WebRtcHideLocalIpsWithMdns", "--autoplay-policy=no-user-gesture-required"]


def write_wav(path, pcm: np.ndarray, rate: int = 16000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())


def drive_page(url: str, microphone_wav, seconds: float = 3.0, screenshot=None) -> dict:
    """Open the page, press Start, let it play `seconds` and measure the shown frames per second; optionally save a
    screenshot mid-stream. Returns {"fps", "shown", "stats"}."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=FLAGS + [f"--use-file-for-fake-audio-capture={microphone_wav}"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 840})
            page.goto(url)
            page.wait_for_selector("#faces img")
            page.click("#start")
            page.wait_for_function("window.avatar.shownFrames > 25", timeout=90_000)
            before, start = page.evaluate("window.avatar.shownFrames"), time.monotonic()
            time.sleep(seconds)
            shown, elapsed = page.evaluate("window.avatar.shownFrames") - before, time.monotonic() - start
            if screenshot is not None:
                page.screenshot(path=str(screenshot))
            stats = page.evaluate("window.avatar.stats")
            page.click("#stop")
            page.wait_for_function("document.querySelector('#start').disabled === false")
            return {"fps": shown / elapsed, "shown": shown, "stats": stats}
        finally:
            browser.close()


def test_page_plays_the_avatar_at_20_fps_or_more(tmp_path):
    pipe = AvatarPipeline.from_preset("toy-talker", device="cpu")
    wav = tmp_path / "speech.wav"
    write_wav(wav, load_audio(TOY_ASSETS / "hello.wav"))
    with serving(pipe, max_sessions=1) as (url, hub):
        result = drive_page(url, wav, screenshot=tmp_path / "page.png")
        assert result["fps"] >= 20, result
        assert result["stats"] and result["stats"]["type"] == "stats" and result["stats"]["frames"] > 25
        deadline = time.monotonic() + 10
        while hub.sessions and time.monotonic() < deadline:            # Stop deleted the session
            time.sleep(0.1)
        assert not hub.sessions
    assert (tmp_path / "page.png").stat().st_size > 10_000
