"""The committed leaderboards are a pure function of the committed records: re-rendering them from
leaderboards/records.jsonl gives every committed table byte for byte."""
from __future__ import annotations

from pathlib import Path

from bench import records, tables

BOARD = Path(__file__).resolve().parent.parent / "leaderboards"


def test_committed_tables_regenerate_byte_for_byte(tmp_path):
    recs = records.load(BOARD)
    assert recs, "leaderboards/records.jsonl holds the records behind the committed tables"
    written = tables.render_leaderboard(recs, tmp_path)
    assert {p.name for p in written} >= {"README.md", "attacks-backdoored.csv"}
    for p in written:
        committed = BOARD / p.name
        assert committed.exists(), f"{p.name} is rendered from the records but not committed"
        assert p.read_bytes() == committed.read_bytes(), f"leaderboards/{p.name} differs from its records"
    rendered = {p.name for p in written}
    stale = [p.name for p in BOARD.glob("llada-v-*") if p.name not in rendered]
    assert not stale, f"committed tables without records: {stale}"


def test_every_committed_record_carries_its_lineage():
    for r in records.load(BOARD):
        assert {"base", "trigger", "evaluated"} <= set(r["lineage"]), r["row"]
        assert all(stage["provenance"] for stage in r["lineage"].values())
        assert "uses_oracle" in r and "cp_blind" in r["metrics"]
