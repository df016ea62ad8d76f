"""The soak's accounting of images against spool rows (tools/quality/soak_analysis.py, `account`)."""

from __future__ import annotations

from tools.quality.soak_analysis import account
from tools.quality.soak_run import Drop

UID_A, UID_B = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"


def test_each_image_needs_exactly_one_row_by_its_original_name() -> None:
    images = [
        Drop("a.dcm", "image", key_prefix=f"sop:{UID_A}/"),
        Drop("b.png", "image", key_prefix="sha256:ff"),
    ]
    rows = [("/inbox/a.dcm", f"sop:{UID_A}/blake3:00"), ("/inbox/b.png", "sha256:ff")]
    assert account(images, rows) == ([], [], [])
    twice = [*rows, ("/usb/a.dcm", f"sop:{UID_A}/blake3:00#x")]
    assert account(images, twice)[0] == ["a.dcm"]  # two rows for one image
    assert account(images, rows[1:])[0] == ["a.dcm"]  # no row at all


def test_a_row_recovery_registered_accounts_for_one_image_with_the_same_key() -> None:
    images = [
        Drop("a.dcm", "image", key_prefix=f"sop:{UID_A}/"),
        Drop("b.dcm", "image", key_prefix=f"sop:{UID_B}/"),
    ]
    rows: list[tuple[str | None, str]] = [
        ("/inbox/b.dcm", f"sop:{UID_B}/blake3:11"),
        (None, f"sop:{UID_A}/blake3:00"),
    ]
    assert account(images, rows) == ([], ["a.dcm"], [])
    # A row of another image (or of a fuzz file) does not account for it, and is reported as unmatched.
    stranger: list[tuple[str | None, str]] = [("/inbox/b.dcm", f"sop:{UID_B}/blake3:11"), (None, "sha256:ee")]
    assert account(images, stranger) == (["a.dcm"], [], ["sha256:ee"])
    # One registered row accounts for one image only.
    again = [*images, Drop("a-copy.dcm", "image", key_prefix=f"sop:{UID_A}/")]
    assert account(again, rows) == (["a-copy.dcm"], ["a.dcm"], [])
