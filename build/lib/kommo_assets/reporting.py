"""Words and tables for people: the change preview as a one-line summary and as Markdown for the UI."""

from typing import Any

_SAMPLE_TITLES = {
    "bookings_add": "Bookings to add",
    "bookings_update": "Bookings to change",
    "bookings_deactivate": "Bookings to deactivate",
    "clients_add": "Clients to add",
    "clients_update": "Clients to update",
    "vehicles_create": "Vehicles to create",
}


def preview_summary(preview: dict[str, Any] | None) -> str:
    """E.g. ``bookings +12 ~3 -40 (status 2, dates 1); clients +5 ~1; vehicles +0; sales leads +14 ~3 -41``."""
    if not preview:
        return "no change preview"
    b, c, v, s = preview["bookings"], preview["clients"], preview["vehicles"], preview["sales_leads"]
    fields = ", ".join(f"{k} {n}" for k, n in sorted(b.get("field_changes", {}).items()))
    return (
        f"bookings +{b['add']} ~{b['update']} -{b['deactivate']}"
        + (f" ({fields})" if fields else "")
        + f"; clients +{c['add']} ~{c['update']}; vehicles +{v['create']}"
        + f"; sales leads +{s['add']} ~{s['update']} -{s['archive']}"
    )


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        value = "; ".join(f"{k}: {v}" if "→" in str(v) else f"{k}={v}" for k, v in value.items() if v is not None)
    elif isinstance(value, list):
        value = ", ".join(map(str, value))
    return str(value).replace("|", "\\|").replace("\n", " ")


def _diff(row: dict[str, Any]) -> dict[str, Any]:
    """A sample of a changing row as ``code``, ``changes`` and only the fields that differ, before → after."""
    before, after = row.get("before") or {}, row.get("after") or {}
    moved = {k: f"{before.get(k)} → {after.get(k)}" for k in after if before.get(k) != after.get(k)}
    key = "code" if "code" in row else "contact_id"
    return {key: row.get(key), "changes": row.get("changes", sorted(moved)), "before → after": moved}


def preview_markdown(preview: dict[str, Any] | None) -> str:
    """Counts first, then a small table per kind of change (only the kinds that have rows)."""
    if not preview:
        return "_no change preview_"
    b = preview["bookings"]
    lines = [
        "| | add | change | deactivate / archive | unchanged |",
        "|---|---:|---:|---:|---:|",
        f"| bookings | {b['add']} | {b['update']} | {b['deactivate']} | {b['unchanged']} |",
        f"| sales leads | {preview['sales_leads']['add']} | {preview['sales_leads']['update']}"
        f" | {preview['sales_leads']['archive']} | |",
        f"| clients | {preview['clients']['add']} | {preview['clients']['update']} | | |",
        f"| vehicles | {preview['vehicles']['create']} | | | |",
    ]
    if b.get("field_changes"):
        lines.append("")
        lines.append("Booking fields changing: " + ", ".join(
            f"**{k}** {n}" for k, n in sorted(b["field_changes"].items())))
    for kind, rows in preview.get("samples", {}).items():
        if not rows:
            continue
        if "before" in rows[0]:
            rows = [_diff(row) for row in rows]
        columns = list(rows[0].keys())
        lines += ["", f"**{_SAMPLE_TITLES.get(kind, kind)}** (first {len(rows)})", "",
                  "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row.get(col)) for col in columns) + " |" for row in rows]
    return "\n".join(lines)


def drift_count(preview: dict[str, Any] | None) -> int:
    """How many production rows a swap of this preview would change (add, update, archive, deactivate,
    create): for the nightly dry run, the drift the incremental syncs left, which should be 0."""
    if not preview:
        return 0
    b, c, v, s = preview["bookings"], preview["clients"], preview["vehicles"], preview["sales_leads"]
    return int(b["add"] + b["update"] + b["deactivate"] + c["add"] + c["update"] + v["create"]
               + s["add"] + s["update"] + s["archive"])
