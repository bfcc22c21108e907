"""Mixtures of SFT, preference or prompt data from several sources, with exact and near-duplicate removal
(Tülu 3 §3 "prompt curation" and decontaminated mixes; open-instruct's dataset mixer, `get_datasets` /
`dataset_transformation.py`, which takes a count or a fraction of each source).

A mix is read in two passes, so its rows never have to fit in memory:
1. plan (`plan_mix`): every source in config order is read and validated row by row; a row whose normalised
   prompt (its user turns, see `tulu_jax.curation.normalize`) was seen before, in this source or an earlier
   one, is an exact duplicate; of the rest, one whose MinHash/LSH neighbourhood holds a kept row with
   estimated Jaccard >= threshold is a near duplicate (`tulu_jax.curation.dedup`). Earlier sources win,
   and within a source the first row does. Then each source's `count` or `ratio` of its remaining rows is
   drawn with a generator seeded by (seed, source index).
2. write (`iter_mix`): the sources are read again and the drawn rows streamed out, sources in config
   order, rows in file order (an upsampled row's copies next to each other). The trainers shuffle, so the
   mix is not shuffled here, which keeps it a streaming write and easy to diff.

Rows pass through unchanged except for a `source` field (the source's name) added when a row has none
(or a null one): an existing `source` (e.g. the original dataset of a Tülu 3 mixture row) is kept.
Same config and inputs -> byte-identical JSONL or Parquet output (a save_to_disk folder holds the same rows,
but datasets writes a fresh fingerprint into its state.json). A source left with no rows is an error when
every one of its rows was bad (almost always the wrong `kind`), else a warning in the summary.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tulu_jax.configlib import ConfigError
from tulu_jax.data.chat import DataError

KINDS = ("sft", "preference", "prompt")
BUNDLED_PREFIX = "bundled:"  # bundled:tiny_chat/train.jsonl -> a file under the package's tulu_jax/assets
HUB_PREFIX = "hf:"  # hf:allenai/tulu-3-sft-mixture -> datasets.load_dataset(name, split=split)
_BATCH = 1024  # rows per near-duplicate signature batch


@dataclasses.dataclass(frozen=True, kw_only=True)
class DedupConfig:
    """Duplicate removal over the normalised user turns of each row."""

    exact: bool = field(default=True, metadata={"help": "drop rows whose normalised prompt was seen before"})
    near: bool = field(
        default=False,
        metadata={"help": "drop near duplicates (MinHash + LSH over shingles of words and punctuation)"},
    )
    threshold: float = field(
        default=0.8,
        metadata={
            "help": "estimated Jaccard of shingles at which a row is a near duplicate; the largest that "
            "datasketch's LSH allows grows with num_perm (0.98 at 128)"
        },
    )
    num_perm: int = field(
        default=128,
        metadata={
            "help": "MinHash permutations (2..1024): the Jaccard estimate's std is sqrt(J(1-J)/num_perm); "
            "cost grows with it"
        },
    )
    shingle_size: int = field(default=3, metadata={"help": "tokens (words, punctuation marks) per shingle (1..32)"})

    def __post_init__(self):
        from tulu_jax.curation.dedup import MAX_NUM_PERM, MAX_SHINGLE_SIZE, lsh_problem

        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 2 <= self.num_perm <= MAX_NUM_PERM:
            raise ValueError(f"num_perm must be in 2..{MAX_NUM_PERM}, got {self.num_perm}")
        if not 1 <= self.shingle_size <= MAX_SHINGLE_SIZE:
            raise ValueError(f"shingle_size must be in 1..{MAX_SHINGLE_SIZE}, got {self.shingle_size}")
        problem = lsh_problem(self.threshold, self.num_perm) if self.near else None
        if problem:  # starts with the key to blame: "threshold ..." or "num_perm ..."
            raise ValueError(problem)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """One input of a mix and how much of it to take."""

    path: str = field(
        metadata={
            "help": "JSONL, Parquet or save_to_disk folder (relative to the working directory); "
            "bundled:NAME/FILE for a file under tulu_jax/assets; hf:OWNER/NAME for a Hugging Face hub data set"
        }
    )
    name: str | None = field(
        default=None, metadata={"help": "the `source` tag of its rows; default: the file or data set name"}
    )
    split: str | None = field(default=None, metadata={"help": "hub split (hf: paths only; default train)"})
    count: int | None = field(default=None, metadata={"help": "rows drawn (without repetition) after dedup"})
    ratio: float | None = field(
        default=None,
        metadata={
            "help": "fraction of the rows left after dedup, rounded down; above 1 upsamples: every row "
            "floor(ratio) times plus a drawn share of the rest"
        },
    )

    def __post_init__(self):
        if (self.count is None) == (self.ratio is None):
            raise ValueError("give exactly one of count (rows) or ratio (fraction of the rows after dedup)")
        if self.count is not None and self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")
        if self.ratio is not None and not (self.ratio > 0 and math.isfinite(self.ratio)):
            raise ValueError(f"ratio must be > 0 (above 1 upsamples), got {self.ratio}")
        if not self.path.strip():
            raise ValueError("path is empty")
        if self.split is not None and not self.path.startswith(HUB_PREFIX):
            raise ValueError(f"split is for {HUB_PREFIX} hub sources only; a local split is its own file or folder")
        if self.name is not None and not self.name.strip():
            raise ValueError("name is empty")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixConfig:
    """A mixture: what kind of rows, from which sources, deduplicated how (configs/data/*mix*.yaml)."""

    kind: Literal["sft", "preference", "prompt"] = field(
        metadata={
            "help": "sft: `messages` with a user and an assistant turn; preference: `chosen`/`rejected`; "
            "prompt: `messages` or a `prompt` string"
        }
    )
    seed: int = field(default=0, metadata={"help": "seed of the draws, >= 0 (same config -> same output)"})
    sources: tuple[SourceConfig, ...] = field(metadata={"help": "the inputs, earlier ones winning duplicates"})
    dedup: DedupConfig = field(default_factory=DedupConfig, metadata={"help": "duplicate removal"})

    def __post_init__(self):
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not self.sources:
            raise ValueError(_NO_SOURCES)


_NO_SOURCES = "none given: list at least one source, each with a path and a count or a ratio"
# configlib's type names, as a config's author would say them
_PLAIN_WORDS = (
    (
        re.compile(r"^sources: expected tuple\[SourceConfig, \.\.\.\], got None \(NoneType\)$"),
        f"sources: {_NO_SOURCES}",
    ),
    (re.compile(r"^<root> \(MixConfig\): "), ""),
    (re.compile(r"^" + re.escape(_NO_SOURCES)), f"sources: {_NO_SOURCES}"),
    (re.compile(r"expected tuple\[SourceConfig, \.\.\.\]"), "expected a list of sources"),
    (re.compile(r"expected SourceConfig"), "expected a source (a mapping with path, and count or ratio)"),
    (re.compile(r"expected DedupConfig"), "expected a mapping of dedup settings"),
    (re.compile(r"expected Literal\['sft', 'preference', 'prompt'\]"), "expected one of sft, preference, prompt"),
    (re.compile(r"got None \(NoneType\)$"), "got nothing (an empty value)"),
)


def load_mix_config(path: str) -> MixConfig:
    """Reads and checks a mix config -> MixConfig. Raises ConfigError as one line naming the file and the
    key (`configs/data/x.yaml: sources[2].count: must be >= 1, got 0`), in plain words (no Python type
    names), including two sources with the same name and a dedup threshold datasketch's LSH cannot serve
    at that num_perm."""
    from tulu_jax.configlib import load_config

    try:
        cfg = load_config(MixConfig, path)
    except ConfigError as e:
        msg = str(e)
        msg = msg[len(path) + 2 :] if msg.startswith(f"{path}: ") else msg
        for pattern, words in _PLAIN_WORDS:
            msg = pattern.sub(words, msg)
        raise ConfigError(f"{path}: {msg}") from None
    seen: dict[str, int] = {}
    for i, name in enumerate(source_names(cfg)):
        if name in seen:
            raise ConfigError(
                f"{path}: sources[{i}].name: {name!r} is already the name of sources[{seen[name]}]; "
                "give each source its own name"
            )
        seen[name] = i
    return cfg


_SPLIT_NAMES = ("train", "eval", "test", "validation", "dev")


def bundled_files() -> list[str]:
    """The data files under the package's tulu_jax/assets, as `bundled:` paths (NAME/FILE), sorted."""
    root = importlib.resources.files("tulu_jax") / "assets"
    return sorted(
        f"{d.name}/{f.name}"
        for d in root.iterdir()
        if d.is_dir()
        for f in d.iterdir()
        if f.name.endswith((".jsonl", ".parquet"))
    )


def source_names(cfg: MixConfig) -> list[str]:
    """Each source's `source` tag: its `name`, else the data set name of an hf: path, else the file's stem
    (or folder name); a split file (train/eval/test/validation/dev.jsonl or .parquet, as in the bundled sets)
    is named after its folder: bundled:tiny_arith/train.jsonl -> tiny_arith."""
    out = []
    for s in cfg.sources:
        if s.name is not None:
            out.append(s.name)
        elif s.path.startswith(HUB_PREFIX):
            out.append(s.path[len(HUB_PREFIX) :].rstrip("/").split("/")[-1])
        else:
            p = Path(s.path.removeprefix(BUNDLED_PREFIX).rstrip("/"))
            name = p.stem if p.suffix.lower() in (".jsonl", ".parquet") else p.name
            if name.lower() in _SPLIT_NAMES and p.parent.name:
                name = p.parent.name
            out.append(name)
    return out


def resolve_path(path: str) -> str:
    """A local source path as a file system path: `bundled:NAME/FILE` -> the package's tulu_jax/assets/NAME/FILE
    (found wherever the package is installed, like `data.use_bundled` of the training configs); any other
    path is used as written (relative to the working directory), with ~ expanded."""
    if path.startswith(BUNDLED_PREFIX):
        return str(importlib.resources.files("tulu_jax") / "assets" / path[len(BUNDLED_PREFIX) :])
    return os.path.expanduser(path)


RowReader = Callable[[], Iterator[tuple[str, Any]]]


def open_source(source: SourceConfig, key: str) -> RowReader:
    """A function that yields (where, row) for every raw row of `source`, in the same order each call; `row`
    is a DataError for a line that does not parse. `key` names the source in errors (`CONFIG: sources[i]`).
    Raises InputError (one line, naming key and path) for a missing local path or a hub data set that
    cannot be loaded (no network, HF_HUB_OFFLINE set and not cached, unknown name or split)."""
    from tulu_jax.inputs import InputError, check_data_path

    if not source.path.startswith(HUB_PREFIX):
        path = resolve_path(source.path)
        if source.path.startswith(BUNDLED_PREFIX) and not os.path.exists(path):
            raise InputError(
                f"{key}.path: {source.path}: no such bundled file; bundled files: "
                + ", ".join(BUNDLED_PREFIX + f for f in bundled_files())
            )
        check_data_path(path, f"{key}.path")
        from tulu_jax.data.sources import iter_raw_rows

        return lambda: iter_raw_rows(path)
    name, split = source.path[len(HUB_PREFIX) :], source.split or "train"
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types (offline, 404, bad split): one line each
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else ""
        raise InputError(
            f"{key}.path: {source.path} split {split}: cannot load it from the Hugging Face hub{offline}: {first}"
        ) from None

    def rows() -> Iterator[tuple[str, Any]]:
        for n, row in enumerate(ds, start=1):
            yield f"{source.path}[{split}] row {n}", row

    return rows


def _user_turns(messages: list[dict[str, str]], where: str, field_name: str) -> str:
    text = "\n".join(m["content"] for m in messages if m["role"] == "user")
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: field '{field_name}': no user turn", "no_user_turn")
    return text


def kind_hint(row: Any, kind: str) -> str:
    """When `row` looks like another kind of row than `kind` says, a sentence that points at `kind`
    (starting with "; "), else "". Preference rows have `chosen` and `rejected`; SFT rows `messages` with an
    assistant turn; prompt rows `messages` without one, or a `prompt` string."""
    if not isinstance(row, dict):
        return ""
    if "chosen" in row and "rejected" in row:
        looks, why = "preference", "rows with chosen/rejected are kind: preference"
    elif isinstance(row.get("messages"), list) and any(
        isinstance(m, dict) and m.get("role") == "assistant" for m in row["messages"]
    ):
        looks, why = "sft", "rows with an assistant turn in messages are kind: sft (or prompt, to use the prompts)"
    elif row.get("messages") is not None or isinstance(row.get("prompt"), str):
        looks, why = "prompt", "rows with a prompt but no reply are kind: prompt"
    else:
        return ""
    return "" if looks == kind or (kind == "prompt" and looks == "sft") else f" (the config says kind: {kind}; {why})"


def prompt_text(row: Any, where: str, kind: str) -> str:
    """Validates one row for `kind` and returns its prompt: the user turns joined by newlines.

    sft: `messages` valid for SFT training (roles, string contents, an assistant reply) with a user turn;
    preference: a pair `tulu_jax.data.preference.parse_preference_row` accepts (Tülu 3 `chosen`/`rejected`
    message lists, or `prompt` + replies), the prompt taken from `chosen`; prompt: `messages` with a user
    turn, or a non-empty `prompt` string. Raises DataError naming `where` and the field, with `kind_hint`
    appended when the row looks like another kind."""
    try:
        return _prompt_text(row, where, kind)
    except DataError as e:
        hint = kind_hint(row, kind)
        if not hint:
            raise
        raise DataError(f"{e}{hint}", e.reason) from None


def _prompt_text(row: Any, where: str, kind: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}", "not_an_object")
    if kind == "sft":
        from tulu_jax.data.chat import validate_messages

        return _user_turns(validate_messages(row, where), where, "messages")
    if kind == "preference":
        from tulu_jax.data.preference import parse_preference_row

        chosen, _ = parse_preference_row(row, where)
        return _user_turns(chosen, where, "chosen")
    if kind == "prompt":
        from tulu_jax.curation.rows import user_text

        if row.get("messages") is None and row.get("prompt") is None:
            raise DataError(f"{where}: no prompt field (expected 'messages' or 'prompt')", "no_prompt")
        return user_text({k: row[k] for k in ("messages", "prompt") if k in row}, where)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def draw_counts(available: int, count: int | None, ratio: float | None, rng: np.random.Generator) -> np.ndarray:
    """How often each of `available` rows goes into the mix -> (available,) int64.

    `count`: that many distinct rows, drawn uniformly without replacement (ValueError if count > available).
    `ratio`: floor(ratio * available) rows (a 1e-9 slack absorbs float error: 0.29 * 100 -> 29): every row
    floor(ratio) times, then the remainder as distinct rows drawn without replacement (ratio 2.5 of 10 rows:
    each twice, 5 of them three times)."""
    if (count is None) == (ratio is None):
        raise ValueError("give exactly one of count or ratio")
    mult = np.zeros(available, dtype=np.int64)
    if count is not None:
        if count > available:
            raise ValueError(f"count {count} > {available} rows available")
        mult[rng.choice(available, size=count, replace=False)] = 1
        return mult
    total = math.floor(ratio * available + 1e-9)
    if available == 0:
        return mult
    full, rest = divmod(total, available)
    mult += full
    mult[rng.choice(available, size=rest, replace=False)] += 1
    return mult


@dataclasses.dataclass
class SourcePlan:
    """What pass 1 found in one source: counts, the raw-row ordinals kept by dedup and how often each is drawn."""

    name: str
    path: str
    read: RowReader
    rows_in: int = 0
    bad_rows: dict[str, int] = dataclasses.field(default_factory=dict)
    exact_duplicates: int = 0
    near_duplicates: int = 0
    kept: list[int] = dataclasses.field(default_factory=list)  # raw-row ordinals (0-based) left after dedup
    draws: np.ndarray | None = None  # (len(kept),) int64 multiplicities
    bad_hint: str = ""  # kind_hint of the first bad row
    warning: str | None = None  # why the source gives no rows, when it gives none

    @property
    def rows_out(self) -> int:
        """Rows this source contributes to the mixture (repeats of upsampled rows included); 0 before the draw."""
        return int(self.draws.sum()) if self.draws is not None else 0

    def summary(self) -> dict[str, Any]:
        """The JSON-able counts of this source."""
        return {
            "name": self.name,
            "path": self.path,
            "rows_in": self.rows_in,
            "bad_rows": sum(self.bad_rows.values()),
            "bad_row_reasons": dict(sorted(self.bad_rows.items())),
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates": self.near_duplicates,
            "rows_after_dedup": len(self.kept),
            "rows_out": self.rows_out,
            "warning": self.warning,
        }


def _progress(desc: str, total: int | None = None):
    from tqdm import tqdm

    return tqdm(desc=desc, total=total, unit="row", disable=None, dynamic_ncols=True, mininterval=1.0)


def plan_mix(cfg: MixConfig, config_path: str, *, on_bad_row: str = "error") -> list[SourcePlan]:
    """Pass 1: validate, deduplicate and draw every source -> one SourcePlan per source, in config order.

    Raises InputError for a missing source, DataError (file, line, field) for a bad row under
    on_bad_row="error" (under "skip" it is counted by reason), ConfigError naming `config_path` and
    `sources[i].count` when a count exceeds the rows left after dedup."""
    from tulu_jax.curation.dedup import ExactDedup, NearDedup
    from tulu_jax.curation.normalize import normalize_text

    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    d = cfg.dedup
    exact = ExactDedup() if d.exact else None
    near = NearDedup(d.threshold, d.num_perm, d.shingle_size) if d.near else None
    readers = [open_source(s, f"{config_path}: sources[{i}]") for i, s in enumerate(cfg.sources)]
    plans = []
    for i, (src, name, read) in enumerate(zip(cfg.sources, source_names(cfg), readers)):
        plan = SourcePlan(name=name, path=src.path, read=read)
        pending: list[tuple[int, str]] = []  # (ordinal, normalised text) awaiting the near-duplicate check

        def flush(plan=plan, pending=pending):
            if near is None:
                plan.kept.extend(k for k, _ in pending)
            else:
                for (k, _), keep in zip(pending, near.filter([t for _, t in pending])):
                    if keep:
                        plan.kept.append(k)
                    else:
                        plan.near_duplicates += 1
            pending.clear()

        with _progress(f"dedup {name}") as bar:
            for k, (where, row) in enumerate(read()):
                plan.rows_in += 1
                bar.update()
                try:
                    if isinstance(row, DataError):
                        raise row
                    text = normalize_text(prompt_text(row, where, cfg.kind))
                except DataError as e:
                    if on_bad_row == "error":
                        raise
                    if not plan.bad_rows:
                        plan.bad_hint = kind_hint(row, cfg.kind)
                    plan.bad_rows[e.reason] = plan.bad_rows.get(e.reason, 0) + 1
                    continue
                if exact is not None and not exact.add(text):
                    plan.exact_duplicates += 1
                    continue
                pending.append((k, text))
                if len(pending) >= _BATCH:
                    flush()
            flush()
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, i]))
        try:
            plan.draws = draw_counts(len(plan.kept), src.count, src.ratio, rng)
        except ValueError:
            raise ConfigError(
                f"{config_path}: sources[{i}].count: {src.count} rows asked of {name!r}, but only "
                f"{len(plan.kept)} are left of its {plan.rows_in} after bad rows and duplicates "
                f"({sum(plan.bad_rows.values())} bad, {plan.exact_duplicates} exact, {plan.near_duplicates} near)"
            ) from None
        _check_yield(plan, cfg.kind, f"{config_path}: sources[{i}] {name!r}", src)
        plans.append(plan)
    return plans


def _check_yield(plan: SourcePlan, kind: str, key: str, src: SourceConfig) -> None:
    """A source with no rows out: an error when every row was bad (the wrong `kind`, as a rule), else a
    warning kept on the plan (an empty file, all rows duplicates of earlier ones, a ratio too small)."""
    bad = sum(plan.bad_rows.values())
    if plan.rows_in and bad == plan.rows_in:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(plan.bad_rows.items()))
        raise ConfigError(
            f"{key}: every one of its {plan.rows_in} rows was bad for kind {kind} ({reasons})"
            + (plan.bad_hint or "; check `kind` and the file's rows")
        )
    if plan.rows_out:
        return
    if not plan.rows_in:
        why = "it has no rows"
    elif not plan.kept:
        why = f"all {plan.rows_in - bad} of its good rows are duplicates of earlier rows"
    else:
        why = f"ratio {src.ratio} of its {len(plan.kept)} rows left after dedup rounds down to 0"
    plan.warning = f"{key}: 0 rows out: {why}"


def iter_mix(plans: list[SourcePlan]) -> Iterator[dict]:
    """Pass 2: the drawn rows of every source, in config order and file order, each with `source` added when
    absent. Raises DataError when a source no longer has the row pass 1 kept (it changed in between)."""
    for plan in plans:
        picks = [(k, int(m)) for k, m in zip(plan.kept, plan.draws) if m > 0]
        if not picks:
            continue
        j = 0
        with _progress(f"write {plan.name}", total=plan.rows_out) as bar:
            for k, (where, row) in enumerate(plan.read()):
                if k != picks[j][0]:
                    continue
                if not isinstance(row, dict):
                    raise DataError(f"{where}: changed while mixing (no longer a valid row)", "changed")
                # keep an existing tag; a null one (a Parquet column other rows fill) counts as absent
                out = row if row.get("source") is not None else {**row, "source": plan.name}
                for _ in range(picks[j][1]):
                    yield out
                bar.update(picks[j][1])
                j += 1
                if j == len(picks):
                    break
        if j != len(picks):
            raise DataError(f"{plan.path}: changed while mixing (fewer rows than when it was read)", "changed")


def summary_path(out: str) -> str:
    """Where the JSON summary of a mix written to `out` goes: `<out>.summary.json` (next to a folder output)."""
    return f"{out.rstrip('/')}.summary.json"


def mix_summary(cfg: MixConfig, config_path: str, out: str, plans: list[SourcePlan]) -> dict[str, Any]:
    """The JSON summary: config, output, per-source counts (and `warning`, None unless the source gave no
    rows), totals, and `warnings` (the sources' warnings, in order)."""
    sources = [p.summary() for p in plans]
    keys = ("rows_in", "bad_rows", "exact_duplicates", "near_duplicates", "rows_after_dedup", "rows_out")
    return {
        "config": config_path,
        "kind": cfg.kind,
        "seed": cfg.seed,
        "dedup": dataclasses.asdict(cfg.dedup),
        "out": out,
        "sources": sources,
        "totals": {k: sum(s[k] for s in sources) for k in keys},
        "warnings": [p.warning for p in plans if p.warning],
    }
