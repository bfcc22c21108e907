"""The Markdown report and the printed summary of `tulu-jax data decontaminate` (from a
`decontaminate.Summary`): removals per training source and per evaluation set, a few examples of each, the
source x set counts and how many kept rows came close."""

from __future__ import annotations

import os
import re

from tulu_jax.curation.decontaminate import Summary
from tulu_jax.curation.rows import format_table, partial_path, remove_stale_partials, user_text

EXAMPLE_CHARS = 240  # characters of an evaluation instance / training prompt shown in an example
TOP_SOURCES = 50  # rows of the per-source tables; the rest are summed into one "(others: K sources)" row
SHORT_LISTED = 20  # short instances listed per evaluation set


def _short(text: str, limit: int = EXAMPLE_CHARS) -> str:
    """One line of at most `limit` characters, safe inside a Markdown table cell or list item."""
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("`", "'")


def _table(header: list[str], rows: list[list]) -> list[str]:
    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else _short(str(v), 120)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def _examples(records: list[dict]) -> list[str]:
    lines = []
    for r in records:
        prompt = user_text(r["row"], r["where"])
        lines += [
            f"- `{_short(r['where'], 160)}` (source {_short(r['source'], 80)}): score {r['score']:.3f} against "
            f"{_short(r['eval_set'], 80)} #{r['eval_index']}",
            f"  - evaluation instance: {_short(r['eval_text'])}",
            f"  - training prompt: {_short(prompt)}",
        ]
    return lines or ["(none)"]


def _top_sources(s: Summary) -> list[str]:
    """The TOP_SOURCES sources with most removals (then most rows, then by name)."""
    items = sorted(s.per_source.items(), key=lambda kv: (-kv[1]["removed"], -kv[1]["rows"], kv[0]))
    return [k for k, _ in items[:TOP_SOURCES]]


def source_rows(s: Summary) -> list[list]:
    """[source, rows, removed, removed %] per training source, most removals first: the TOP_SOURCES first
    ones, then one "(others: K sources)" row summing the rest (a `source` per row makes many)."""
    top = _top_sources(s)
    out = [[k, s.per_source[k]["rows"], s.per_source[k]["removed"]] for k in top]
    if len(s.per_source) > len(top):
        shown = set(top)
        rest = [v for k, v in s.per_source.items() if k not in shown]
        out.append([f"(others: {len(rest)} sources)", sum(v["rows"] for v in rest), sum(v["removed"] for v in rest)])
    return [[k, rows, removed, _pct(removed, rows)] for k, rows, removed in out]


def pair_rows(s: Summary) -> list[list]:
    """[source, evaluation set, rows] of the best matches, most rows first: TOP_SOURCES rows, then one
    "(others: K pairs)" row."""
    items = sorted(s.pairs.items(), key=lambda kv: (-kv[1], kv[0]))
    out = [[a, b, k] for (a, b), k in items[:TOP_SOURCES]]
    if len(items) > TOP_SOURCES:
        out.append([f"(others: {len(items) - TOP_SOURCES} pairs)", "", sum(k for _, k in items[TOP_SOURCES:])])
    return out


def _short_section(s: Summary) -> list[str]:
    if not any(s.short.values()):
        return []
    how = (
        "skipped: they have no n-gram, and open-instruct never matches them (`--short-instances whole` removes "
        "every row that contains one whole)"
        if s.short_instances == "skip"
        else "matched whole (`--short-instances whole`): a row containing one's tokens in order scores 1.0"
    )
    lines = ["", f"## Evaluation instances shorter than {s.n} tokens", "", f"These were {how}.", ""]
    for e in s.sets:
        idx = s.short.get(e.name, [])
        lines += [f"- {_short(e.name, 120)}: {len(idx)} of {len(e.texts)}"]
        lines += [f"  - #{i}: {_short(e.texts[i], 120)}" for i in idx[:SHORT_LISTED]]
        if len(idx) > SHORT_LISTED:
            lines.append(f"  - ... and {len(idx) - SHORT_LISTED} more")
    return lines


def set_rows(s: Summary) -> list[list]:
    """[set, instances, under n tokens, instances matched, rows removed (any match), rows removed (best
    match)] per evaluation set, in the order given."""
    return [
        [e.name, v["instances"], v["short"], v["matched"], v["rows"], v["best"]]
        for e, v in ((e, s.per_set[e.name]) for e in s.sets)
    ]


SET_HEADER = ["evaluation set", "instances", "under n tokens", "instances matched", "rows (any)", "rows (best)"]


def render(s: Summary) -> str:
    """The whole Markdown report."""
    scanned = s.rows_kept + s.rows_removed
    skipped = sum(s.rows_skipped.values())
    short = sum(v["short"] for v in s.per_set.values())
    instances = sum(v["instances"] for v in s.per_set.values())
    short_how = "skipped (as open-instruct)" if s.short_instances == "skip" else "matched when a row contains one whole"
    lines = [
        "# Decontamination report",
        "",
        f"A training row is removed when some evaluation instance scores **> {s.threshold}** against it: the "
        f"fraction of the instance's tokens covered by its {s.n}-grams that also occur in the row's user turns "
        "(Tülu 3 §3; open-instruct `decontamination/search.py`). Tokens: NFKC + casefold, words and single "
        f"punctuation marks; no n-gram spans two user turns. Instances shorter than {s.n} tokens: {short_how}.",
        "",
        f"- Training rows: {s.rows_read} read, {skipped} skipped as bad, {scanned} scanned; "
        f"**{s.rows_removed} removed** ({_pct(s.rows_removed, scanned):.3f}%), {s.rows_kept} kept.",
        f"- Evaluation sets: {len(s.sets)}, {instances} instances ({short} shorter than {s.n} tokens).",
        f"- Time: {s.seconds:.1f} s with {s.workers} worker(s), {s.prompts_per_s:.0f} prompts/s.",
        f"- Clean rows: `{s.out}`; removed rows with their matches: `{s.removed_path}`.",
    ]
    if skipped:
        lines.append(f"- Skipped rows by reason: {', '.join(f'{k}: {v}' for k, v in sorted(s.rows_skipped.items()))}.")
    lines += ["", "## Removed rows per training source", ""]
    lines += _table(["source", "rows", "removed", "removed %"], source_rows(s))
    for source in sorted(_top_sources(s)):
        if s.per_source[source]["removed"]:
            lines += ["", f"### {_short(source, 120)}", ""] + _examples(s.examples.get(f"source:{source}", []))
    lines += ["", "## Matches per evaluation set", ""]
    lines += [
        "`instances matched`: instances scoring above the threshold against at least one training row; "
        "`rows (any)`: removed rows with a match in the set; `rows (best)`: removed rows whose best match is "
        "in the set.",
        "",
    ]
    files = [[e.name, e.path, ", ".join(f"{k} ({v})" for k, v in e.fields.items())] for e in s.sets]
    lines += _table(SET_HEADER, set_rows(s)) + [""] + _table(["evaluation set", "file", "text field (rows)"], files)
    for e in s.sets:
        if s.per_set[e.name]["best"]:
            lines += ["", f"### {_short(e.name, 120)}", ""] + _examples(s.examples.get(f"set:{e.name}", []))
    if s.pairs:
        lines += ["", "## Removed rows by training source and evaluation set (best match)", ""]
        lines += _table(["source", "evaluation set", "rows"], pair_rows(s))
    lines += _short_section(s)
    lines += [
        "",
        "## Kept rows that share n-grams with an instance",
        "",
        "Best score of each kept row that shares at least one n-gram with some instance (computed from 64-bit "
        "n-gram hashes: exact but for a hash collision, which can only raise a score).",
        "",
    ]
    buckets = [[f"[{b:.1f}, {b + 0.1:.1f})", k] for b, k in sorted(s.near_misses.items())]
    lines += _table(["best score", "rows"], buckets) if buckets else ["(none)"]
    return "\n".join(lines) + "\n"


def write_report(s: Summary, path: str) -> None:
    """Writes `render(s)` to `path` (via a temporary file, `rows.partial_path`, renamed into place)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_stale_partials(path)
    tmp = partial_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(render(s))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def summary_text(s: Summary) -> str:
    """The tables printed at the end of a run."""
    scanned = s.rows_kept + s.rows_removed
    head = (
        f"decontaminate: {scanned} prompts in {s.seconds:.1f} s ({s.prompts_per_s:.0f} prompts/s, "
        f"{s.workers} worker(s)); removed {s.rows_removed}, kept {s.rows_kept}"
    )
    if s.rows_skipped:
        head += f", skipped {sum(s.rows_skipped.values())} bad rows"
    parts = [
        head,
        format_table(["source", "rows", "removed", "removed %"], source_rows(s), title="per training source"),
        format_table(SET_HEADER, set_rows(s), title="per evaluation set"),
        f"clean: {s.out}\nremoved: {s.removed_path}" + (f"\nreport: {s.report_path}" if s.report_path else ""),
    ]
    return "\n\n".join(parts)
