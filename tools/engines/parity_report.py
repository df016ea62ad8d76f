"""The parity gate's verdict and the reading noise as Markdown tables (parity_<precision>.md and the like)."""

from __future__ import annotations

from typing import Any


def markdown(report: dict[str, Any], title: str, noise: dict[str, Any] | None = None) -> str:
    """The report as tables: one row per published score, then the noise it was judged against."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [
        f"# {title} — {verdict}",
        "",
        f"{report['n_images']} validation images. Rule: docs/parity.md. Units: logit for sigmoid outputs,"
        " points for severity, log-odds margin for the view, ratio, involvement share, pixel fraction.",
        "",
        "| score | gated | ΔAUC/ΔMAE/ΔDice (limit) | max abs Δ | mean abs Δ | p99 abs Δ (noise p99) |"
        " same images: mean / p99 abs Δ (noise mean / p99) | band | flips in band (beyond noise p99) / outside |"
        " ok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v: Any, digits: int = 4) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    for row in report["scores"]:
        if row.get("missing"):
            lines.append(
                f"| {row['key']} | {'yes' if row['gated'] else 'no'} | output missing | | | | | | NO |"
            )
            continue
        acc = row.get("accuracy")
        acc_text = (
            f"{acc['metric']} {acc['fp32']:.4f}→{acc['candidate']:.4f}: {acc['delta']:.4f} ({acc['limit']:.3g})"
            if acc
            else "no labels"
        )
        flips = (
            ", ".join(
                f"{p['point']} {p['inside_band']} ({p['beyond_noise_p99']})/{p['outside_band']}"
                for p in row["points"]
            )
            or "-"
        )
        paired = (
            f"{f(row.get('paired_mean_abs'))} / {f(row.get('paired_p99_abs'))}"
            f" ({f(row['noise_mean'])} / {f(row['noise_p99'])})"
        )
        lines.append(
            f"| {row['key']} | {'yes' if row['gated'] else 'no'} | {acc_text} | {f(row['max_abs'])} |"
            f" {f(row['mean_abs'])} | {f(row['p99_abs'])} ({f(row['noise_p99'])}) | {paired} |"
            f" {f(row['band'])} | {flips} | {'yes' if row['ok'] else 'NO'} |"
        )
    failed = [c for c in report["checks"] if not c["ok"]]
    if failed:
        lines += ["", "Failed checks:", ""]
        lines += [f"- {c['check']}: {c['value']} (limit {c['limit']})" for c in failed]
    if noise is not None:
        lines += ["", noise_markdown(noise)]
    return "\n".join(lines) + "\n"


def noise_markdown(noise: dict[str, Any]) -> str:
    lines = [
        f"## FP32 score noise (band = the largest |Δ| of the '{noise['band_source']}' source;"
        " deviation bound = its p99 and mean)",
        "",
    ]
    for name, source in noise["sources"].items():
        lines += [f"- {name}: {source['what']} ({source['n_images']} images)"]
    lines += ["", "| score | " + " | ".join(f"{n} p50 / p99 / max" for n in noise["sources"]) + " |"]
    lines += ["|---|" + "---|" * len(noise["sources"])]
    keys = list(noise["bands"]) or list(next(iter(noise["sources"].values()))["scores"])
    for key in keys:
        cells = []
        for source in noise["sources"].values():
            s = source["scores"].get(key, {})
            cells.append(f"{s['p50']:.4g} / {s['p99']:.4g} / {s['max']:.4g}" if s.get("n") else "n/a")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
