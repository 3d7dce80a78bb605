"""Open an HTML page as a person would: in headless Chromium (Debian's `chromium` package).

`make test` installs it when missing (Makefile, `browser`); where it cannot be installed, the tests
that need it skip and say so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

# appended to a copy of the page: after load, record each image's decoded width on <body>, so the DOM
# that Chromium dumps says whether every image really decoded and drew
PROBE = ("<script>window.addEventListener('load', () => { document.body.dataset.imageWidths = "
         "[...document.images].map(i => i.complete ? i.naturalWidth : -1).join(','); });</script>")


def chromium() -> str | None:
    """The Chromium executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def open_in_chromium(page: str | Path, out_dir: str | Path, *, width: int = 1200, height: int = 3000,
                     timeout: float = 120) -> dict:
    """Load `page` (a file) in headless Chromium; return the DOM after load and a screenshot.

    Returns:
        `{"dom": str, "image_widths": [int, ...] (0 = not decoded), "screenshot": Path}`.
    """
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed")
    out_dir = Path(out_dir)
    probe = out_dir / "probed.html"
    probe.write_text(Path(page).read_text().replace("</body>", PROBE + "</body>"))
    shot = out_dir / "screenshot.png"
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom",
                              probe.as_uri()], capture_output=True, text=True, timeout=timeout, check=True).stdout
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={shot}", probe.as_uri()], capture_output=True, timeout=timeout, check=True)
    m = re.search(r'data-image-widths="([^"]*)"', dom)
    widths = [int(w) for w in m.group(1).split(",") if w] if m else []
    return {"dom": dom, "image_widths": widths, "screenshot": shot}


class Sections(HTMLParser):
    """Ids of `<section>`s and `alt`s of `<img>`s (with whether their `src` is an inline PNG) of a page."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[tuple[str, bool]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section" and a.get("id"):
            self.sections.append(a["id"])
        if tag == "img":
            self.images.append((a.get("alt") or "", (a.get("src") or "").startswith("data:image/png;base64,")))
