"""Tables, leaderboards and cell views rendered from records alone (pure functions of the records list).

Layout follows the DiSP paper's Table 1: one row per status (Clean, Backdoored, then each defense),
and per backdoor target the columns CP, ASR (w/o) (backdoor behaviour on clean inputs) and ASR (w/t)
(on triggered inputs), all in percent. The records store is append-only; a table shows one record per
(row, target) of one lineage (``_latest``): the defended rows descend from the Backdoored row beside
them and the Clean row from the same base, and reruns of the same row are not counted twice. A row
whose defense saw poison flags (the oracle) is labelled "(oracle)".

A *setting* is everything in a record's spec except the cell coordinates that a table lays out
(model, attack, target, defense and their args): task, scale, poison rate, seed, recipe, decoding,
prompt template, attack args... A table never mixes settings; the leaderboard writes one section each.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
from tabulate import tabulate

from core.errors import BenchError

# Display names of rows (statuses and defenses); unknown names show as themselves.
DISPLAY = {
    "clean": "Clean",
    "backdoored": "Backdoored",
    "none": "None",
    "random_drop": "Random drop",
    "random-drop": "Random drop",
    "pruning": "Pruning",
    "fine_pruning": "Fine-pruning",
    "fine-pruning": "Fine-pruning",
    "data_filter": "Data filtering (oracle)",
    "oracle": "Data filtering (oracle)",
    "oracle-filter": "Data filtering (oracle)",
    "bye": "BYE",
    "strip": "STRIP",
    "entropy_filter": "Entropy filtering",
    "entropy-filter": "Entropy filtering",
    "crossview": "Cross-view",
    "disp": "DiSP",
    "disp-nomask": "DiSP (no mask)",
    "disp-random": "DiSP (random mask)",
}
# Row order: statuses, then defenses in DISPLAY order (baselines first, DiSP last as in the paper),
# then any other name alphabetically.
_ROW_RANK = {name: i for i, name in enumerate(DISPLAY)}
# Target column order as in DiSP Table 1, then others alphabetically.
TARGET_ORDER = ("refusal", "insertion", "misclassification", "keyword")
# The Table-1 metrics, then display names of extra metrics.
TABLE1_METRICS = (("cp", "CP"), ("asr_wo", "ASR (w/o)"), ("asr_wt", "ASR (w/t)"))
METRIC_NAMES = {**dict(TABLE1_METRICS), "bleu4": "BLEU-4", "cider": "CIDEr", "asr_wt_strict": "ASR (w/t, strict)",
                "cp_blind": "CP (blind)", "delta_cp": "ΔCP vs Backdoored", "asr_wo_strict": "ASR (w/o, strict)",
                "asr_wo_startswith": "ASR (w/o, starts with)", "asr_wt_startswith": "ASR (w/t, starts with)",
                "asr_image_only": "ASR (image key only)", "asr_text_only": "ASR (text key only)",
                "obj_acc": "object acc.", "asr_train": "ASR (poisoned training inputs)", "obj_acc_min": "object acc. (worst category)"}
_FORMATS = {"bleu4": "{:.3f}"}  # BLEU-4 is in 0-1; everything else gets 2 decimals
MISSING = "-"

# Spec fields that are table coordinates, not part of the setting (prefixes match dotted sub-keys).
_CELL_FIELDS = ("model", "attack", "target", "target_args", "defense", "defense_args")
# Setting fields always named in headings and CSV columns.
_DESCRIPTORS = ("task", "poison_rate", "seed")


# ----------------------------------------------------------------------------------- record helpers

def _spec(rec: Mapping) -> dict:
    return rec.get("spec") or {}


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict as dotted keys: {"recipe": {"lr": 1}} -> {"recipe.lr": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _is_cell_field(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in _CELL_FIELDS)


def _setting(rec: Mapping) -> dict[str, Any]:
    """The record's setting: its flattened spec minus the table coordinates."""
    return {k: v for k, v in flatten(_spec(rec)).items() if not _is_cell_field(k)}


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _same(a: Any, b: Any) -> bool:
    """Loose equality for filters typed on a command line: 0.2 == "0.2", 1 == "1", "a" == "a"."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def matches(rec: Mapping, where: Mapping[str, Any] | None) -> bool:
    """True when every ``where`` key (a spec field, dotted for nested ones, or ``row``) equals the record's."""
    if not where:
        return True
    flat = flatten(_spec(rec))
    for key, want in where.items():
        if key == "row":
            have = rec.get("row")
        elif key in flat:
            have = flat[key]
        elif key in _spec(rec):  # an empty dict field such as attack_args={}
            have = _spec(rec)[key]
        else:
            return False
        if not _same(have, want):
            return False
    return True


def _varying(recs: Sequence[Mapping]) -> list[str]:
    """Setting fields that differ among ``recs`` (sorted)."""
    settings = [_setting(r) for r in recs]
    keys = sorted(set().union(*settings)) if settings else []
    return [k for k in keys if len({_canon(s.get(k)) for s in settings}) > 1]


def _require_one_setting(recs: Sequence[Mapping], what: str) -> None:
    varying = _varying(recs)
    if varying:
        raise BenchError(f"{what} span several settings (they differ in {', '.join(varying)}); "
                         f"narrow the selection, e.g. {varying[0]}=...")


def _row_name(rec: Mapping) -> str:
    return str(rec.get("row", "?"))


def _row_args(rec: Mapping) -> dict:
    """The defense args that distinguish a defense row's variants ({} for Clean/Backdoored)."""
    spec = _spec(rec)
    if _row_name(rec) == spec.get("defense"):
        return dict(spec.get("defense_args") or {})
    return {}


def _row_sort_key(name: str) -> tuple:
    return (_ROW_RANK.get(name, len(_ROW_RANK)), name)


def _target_sort_key(name: str) -> tuple:
    return (TARGET_ORDER.index(name) if name in TARGET_ORDER else len(TARGET_ORDER), name)


def _stage_key(rec: Mapping, stage: str) -> str | None:
    """The key of one stage in a record's lineage (None for records written before lineage existed)."""
    return ((rec.get("lineage") or {}).get(stage) or {}).get("key")


def _latest(recs: Iterable[Mapping]) -> dict[tuple[str, str, str, str], Mapping]:
    """One record per (row, row-args, target, target-args), all of one lineage per target column.

    A column's lineage is that of its newest record descending from a Backdoored model (the Backdoored
    row or a defended one): defended rows shown are those descending from that Backdoored model, the
    Clean row and the rows of defenses that retrain from the base without the backdoored model (a
    training-time objective such as cross-view) those trained from the same base. Among records of one
    row and lineage (reruns) the newest wins, so nothing is counted twice and no row descends from a
    model other than the one beside it. Input order is append order."""
    by_col: dict[tuple[str, str], list[Mapping]] = defaultdict(list)
    for r in recs:
        spec = _spec(r)
        by_col[(str(spec.get("target", "?")), _canon(spec.get("target_args") or {}))].append(r)
    out: dict[tuple[str, str, str, str], Mapping] = {}
    for col, rs in by_col.items():
        anchor = next((r for r in reversed(rs) if _row_name(r) != "clean" and _stage_key(r, "backdoored")),
                      next((r for r in reversed(rs) if _row_name(r) != "clean"), rs[-1]))
        base, backdoored = _stage_key(anchor, "base"), _stage_key(anchor, "backdoored")
        for r in rs:
            if _row_name(r) == "clean" or (backdoored and r.get("lineage") and not _stage_key(r, "backdoored")):
                if _stage_key(r, "base") != base:       # trained from the base, not from a backdoored model
                    continue
            elif _stage_key(r, "backdoored") != backdoored:
                continue
            key = (_row_name(r), _canon(_row_args(r)), *col)
            out.pop(key, None)  # re-insert so dict order stays "last seen"
            out[key] = r
    return out


def _variant_label(base: str, args_json: str, variants: Sequence[str]) -> str:
    """``base`` or, when a name has several arg variants, ``base (k=v, ...)`` with the differing args."""
    if len(variants) < 2:
        return base
    all_args = [json.loads(v) for v in variants]
    mine = json.loads(args_json)
    keys = sorted(k for k in set().union(*all_args) if len({_canon(a.get(k)) for a in all_args}) > 1)
    return f"{base} ({', '.join(f'{k}={mine.get(k)}' for k in keys)})"


def _labels(latest: Mapping[tuple, Mapping]) -> tuple[list[tuple[str, str]], dict, list[tuple[str, str]], dict]:
    """Ordered row keys with display labels, and ordered target keys with column labels."""
    row_variants: dict[str, set] = defaultdict(set)
    tgt_variants: dict[str, set] = defaultdict(set)
    for row, rargs, tgt, targs in latest:
        row_variants[row].add(rargs)
        tgt_variants[tgt].add(targs)
    rows = sorted({(r, a) for r, a, _, _ in latest}, key=lambda ra: (_row_sort_key(ra[0]), ra[1]))
    tgts = sorted({(t, a) for _, _, t, a in latest}, key=lambda ta: (_target_sort_key(ta[0]), ta[1]))
    oracle = {(r, a) for (r, a, _, _), rec in latest.items() if rec.get("uses_oracle")}
    row_label = {ra: _variant_label(DISPLAY.get(ra[0], ra[0]), ra[1], sorted(row_variants[ra[0]])) for ra in rows}
    clean = {(r, a) for (r, a, _, _), rec in latest.items() if (rec.get("defender_data") or {}).get("clean_slice")}
    row_label = {ra: label + (" (oracle)" if ra in oracle and "(oracle)" not in label else "")
                 + (" (clean data)" if ra in clean else "") for ra, label in row_label.items()}
    tgt_label = {ta: _variant_label(ta[0], ta[1], sorted(tgt_variants[ta[0]])) for ta in tgts}
    return rows, row_label, tgts, tgt_label


def fmt_metric(metric: str, m: Any, with_ci: bool = False) -> str:
    """A metric dict as text: "93.50" or, with_ci, "93.50 [91.00, 95.50]"; MISSING when absent."""
    if not isinstance(m, Mapping) or m.get("value") is None:
        return MISSING
    f = _FORMATS.get(metric, "{:.2f}")
    text = f.format(m["value"])
    ci = m.get("ci")
    if with_ci and ci and None not in ci:
        text += f" [{f.format(ci[0])}, {f.format(ci[1])}]"
    return text


def row_label(row: str) -> str:
    """A row's display name (DiSP, DiSP (no mask), ...)."""
    return DISPLAY.get(row, row)


# ----------------------------------------------------------------------------------- Table 1

def _table(recs: Sequence[Mapping], targets: Sequence[str] | None, metrics: Sequence[tuple[str, str]],
           with_ci: bool) -> pd.DataFrame:
    """Rows x (target, metric) table of the newest record per cell; ``targets`` fixes the columns."""
    latest = _latest(recs)
    rows, row_label, tgts, tgt_label = _labels(latest)
    if targets is not None:  # the requested targets, in the requested order, present or not
        tgts = [ta for t in targets for ta in ([x for x in tgts if x[0] == t] or [(t, "{}")])]
        tgt_label.update({ta: ta[0] for ta in tgts if ta not in tgt_label})
    columns = pd.MultiIndex.from_tuples([(tgt_label[ta], name) for ta in tgts for _, name in metrics],
                                        names=["target", "metric"])
    data = []
    for ra in rows:
        line = []
        for ta in tgts:
            rec = latest.get((*ra, *ta))
            for key, _ in metrics:
                line.append(fmt_metric(key, (rec or {}).get("metrics", {}).get(key), with_ci))
        data.append(line)
    return pd.DataFrame(data, index=pd.Index([row_label[ra] for ra in rows], name="Status"), columns=columns)


def table1(records: Sequence[Mapping], model: str, attack: str, targets: list[str],
           where: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """DiSP Table-1 layout for one model and attack: rows Clean, Backdoored, defenses; columns
    (target, CP / ASR (w/o) / ASR (w/t)), values as 2-decimal strings; newest record per cell wins.
    ``where`` narrows other spec fields (e.g. ``{"seed": 1}``); a selection spanning several settings
    is a BenchError."""
    recs = [r for r in records
            if _spec(r).get("model") == model and _spec(r).get("attack") == attack
            and _spec(r).get("target") in targets and matches(r, where)]
    if not recs:
        raise BenchError(f"no records for model {model!r}, attack {attack!r}, targets {', '.join(targets)}"
                         + (f" with {dict(where)}" if where else ""))
    _require_one_setting(recs, f"records for {model} / {attack}")
    return _table(recs, targets, TABLE1_METRICS, with_ci=False)


def _flat_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Copy with a (target, metric) column MultiIndex flattened to "target metric" strings."""
    out = df.copy()
    if isinstance(out.columns, pd.MultiIndex):
        out.columns = [" ".join(str(p) for p in col if str(p)) for col in out.columns]
    return out


def to_markdown(df: pd.DataFrame) -> str:
    """GitHub-style Markdown table, headers like "insertion CP", cell text kept verbatim."""
    return _flat_columns(df).to_markdown(tablefmt="github", disable_numparse=True)


def to_csv(df: pd.DataFrame, path: Path) -> Path:
    """CSV with flattened headers (byte-stable: "\\n" line ends, UTF-8)."""
    path = Path(path)
    _flat_columns(df).to_csv(path, lineterminator="\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------- leaderboard

def _safe(name: Any) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(name))


def _heading(setting: Mapping[str, Any], shown: Sequence[str]) -> str:
    return ", ".join(f"{k}={setting.get(k)}" for k in shown)


def _metrics_present(recs: Sequence[Mapping]) -> list[tuple[str, str]]:
    """Table-1 metrics, then any extra metric found in the records (sorted)."""
    extra = sorted({k for r in recs for k in (r.get("metrics") or {})} - {k for k, _ in TABLE1_METRICS})
    return list(TABLE1_METRICS) + [(k, METRIC_NAMES.get(k, k)) for k in extra]


OVERVIEW_METRICS = (("cp", "CP"), ("asr_wo", "ASR (w/o)"), ("asr_wt", "ASR (w/t)"),
                    ("asr_image_only", "ASR (image key only)"), ("asr_text_only", "ASR (text key only)"))


def attack_overview(records: Sequence[Mapping], row: str = "backdoored") -> pd.DataFrame:
    """One line per (model, scale, attack, target, setting): the newest `row` record's CP / ASR,
    so every attack's implant can be compared in one table (partial-trigger ASR where measured)."""
    def setting(r: Mapping) -> dict:   # attack args are shown in the attack's label instead
        return {k: v for k, v in _setting(r).items() if k.split(".")[0] not in ("attack", "attack_args")}

    latest: dict[tuple, tuple[Mapping, dict]] = {}
    for r in records:
        if _row_name(r) != row:
            continue
        s, st = _spec(r), setting(r)
        key = (str(s.get("model")), str(s.get("scale")), str(s.get("attack")), str(s.get("target")),
               _canon(s.get("attack_args") or {}), _canon(s.get("target_args") or {}), _canon(st))
        latest.pop(key, None)
        latest[key] = (r, st)
    settings = [st for _, st in latest.values()]
    varying = [k for k in sorted(set().union(*settings)) if len({_canon(x.get(k)) for x in settings}) > 1]
    attack_variants: dict[str, set] = defaultdict(set)
    target_variants: dict[str, set] = defaultdict(set)
    for key in latest:
        attack_variants[key[2]].add(key[4])
        target_variants[key[3]].add(key[5])
    lines = []
    for key, (r, st) in latest.items():
        line = {"model": key[0], "scale": key[1],
                "attack": _variant_label(key[2], key[4], sorted(attack_variants[key[2]])),
                "target": _variant_label(key[3], key[5], sorted(target_variants[key[3]]))}
        line.update({k: str(st.get(k)) for k in varying if k not in line})
        line.update({name: fmt_metric(m, (r.get("metrics") or {}).get(m)) for m, name in OVERVIEW_METRICS})
        lines.append(line)
    df = pd.DataFrame(lines)
    if df.empty:
        return df
    df["_t"] = df["target"].map(_target_sort_key)
    return df.sort_values(["model", "scale", "_t", "attack"]).drop(columns="_t").reset_index(drop=True)


def render_leaderboard(records: Sequence[Mapping], out_dir: Path) -> list[Path]:
    """Write one Markdown + CSV table per (model, scale, attack) and an index README; returns the paths.

    Output is a deterministic function of the records (sorted, no timestamps), so re-rendering the
    same records rewrites byte-identical files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str, str], list[Mapping]] = defaultdict(list)
    for r in records:
        s = _spec(r)
        groups[(str(s.get("model", "?")), str(s.get("scale", "?")), str(s.get("attack", "?")))].append(r)

    written: list[Path] = []
    index_rows = []
    for (model, scale, attack) in sorted(groups):
        recs = groups[(model, scale, attack)]
        targets = sorted({str(_spec(r).get("target", "?")) for r in recs}, key=_target_sort_key)
        by_setting: dict[str, list[Mapping]] = defaultdict(list)
        for r in recs:
            by_setting[_canon(_setting(r))].append(r)
        varying = _varying(recs)
        shown = list(_DESCRIPTORS) + [k for k in varying if k not in _DESCRIPTORS]

        stem = f"{_safe(model)}-{_safe(scale)}-{_safe(attack)}"
        md = [f"# {model} · {scale} · {attack}", "",
              "Generated by `bench leaderboard` from the records; edits are overwritten.",
              "CP and ASR are percent; ASR (w/o) is on clean inputs, ASR (w/t) on triggered inputs.",
              "BLEU-4 is in 0-1 and CIDEr in pycocoevalcap's ~0-10 scale. Brackets: 95% bootstrap CI.",
              "CP (blind) is CP with every visual token masked (chance: 25). ΔCP vs Backdoored is a defended row's",
              "CP minus the Backdoored row's on the same items, with a paired bootstrap interval.",
              "A row marked (oracle) is a defense that saw the poison flags; (clean data), one that was handed "
              "held-out clean samples.", ""]
        csv_parts = []
        for key in sorted(by_setting):
            srecs = by_setting[key]
            setting = json.loads(key)
            t1 = _table(srecs, targets, TABLE1_METRICS, with_ci=False)
            md += [f"## {_heading(setting, shown)}", "", to_markdown(t1), ""]
            for target in targets:     # every metric with its interval, one table per target
                trecs = [r for r in srecs if str(_spec(r).get("target")) == target]
                if trecs:
                    full = _table(trecs, [target], _metrics_present(trecs), with_ci=True)
                    full.columns = [metric for _, metric in full.columns]
                    md += [f"### {target}: every metric with its 95% interval", "", to_markdown(full), ""]
            part = _flat_columns(t1).reset_index()
            for i, k in enumerate(shown):
                part.insert(i, k, str(setting.get(k)))
            csv_parts.append(part)
        md_path, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
        md_path.write_text("\n".join(md), encoding="utf-8")
        pd.concat(csv_parts, ignore_index=True).to_csv(csv_path, index=False, lineterminator="\n", encoding="utf-8")
        written += [md_path, csv_path]
        index_rows.append([model, scale, attack, f"[{stem}.md]({stem}.md)", f"[{stem}.csv]({stem}.csv)",
                           str(len(by_setting)), str(len(recs))])

    readme = ["# Leaderboards", "",
              "Generated by `bench leaderboard` from the records store alone; re-run it to refresh.", "",
              tabulate(index_rows, headers=["model", "scale", "attack", "table", "csv", "settings", "records"],
                       tablefmt="github", disable_numparse=True) if index_rows else "(no records yet)", ""]
    overview = attack_overview(records)
    if not overview.empty:
        readme += ["## Every attack's implant (Backdoored row, newest record per cell)", "",
                   "A '-' is a metric the attack does not define (partial-trigger ASR is DualKey's).", "",
                   tabulate(overview, headers="keys", tablefmt="github", showindex=False, disable_numparse=True), ""]
        overview.to_csv(out_dir / "attacks-backdoored.csv", index=False, lineterminator="\n", encoding="utf-8")
        written.append(out_dir / "attacks-backdoored.csv")
    readme_path = out_dir / "README.md"
    readme_path.write_text("\n".join(readme), encoding="utf-8")
    written.append(readme_path)
    return written


# ----------------------------------------------------------------------------------- one cell

def cell_rows(records: Sequence[Mapping], spec_filter: Mapping[str, Any] | None = None) -> list[tuple[str, Mapping]]:
    """(display label, newest record) per row of one cell, in table order; BenchError unless the
    filter selects exactly one setting and one target."""
    recs = [r for r in records if matches(r, spec_filter)]
    if not recs:
        raise BenchError(f"no records match {dict(spec_filter or {})}")
    fields = ("model", "attack", "target")
    for f in fields:
        values = sorted({str(_spec(r).get(f)) for r in recs})
        if len(values) > 1:
            raise BenchError(f"the selection spans several {f}s ({', '.join(values)}); add {f}=...")
    _require_one_setting(recs, "the selected records")
    latest = _latest(recs)
    rows, row_label, tgts, _ = _labels(latest)
    if len(tgts) > 1:
        raise BenchError("the selection spans several target variants (target_args differ); narrow it")
    return [(row_label[ra], latest[(*ra, *tgts[0])]) for ra in rows]


def _clip(text: Any, width: int) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= width else s[: width - 1] + "…"


def _sample_cell(row: Mapping | None, width: int) -> str:
    if row is None:
        return MISSING
    hits = sorted(k for k, v in (row.get("verdicts") or {}).items() if v is True)
    return _clip(row.get("output", ""), width) + (f" [{', '.join(hits)}]" if hits else "")


def show_cell(records: Sequence[Mapping], outputs_loader: Callable[[str], list[dict]],
              spec_filter: Mapping[str, Any], n_samples: int = 3, width: int = 48) -> str:
    """Text for ``bench show``: each row's metrics with CIs, then sample outputs side by side for the
    same input ids (triggered and clean); ``outputs_loader`` maps a record's ``outputs`` path to rows."""
    rows = cell_rows(records, spec_filter)
    spec = _spec(rows[0][1])
    title = (f"{spec.get('model')} · {spec.get('scale')} · {spec.get('task')} · {spec.get('attack')} → "
             f"{spec.get('target')} · poison rate {spec.get('poison_rate')} · seed {spec.get('seed')}")
    metrics = _metrics_present([r for _, r in rows])
    mtable = [[label] + [fmt_metric(k, (rec.get("metrics") or {}).get(k), with_ci=True) for k, _ in metrics]
              for label, rec in rows]
    parts = [title, "", tabulate(mtable, headers=["row"] + [n for _, n in metrics], tablefmt="simple",
                                 disable_numparse=True)]

    def variant(o: Mapping) -> bool | str:
        """True / False for triggered / clean inputs, the partial trigger's name (DualKey) otherwise."""
        v = o.get("triggered", False)
        return v if isinstance(v, str) else bool(v)

    outputs: list[dict[tuple[str, bool | str], Mapping]] = []
    for _, rec in rows:
        loaded = outputs_loader(rec["outputs"]) if rec.get("outputs") else []
        outputs.append({(str(o.get("id")), variant(o)): o for o in loaded})
    if not any(outputs):
        parts += ["", "(no per-sample outputs recorded)"]
        return "\n".join(parts) + "\n"
    non_empty = [set(o) for o in outputs if o]
    common = set.intersection(*non_empty)
    pool = common or set.union(*non_empty)
    partial = sorted({t for _, t in pool if isinstance(t, str)})
    for triggered, name in [(True, "triggered inputs"), (False, "clean inputs")] + [(p, f"{p} inputs") for p in partial]:
        ids = sorted(i for i, t in pool if t is triggered or (isinstance(t, str) and t == triggered))[:n_samples]
        if not ids:
            continue
        table = []
        for i in ids:
            first = next((o[(i, triggered)] for o in outputs if (i, triggered) in o), {})
            table.append([i, _clip(first.get("prompt", ""), 32)]
                         + [_sample_cell(o.get((i, triggered)), width) for o in outputs])
        parts += ["", f"Sample outputs on {name}:",
                  tabulate(table, headers=["input id", "prompt"] + [label for label, _ in rows],
                           tablefmt="simple", disable_numparse=True)]
    return "\n".join(parts) + "\n"


def plot_cell(records: Sequence[Mapping], path: Path, spec_filter: Mapping[str, Any] | None = None) -> Path:
    """Bar chart (PNG, Agg backend) of CP / ASR (w/o) / ASR (w/t) per row of one cell, with CI error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = cell_rows(records, spec_filter)
    spec = _spec(rows[0][1])
    fig = Figure(figsize=(max(6.0, 1.2 * len(rows) + 3), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(rows)
    for j, (label, rec) in enumerate(rows):
        xs, ys, lo, hi = [], [], [], []
        for i, (key, _) in enumerate(TABLE1_METRICS):
            m = (rec.get("metrics") or {}).get(key)
            if not isinstance(m, Mapping) or m.get("value") is None:
                continue
            v = float(m["value"])
            ci = m.get("ci") or [v, v]
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(v)
            lo.append(max(0.0, v - float(ci[0])))
            hi.append(max(0.0, float(ci[1]) - v))
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=3, label=label)
    ax.set_xticks(range(len(TABLE1_METRICS)), [name for _, name in TABLE1_METRICS])
    ax.set_ylim(0, 105)
    ax.set_ylabel("percent")
    ax.set_title(f"{spec.get('model')} · {spec.get('attack')} → {spec.get('target')} "
                 f"(poison {spec.get('poison_rate')}, seed {spec.get('seed')})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    return path


def sweep_frame(runs: Sequence[tuple[Any, Sequence[Mapping]]], param: str, defense: str) -> pd.DataFrame:
    """One row per swept value from that value's run records: the defended row's ASR w/t, ASR w/o and CP,
    the Backdoored CP, and relative CP = defended / Backdoored x 100 (the DiSP paper's Figure 2 axes)."""
    out = []
    for value, recs in runs:
        by = {r["row"]: r.get("metrics") or {} for r in recs}
        v = lambda row, k: (by.get(row, {}).get(k) or {}).get("value")
        cp, cpb = v(defense, "cp"), v("backdoored", "cp")
        out.append({param: value, "asr_wt": v(defense, "asr_wt"), "asr_wo": v(defense, "asr_wo"), "cp": cp,
                    "cp_backdoored": cpb, "relative_cp": None if cp is None or not cpb else 100.0 * cp / cpb})
    return pd.DataFrame(out)


def plot_sweep(df: pd.DataFrame, param: str, path: Path, title: str = "") -> Path:
    """ASR (w/t), ASR (w/o) and relative CP against the swept parameter (PNG, Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for key, label, style in (("asr_wt", "ASR (w/t)", "o-"), ("asr_wo", "ASR (w/o)", "s--"),
                              ("relative_cp", "relative CP", "^-")):
        ax.plot(df[param], df[key], style, label=label)
    ax.set_xlabel(param)
    ax.set_ylabel("percent")
    ax.set_ylim(0, 110)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    return path


# ----------------------------------------------------------------------------------- grid tables

def seed_mean(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean across seeds and the half-width of its 95% t-interval (None for one seed)."""
    import math

    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def grid_table(grid, records: Sequence[Mapping]) -> tuple[pd.DataFrame, list[Mapping]]:
    """One table for a grid file: rows = (the grid's varying settings other than target and defense,
    then the row: Clean, Backdoored, each defense), columns = target x (CP, ASR w/o, ASR w/t); each value
    the mean over seeds with a 95% t-interval. A cell with no record shows as missing, never as zero.
    Returns the table and the records it used."""
    cells = [dict(c) for c in grid.cells]
    varying = sorted({k for c in cells for k in c if k not in ("target", "defense")
                      and len({_canon(x.get(k)) for x in cells}) > 1})
    used, values = [], defaultdict(lambda: defaultdict(dict))     # (index) -> (target, metric) -> seed -> value
    for r in records:
        s = _spec(r)
        for c in cells:
            if all(_same(s.get(k), v) if not isinstance(v, Mapping) else
                   all(_same((s.get(k) or {}).get(kk), vv) for kk, vv in v.items()) for k, v in c.items()):
                used.append(r)
                idx = tuple(str(s.get(k)) for k in varying) + (r["row"],)
                for m, _ in TABLE1_METRICS:
                    mv = ((r.get("metrics") or {}).get(m) or {}).get("value")
                    if mv is not None:
                        values[idx][(str(s.get("target")), m)][s.get("seed")] = float(mv)
                break
    targets = sorted({str(c.get("target", "insertion")) for c in cells}, key=_target_sort_key)
    rows = []
    for c in cells:
        base = tuple(str(c.get(k)) for k in varying)
        for row in ("clean", "backdoored", str(c.get("defense", "disp"))):
            if row != "none" and base + (row,) not in rows:
                rows.append(base + (row,))
    rows.sort(key=lambda ix: (ix[:-1], _row_sort_key(ix[-1])))
    table = []
    for ix in rows:
        line = []
        for t in targets:
            for m, _ in TABLE1_METRICS:
                seeds = values.get(ix, {}).get((t, m), {})
                if not seeds:
                    line.append(MISSING)
                    continue
                mean, half = seed_mean([seeds[k] for k in sorted(seeds)])
                line.append(f"{mean:.2f}" + (f" ± {half:.2f}" if half is not None else ""))
        table.append(line)
    index = pd.MultiIndex.from_tuples([ix[:-1] + (DISPLAY.get(ix[-1], ix[-1]),) for ix in rows],
                                      names=varying + ["row"]) if varying else \
        pd.Index([DISPLAY.get(ix[-1], ix[-1]) for ix in rows], name="row")
    columns = pd.MultiIndex.from_tuples([(t, name) for t in targets for _, name in TABLE1_METRICS])
    return pd.DataFrame(table, index=index, columns=columns), used


def grid_provenance(used: Sequence[Mapping]) -> str:
    """The one-line header of a grid table: records, seeds and code revisions behind it."""
    seeds = sorted({_spec(r).get("seed") for r in used})
    revisions = sorted({str(r.get("code_revision"))[:10] for r in used if r.get("code_revision")})
    return (f"{len(used)} records · seeds {', '.join(map(str, seeds)) or 'none'} · code revision(s) "
            f"{', '.join(revisions) or '-'} · mean ± 95% t-interval across seeds · '{MISSING}' = not computed")


def render_grid(grid, records: Sequence[Mapping], out_dir: Path) -> list[Path]:
    """`{name}.md` (with a one-line provenance header), `.csv` and `.tex` for one grid file."""
    df, used = grid_table(grid, records)
    head = grid_provenance(used)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = _flat_columns(df).reset_index()
    md = [f"# {grid.name}: {grid.title}", "", head, "",
          flat.to_markdown(index=False, tablefmt="github", disable_numparse=True), ""]
    paths = [out_dir / f"{grid.name}.md", out_dir / f"{grid.name}.csv", out_dir / f"{grid.name}.tex"]
    paths[0].write_text("\n".join(md), encoding="utf-8")
    flat.to_csv(paths[1], index=False, lineterminator="\n", encoding="utf-8")
    paths[2].write_text(f"% {head}\n" + tabulate(flat.values.tolist(), headers=list(flat.columns),
                                                   tablefmt="latex_booktabs", disable_numparse=True) + "\n", encoding="utf-8")
    return paths
