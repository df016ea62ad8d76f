"""Acknowledging as a clinician does: the Acknowledge button, then the verdict dialog."""

from __future__ import annotations

from typing import Literal

from tests.display.browser import Page


def acknowledge(
    page: Page,
    button: str,
    verdict: Literal["agree", "disagree", "unsure"] = "agree",
    comment: str | None = None,
) -> None:
    """Click `button` (an .ack-button selector), choose `verdict`, type `comment`, send."""
    page.click(button)
    page.wait("#ack-dialog[open]")
    page.click(f'#ack-dialog input[name=verdict][value="{verdict}"]')
    if comment is not None:
        page.fill("#ack-comment", comment)
    page.click("#ack-send")
    page.wait("#ack-dialog", state="hidden")
