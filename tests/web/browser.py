"""Browser-test support: Debian's Chromium driven by Playwright at a phone's viewport, the server
running for real on a loopback port, and a record of every page visited (a full-page screenshot under
var/test-artifacts/web/, and axe-core's serious or critical violations).

Without /usr/bin/chromium the browser tests skip, except under ``FHIR_NORSE_REQUIRE_BROWSER=1`` (CI),
where they fail: ``make test`` installs it (tools/ensure_chromium.sh)."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "var" / "test-artifacts" / "web"
VIEWPORT = {"width": 360, "height": 740}
BLOCKING = ("serious", "critical")

if not CHROMIUM.exists() and os.environ.get("FHIR_NORSE_REQUIRE_BROWSER") == "1":
    raise RuntimeError(
        f"FHIR_NORSE_REQUIRE_BROWSER=1 but {CHROMIUM} is missing: run tools/ensure_chromium.sh"
    )

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium (/usr/bin/chromium) is not installed"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(app: FastAPI, port: int) -> Iterator[None]:
    """``app`` served by uvicorn on 127.0.0.1:``port`` in a thread, until the block ends. The app's lifespan
    runs as in production: at the end it closes what it opened (the HTTP clients of the sign-in with an
    OpenID provider, the message transports)."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "the server did not start"
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


class Pages:
    """Screenshots and axe-core checks of every page a run visits."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.count = 0
        from axe_playwright_python.sync_playwright import Axe

        self.axe = Axe()
        self.violations: list[str] = []
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def keep(self, page: Any, name: str, *, check: bool = True) -> None:
        self.count += 1
        lang = page.get_attribute("html", "lang") or "none"
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        page.screenshot(
            path=str(ARTIFACTS / f"{self.prefix}-{self.count:02d}-{slug}-{lang}.png"), full_page=True
        )
        if not check:
            return
        results = self.axe.run(page)
        for violation in results.response["violations"]:
            if violation.get("impact") in BLOCKING:
                targets = [n.get("target") for n in violation.get("nodes", [])][:3]
                self.violations.append(
                    f"{name} [{lang}]: {violation['id']} ({violation['impact']}) {targets}"
                )

    def keep_both_languages(self, page: Any, name: str) -> None:
        """This page in its language, then in the other one (switched through the page's own button),
        then back."""
        self.keep(page, name)
        switch = page.locator("form.language button")
        if switch.count() == 0:
            return
        switch.click()
        page.wait_for_load_state()
        self.keep(page, name)
        page.locator("form.language button").click()
        page.wait_for_load_state()


def answer_screen(page: Any, value: str) -> None:
    """Choose ``value`` (or "as-now", or the first option) in every question of the screen, by pressing
    its label as a patient's finger would."""
    for fieldset in page.locator("fieldset.question").all():
        for wanted in (value, "as-now"):
            option = fieldset.locator(f'input[value="{wanted}"]')
            if option.count():
                break
        else:
            option = fieldset.locator("input[type=radio]").first
        label = fieldset.locator(f'label[for="{option.get_attribute("id")}"]')
        label.click()


def go_on(page: Any) -> None:
    page.locator('button[name="action"][value="next"]').click()
    page.wait_for_load_state()
