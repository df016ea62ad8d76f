"""The README's architecture section names every module of the runtime package (it is drawn from the tree,
and a newcomer looks there first)."""

from __future__ import annotations

import re

from testsupport.data import REPO


def architecture_section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("## Architecture")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_every_appliance_module_is_named_in_the_architecture_section() -> None:
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", architecture_section()))
    modules = sorted(
        p.relative_to(REPO).as_posix()
        for p in (REPO / "appliance").rglob("*.py")
        if p.stem != "__init__" and p.stem != "__main__"
    )
    missing = [m for m in modules if m.rsplit("/", 1)[-1][:-3] not in words]
    assert not missing, f"README.md, Architecture: not named: {missing}"
