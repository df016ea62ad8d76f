"""The soak's verdict and its Markdown summary (tools/quality/soak.py)."""

from __future__ import annotations

from typing import Any


def passed(r: dict[str, Any]) -> bool:
    return bool(
        r["settled"]
        and r["lost"] == 0
        and r["duplicates"] == 0
        and r["daemon_crashes"] == 0
        and r["fuzz_crashes"] == 0
        and r["order_violations"] == 0
        and r["images_not_accounted_count"] == 0
        and r["unfinished"] == 0
        and not r["phi_leaks"]
        and r["outbox_pending"] == 0
        and r.get("cstore_hostile_accepted", 0) == 0  # Success only for what will be read
        and all(v == "ok" for v in r["integrity"].values())
    )


def markdown(r: dict[str, Any]) -> str:
    rows = [
        ("images dropped", r["images"]),
        ("daemon SIGKILLs survived", r["kills"]),
        ("broker SIGKILLs + restarts survived", r["broker_restarts"]),
        (
            "results delivered (unique message ids)",
            f"{r['results']} of {r['journal_results']} in the journal",
        ),
        ("lost", r["lost"]),
        ("duplicates after de-duplication", r["duplicates"]),
        ("redeliveries of one message id (at-least-once)", r["redeliveries"]),
        ("order violations per bed", r["order_violations"]),
        ("images without exactly one spool row", r["images_not_accounted_count"]),
        (
            "images whose row recovery registered (a kill between rename and row)",
            r.get("images_registered_by_recovery", 0),
        ),
        ("daemon crashes (exits we did not cause)", r["daemon_crashes"]),
        ("fuzz cases through read_image / crashes", f"{r['fuzz_cases']} / {r['fuzz_crashes']}"),
        ("fuzz files through the daemon", r["daemon_fuzz_files"]),
        (
            "images sent by C-STORE (retries while the cart was down)",
            f"{r.get('cstore_images', 0)} ({r.get('cstore_retries', 0)})",
        ),
        (
            "hostile codestreams by C-STORE / answered Success",
            f"{r.get('cstore_hostile', 0)} / {r.get('cstore_hostile_accepted', 0)}",
        ),
        ("quarantined", r["quarantined"]),
        ("payloads scanned for PHI / leaks", f"{r['payloads_scanned']} / {len(r['phi_leaks'])}"),
        ("journal / spool / outbox integrity", " / ".join(r["integrity"].values())),
        ("outbox pending at the end", r["outbox_pending"]),
        ("peak RSS of the daemon", f"{r['peak_rss_mb']} MB"),
        ("elapsed", f"{r['elapsed_s']} s"),
    ]
    lines = [
        f"# Soak: {'PASSED' if r['passed'] else 'FAILED'}",
        "",
        f"Model `{r['model']}`, seed {r['seed']}.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Quarantine reasons",
        "",
        *(f"- {k}: {v}" for k, v in r["quarantine_reasons"].items()),
        "",
        "## Fuzz of read_image: refusal reasons",
        "",
        *(f"- {k}: {v}" for k, v in r["fuzz"]["reasons"].items()),
    ]
    if r["notes"]:
        lines += ["", "## Notes", "", *(f"- {n}" for n in r["notes"])]
    return "\n".join(lines) + "\n"
