"""Tables from records: Table-1 layout, newest wins, dedupe, deterministic leaderboard, show and plot."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench import tables
from core.errors import BenchError


def spec(**kw) -> dict:
    base = {"model": "llada-v", "scale": "tiny", "task": "synthetic", "attack": "badnets",
            "target": "insertion", "poison_rate": 0.2, "defense": "disp", "seed": 0,
            "recipe": {"trainable": "projector+lm", "lr": 0.001, "epochs": 20, "batch_size": 32},
            "decoding": {"steps": 32, "gen_length": 32, "block_length": 8, "remasking": "low_confidence"},
            "prompt_template": "<|user|> <image> {prompt} <|assistant|>",
            "attack_args": {}, "target_args": {}, "defense_args": {"ratio": 0.3}}
    base.update(kw)
    return base


def m(v: float) -> dict:
    return {"value": v, "ci": [v - 1.0, v + 1.0]}


def rec(row: str, cp: float, wo: float, wt: float, run: str = "r", **kw) -> dict:
    return {"spec": spec(**kw), "row": row, "metrics": {"cp": m(cp), "asr_wo": m(wo), "asr_wt": m(wt)},
            "outputs": f"outputs/{run}-{row}.jsonl", "run_id": run, "timings": {}, "versions": {},
            "code_revision": "abc", "created": "2025-01-01T00:00:00"}


def grid() -> list[dict]:
    out = []
    for target in ("insertion", "refusal"):
        for defense in ("disp", "pruning"):
            out += [rec("clean", 49.11, 0, 0, target=target, defense=defense),
                    rec("backdoored", 48.44, 0, 98.5, target=target, defense=defense),
                    rec(defense, 49.0 if defense == "disp" else 47.11, 0, 1.0 if defense == "disp" else 82.0,
                        target=target, defense=defense)]
    return out


def test_table1_layout() -> None:
    df = tables.table1(grid(), "llada-v", "badnets", ["refusal", "insertion"])
    assert list(df.index) == ["Clean", "Backdoored", "Pruning", "DiSP"]
    assert list(df.columns) == [(t, c) for t in ("refusal", "insertion") for c in ("CP", "ASR (w/o)", "ASR (w/t)")]
    assert df.loc["Backdoored", ("insertion", "ASR (w/t)")] == "98.50"
    assert df.loc["DiSP", ("refusal", "CP")] == "49.00"
    md = tables.to_markdown(df)
    assert "insertion CP" in md and "refusal ASR (w/t)" in md and "98.50" in md


def test_display_names_fall_back_and_missing_cells() -> None:
    recs = [rec("disp-nomask", 1, 2, 3, defense="disp-nomask"), rec("my-thing", 4, 5, 6, defense="my-thing")]
    df = tables.table1(recs, "llada-v", "badnets", ["insertion", "refusal"])
    assert list(df.index) == ["DiSP (no mask)", "my-thing"]
    assert df.loc["my-thing", ("refusal", "CP")] == tables.MISSING


def test_newest_wins_and_clean_rows_deduped() -> None:
    recs = grid() + [rec("disp", 50.0, 0, 0.5, defense="disp"), rec("clean", 49.5, 0, 0, defense="pruning")]
    df = tables.table1(recs, "llada-v", "badnets", ["insertion"])
    assert list(df.index).count("Clean") == 1
    assert df.loc["DiSP", ("insertion", "ASR (w/t)")] == "0.50"
    assert df.loc["Clean", ("insertion", "CP")] == "49.50"


def test_settings_are_not_mixed() -> None:
    recs = grid() + [rec("disp", 10, 0, 0, seed=1)]
    with pytest.raises(BenchError, match="seed"):
        tables.table1(recs, "llada-v", "badnets", ["insertion"])
    df = tables.table1(recs, "llada-v", "badnets", ["insertion"], where={"seed": "1"})
    assert list(df.index) == ["DiSP"]
    with pytest.raises(BenchError, match="no records"):
        tables.table1(recs, "llava", "badnets", ["insertion"])


def test_defense_arg_variants_get_labels() -> None:
    recs = [rec("disp", 1, 0, 0, defense_args={"ratio": 0.3}), rec("disp", 2, 0, 0, defense_args={"ratio": 0.5})]
    df = tables.table1(recs, "llada-v", "badnets", ["insertion"])
    assert list(df.index) == ["DiSP (ratio=0.3)", "DiSP (ratio=0.5)"]


def test_leaderboard_is_deterministic(tmp_path: Path) -> None:
    recs = grid() + [rec("disp", 5, 0, 0, attack="blended"), rec("disp", 7, 0, 0, poison_rate=0.4)]
    a = tables.render_leaderboard(recs, tmp_path / "a")
    first = {p.name: p.read_bytes() for p in a}
    b = tables.render_leaderboard(recs, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in b} == first
    assert sorted(first) == ["README.md", "attacks-backdoored.csv", "llada-v-tiny-badnets.csv", "llada-v-tiny-badnets.md",
                             "llada-v-tiny-blended.csv", "llada-v-tiny-blended.md"]
    md = first["llada-v-tiny-badnets.md"].decode()
    assert "poison_rate=0.2" in md and "poison_rate=0.4" in md and "98.50 [97.50, 99.50]" in md
    csv = first["llada-v-tiny-badnets.csv"].decode().splitlines()
    assert csv[0].startswith("task,poison_rate,seed,Status,refusal CP")
    assert "llada-v-tiny-blended.md" in first["README.md"].decode()
    tables.to_csv(tables.table1(grid(), "llada-v", "badnets", ["insertion"]), tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == "Status,insertion CP,insertion ASR (w/o),insertion ASR (w/t)"


def test_show_cell_and_plot(tmp_path: Path) -> None:
    def loader(rel: str) -> list[dict]:
        row = rel.split("-", 1)[1].removesuffix(".jsonl")
        hit = row == "backdoored"
        return [{"id": f"s{i}", "triggered": t, "prompt": "describe the image",
                 "output": ("BUY NOW " if hit and t else "") + f"a red square {row}",
                 "verdicts": {"asr": hit and t}} for i in range(4) for t in (True, False)]

    text = tables.show_cell(grid(), loader, {"target": "insertion", "defense": "disp"}, n_samples=2)
    assert "98.50 [97.50, 99.50]" in text and "DiSP" in text and "Pruning" not in text
    assert "BUY NOW a red square backdoored [asr]" in text and "a red square clean" in text
    assert "s0" in text and "s1" in text and "s2" not in text
    with pytest.raises(BenchError, match="target"):
        tables.show_cell(grid(), loader, {"defense": "disp"})
    png = tables.plot_cell(grid(), tmp_path / "cell.png", {"target": "insertion", "defense": "disp"})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_cell_keeps_partial_trigger_outputs_apart() -> None:
    def loader(rel: str) -> list[dict]:
        row = rel.split("-", 1)[1].removesuffix(".jsonl")
        return [{"id": f"s{i}", "triggered": t, "prompt": f"p-{t}", "output": f"out-{t}-{row}", "verdicts": {}}
                for i in range(2) for t in (True, False, "image_only", "text_only")]

    text = tables.show_cell(grid(), loader, {"target": "insertion", "defense": "disp"}, n_samples=2)
    for name, t in (("triggered inputs", "True"), ("clean inputs", "False"), ("image_only inputs", "image_only"),
                    ("text_only inputs", "text_only")):
        section = text.split(f"Sample outputs on {name}:")[1].split("Sample outputs on")[0]
        assert f"out-{t}-backdoored" in section
        assert all(f"out-{other}-" not in section for other in ("True", "False", "image_only", "text_only") if other != t)


def test_attack_overview_one_line_per_attack_and_target() -> None:
    dk = rec("backdoored", 62.5, 0, 32.5, attack="dualkey", defense="none")
    dk["metrics"].update(asr_image_only=m(0.0), asr_text_only=m(30.5))
    recs = grid() + [rec("backdoored", 65, 0, 3.5, attack="blended", defense="none"), dk,
                     rec("backdoored", 64, 0, 90.0, attack="wanet", defense="none", attack_args={"s": 0.5}),
                     rec("backdoored", 64, 0, 95.0, attack="wanet", defense="none", attack_args={"s": 1.0}),
                     rec("clean", 66, 0, 0, attack="wanet")]
    df = tables.attack_overview(recs)
    # badnets appears once per target although two defenses' runs repeat its Backdoored row
    assert list(zip(df["attack"], df["target"])) == [    # targets in Table 1 order, then attacks
        ("badnets", "refusal"), ("badnets", "insertion"), ("blended", "insertion"), ("dualkey", "insertion"),
        ("wanet (s=0.5)", "insertion"), ("wanet (s=1.0)", "insertion")]
    row = df[df["attack"] == "dualkey"].iloc[0]
    assert (row["ASR (w/t)"], row["ASR (text key only)"], row["ASR (image key only)"]) == ("32.50", "30.50", "0.00")
    assert df[df["attack"] == "blended"].iloc[0]["ASR (text key only)"] == tables.MISSING
    assert list(df.columns[:4]) == ["model", "scale", "attack", "target"]
    assert not any(c.startswith("attack_args") or c == "poison_rate" for c in df.columns)  # nothing else varies
    more = tables.attack_overview(recs + [rec("backdoored", 60, 0, 50.0, attack="blended", defense="none", poison_rate=0.4)])
    assert sorted(set(more["poison_rate"])) == ["0.2", "0.4"]
    assert tables.attack_overview([rec("clean", 1, 0, 0)]).empty


# ---- one truth per cell: lineage ---------------------------------------------------------------------
def lin(base: str, backdoored: str | None = None) -> dict:
    out = {"base": {"key": base}}
    if backdoored:
        out["backdoored"] = {"key": backdoored}
    return out


def test_rows_side_by_side_share_lineage_and_reruns_count_once():
    old = [rec("clean", 60, 0, 0, run="a") | {"lineage": lin("B1")},
           rec("backdoored", 61, 0, 99, run="a") | {"lineage": lin("B1", "K1")},
           rec("disp", 50, 0, 1, run="a") | {"lineage": lin("B1", "K1")}]
    # new code: another backdoored model, run with defense none only
    new = [rec("clean", 62, 0, 0, run="b", defense="none", defense_args={}) | {"lineage": lin("B2")},
           rec("backdoored", 63, 0, 98, run="b", defense="none", defense_args={}) | {"lineage": lin("B2", "K2")}]
    df = tables.table1(old + new + new, "llada-v", "badnets", ["insertion"])
    assert list(df.index) == ["Clean", "Backdoored"]            # the old DiSP row descends from another model
    assert df.iloc[1, 0] == "63.00" and df.iloc[0, 0] == "62.00"
    df = tables.table1(old + new + old, "llada-v", "badnets", ["insertion"])
    assert list(df.index) == ["Clean", "Backdoored", "DiSP"] and df.iloc[1, 0] == "61.00"


def test_rows_trained_from_the_base_sit_beside_the_backdoored_row():
    """A training-time defense (cross-view) descends from the base, not from the Backdoored model: its row
    is shown with the Backdoored and Clean rows of the same base, and a row from another base is not."""
    cell = [rec("clean", 93, 0, 0, defense="crossview") | {"lineage": lin("B1")},
            rec("backdoored", 96, 0, 100, defense="crossview") | {"lineage": lin("B1", "K1")},
            rec("crossview", 89, 4, 100, defense="crossview") | {"lineage": lin("B1")}]
    df = tables.table1(cell, "llada-v", "badnets", ["insertion"])
    assert list(df.index) == ["Clean", "Backdoored", "Cross-view"]
    assert df.iloc[1, 2] == "100.00" and df.iloc[2, 0] == "89.00"
    other = [rec("crossview", 70, 0, 0, run="x", defense="crossview") | {"lineage": lin("B2")}]
    df = tables.table1(other + cell[:2], "llada-v", "badnets", ["insertion"])
    assert list(df.index) == ["Clean", "Backdoored"]            # that cross-view row was trained from another base


def test_oracle_rows_are_labelled():
    recs = [rec("clean", 60, 0, 0), rec("backdoored", 61, 0, 99),
            rec("oracle", 60, 0, 0) | {"uses_oracle": True}, ]
    recs[2]["spec"]["defense"] = "oracle"
    df = tables.table1(recs, "llada-v", "badnets", ["insertion"])
    assert "Data filtering (oracle)" in list(df.index)
    recs[2]["row"] = recs[2]["spec"]["defense"] = "peek"
    assert "peek (oracle)" in list(tables.table1(recs, "llada-v", "badnets", ["insertion"]).index)
