"""`bench leaderboard --html DIR`: a static, self-contained site rendered from records alone.

DIR holds ``index.html`` (provenance, the grid tables, the figures, every cell), one page per grid file
(``grid-NAME.html``: its table with the mean ± 95% interval across seeds, sortable by any column),
one page per cell (``cells/ID.html``: every row's metrics with intervals, sample outputs, and a link to
each row's full outputs file) and copies of the files they show (``figures/``, ``outputs/``). Nothing is
fetched at view time: CSS and the sorting script are inline, images and outputs are files beside the
pages, and a Content-Security-Policy tag forbids any other source. Rows whose defense saw the poison
flags carry an *oracle* marker, rows whose defense was handed held-out clean samples a *clean data*
marker (the same facts ``bench/tables.py`` marks in Markdown).

The sorting script is ours (~30 lines): a click on a header orders the body rows by that column,
numbers numerically (the mean before "±"), missing cells ('-') last in both directions.
"""
from __future__ import annotations

import hashlib
import html
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

from bench import records as records_mod
from bench import tables

CSP = ("default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:80rem;padding:0 1rem;color:#1d1d1f}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d0d7;padding:.25rem .5rem;text-align:left;vertical-align:top}
thead th{background:#f2f2f6;position:sticky;top:0}
table.sortable thead th{cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tbody tr:nth-child(even){background:#fafafc}
.badge{display:inline-block;font-size:.75em;padding:0 .35em;border-radius:.3em;margin-left:.3em;white-space:nowrap}
.oracle{background:#fde2e1;color:#8a1c13}.clean-data{background:#e0effd;color:#0b4a8a}
.meta{color:#555}.missing{color:#999}figure{display:inline-block;margin:0 1rem 1rem 0}
figure img{max-width:36rem;border:1px solid #ddd}code{font-size:.9em}
"""
JS = """
(function(){
  function key(row, col){
    var cell = row.cells[col]; if(!cell) return null;
    var t = (cell.getAttribute('data-sort') || cell.textContent).trim();
    if(t === '' || t === '-') return null;
    var n = parseFloat(t.split('\\u00b1')[0]);
    return isNaN(n) || !/^[-+]?[0-9.]/.test(t) ? t.toLowerCase() : n;
  }
  function cmp(a, b){
    if(typeof a === typeof b) return a < b ? -1 : a > b ? 1 : 0;
    return typeof a === 'number' ? -1 : 1;
  }
  document.querySelectorAll('table.sortable').forEach(function(table){
    var heads = table.tHead.rows[table.tHead.rows.length - 1].cells;
    Array.prototype.forEach.call(heads, function(th, col){
      th.title = 'sort by this column';
      th.addEventListener('click', function(){
        var dir = th.getAttribute('aria-sort') === 'ascending' ? -1 : 1;
        Array.prototype.forEach.call(heads, function(h){ h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', dir === 1 ? 'ascending' : 'descending');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function(x, y){
          var a = key(x, col), b = key(y, col);
          if(a === null || b === null) return a === b ? 0 : (a === null ? 1 : -1);   // missing last
          return dir * cmp(a, b);
        });
        rows.forEach(function(r){ body.appendChild(r); });
      });
    });
  });
})();
"""
N_SAMPLES = 4          # sample outputs shown inline per row and input kind


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _page(title: str, body: str, up: str = "") -> str:
    """One complete page: inline CSS and script, no external source allowed."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
            + (f'<p><a href="{up}index.html">&larr; leaderboards</a></p>' if up else "")
            + f"<h1>{_e(title)}</h1>\n{body}\n<script>{JS}</script></body></html>\n")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], sortable: bool = True, raw: bool = False) -> str:
    """An HTML table; cells are escaped text unless ``raw`` (then they are HTML built here)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in r) + "</tr>\n" for r in rows)
    return f'<table class="{"sortable" if sortable else "plain"}"><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>'


def _markers(recs: Sequence[Mapping]) -> str:
    out = ""
    if any(r.get("uses_oracle") for r in recs):
        out += '<span class="badge oracle" title="this defense saw the poison flags">oracle</span>'
    if any((r.get("defender_data") or {}).get("clean_slice") for r in recs):
        out += '<span class="badge clean-data" title="this defense was handed held-out clean samples">clean data</span>'
    return out


def cell_id(spec: Mapping) -> str:
    """A cell page's stable file name: a digest of the cell's spec."""
    return hashlib.sha256(records_mod.spec_key(dict(spec)).encode()).hexdigest()[:16]


def _cell_title(spec: Mapping) -> str:
    return (f"{spec.get('model')} · {spec.get('attack')} → {spec.get('target')} · {spec.get('defense')} · "
            f"poison {spec.get('poison_rate')} · seed {spec.get('seed')}")


def _value(text: str) -> str:
    return f'<span class="missing">{_e(text)}</span>' if text == tables.MISSING else _e(text)


def _grid_page(grid, recs: Sequence[Mapping]) -> str:
    df, used = tables.grid_table(grid, recs)
    flat = tables._flat_columns(df).reset_index()
    varying = list(df.index.names[:-1]) if len(df.index.names) > 1 else []
    by_row: dict[tuple, list[Mapping]] = defaultdict(list)
    for r in used:
        s = r.get("spec") or {}
        by_row[tuple(str(s.get(k)) for k in varying) + (tables.DISPLAY.get(r["row"], r["row"]),)].append(r)
    n_index = len(varying) + 1
    rows = []
    for values in flat.itertuples(index=False):
        values = [str(v) for v in values]
        mine = by_row.get(tuple(values[:n_index]), [])
        cells = {cell_id(r["spec"]): r["spec"] for r in mine}
        differ = [k for k in ("target", "defense", "attack", "model", "poison_rate")
                  if len({str(c.get(k)) for c in cells.values()}) > 1]
        label = lambda c: " · ".join([*(str(c.get(k)) for k in differ), f"seed {c.get('seed')}"])
        links = "<br>".join(f'<a href="cells/{cid}.html">{_e(label(c))}</a>'
                            for cid, c in sorted(cells.items(), key=lambda kv: label(kv[1])))
        rows.append([_e(v) for v in values[:n_index - 1]] + [_e(values[n_index - 1]) + _markers(mine)]
                    + [_value(v) for v in values[n_index:]] + [links or '<span class="missing">-</span>'])
    body = (f'<p class="meta">{_e(grid.title)}</p><p class="meta">{_e(tables.grid_provenance(used))}</p>'
            '<p class="meta">Click a column header to sort. Values are percent. Markers: '
            '<span class="badge oracle">oracle</span> the defense saw the poison flags; '
            '<span class="badge clean-data">clean data</span> it was handed held-out clean samples.</p>'
            + _table(list(flat.columns) + ["cells"], rows, raw=True))
    return _page(f"{grid.name}", body)


def _samples(rows: list[dict]) -> str:
    """A few triggered and clean sample outputs of one row."""
    parts = []
    for trig, name in ((True, "triggered inputs"), (False, "clean inputs")):
        pick = [o for o in rows if bool(o.get("triggered")) is trig and not isinstance(o.get("triggered"), str)]
        if pick:
            lines = [[str(o.get("id")), str(o.get("prompt", "")), str(o.get("output", "")),
                      ", ".join(k for k, v in sorted((o.get("verdicts") or {}).items()) if v is True) or "-"]
                     for o in pick[:N_SAMPLES]]
            parts.append(f"<h4>{name}</h4>" + _table(["input id", "prompt", "output", "judged"], lines, sortable=False))
    return "".join(parts) or '<p class="missing">(no per-sample outputs recorded)</p>'


def _cell_page(cell_recs: list[Mapping], results_dir: Path, out_dir: Path) -> str:
    """Every row of one cell (newest record per row): metrics with intervals, samples, outputs file."""
    latest: dict[str, Mapping] = {}
    for r in cell_recs:
        latest[str(r.get("row"))] = r
    rows = sorted(latest.values(), key=lambda r: tables._row_sort_key(str(r.get("row"))))
    spec = rows[0]["spec"]
    metrics = tables._metrics_present(rows)
    mtable = [[_e(tables.row_label(r["row"])) + _markers([r])]
              + [_value(tables.fmt_metric(k, (r.get("metrics") or {}).get(k), with_ci=True)) for k, _ in metrics]
              for r in rows]
    body = ['<p class="meta">' + " · ".join(f"{_e(k)}: <code>{_e(v)}</code>" for k, v in sorted(spec.items())
                                            if not isinstance(v, (dict, list))) + "</p>",
            _table(["row"] + [name for _, name in metrics], mtable, raw=True)]
    for r in rows:
        rel = r.get("outputs")
        src = results_dir / rel if rel else None
        body.append(f"<h3>{_e(tables.row_label(r['row']))}</h3>")
        if src is not None and src.is_file():
            dest = out_dir / records_mod.OUTPUTS_DIR / src.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            body.append(f'<p><a href="../{records_mod.OUTPUTS_DIR}/{_e(src.name)}">every output of this row '
                        f"(JSONL, {len(records_mod.read_outputs(results_dir, rel))} rows)</a></p>")
            body.append(_samples(records_mod.read_outputs(results_dir, rel)))
        else:
            body.append('<p class="missing">(outputs file not in the results dir)</p>')
    return _page(_cell_title(spec), "\n".join(body), up="../")


def build_site(recs: Sequence[Mapping], grids: Sequence, out_dir: Path, results_dir: Path,
               figures: Sequence[Path] = ()) -> list[Path]:
    """Write the site into ``out_dir`` (see the module docstring); returns the pages written."""
    out_dir, results_dir = Path(out_dir), Path(results_dir)
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def write(rel: str, text: str) -> None:
        path = out_dir / rel
        path.write_text(text, encoding="utf-8")
        written.append(path)

    by_cell: dict[str, list[Mapping]] = defaultdict(list)
    for r in recs:
        by_cell[cell_id(r.get("spec") or {})].append(r)
    for cid, cell_recs in by_cell.items():
        write(f"cells/{cid}.html", _cell_page(cell_recs, results_dir, out_dir))
    grid_links = []
    for g in grids:
        write(f"grid-{g.name}.html", _grid_page(g, recs))
        _, used = tables.grid_table(g, recs)
        grid_links.append([f'<a href="grid-{_e(g.name)}.html">{_e(g.name)}</a>', _e(g.title), str(len(used)),
                           str(len(g.cells))])
    figs = []
    for f in figures:
        f = Path(f)
        dest = out_dir / "figures" / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
        csv = f.with_suffix(".csv")
        extra = ""
        if csv.is_file():
            shutil.copyfile(csv, dest.with_suffix(".csv"))
            extra = f' · <a href="figures/{_e(csv.name)}">data (CSV)</a>'
        figs.append(f'<figure><img src="figures/{_e(f.name)}" alt="{_e(f.stem)}">'
                    f"<figcaption>{_e(f.name)}{extra}</figcaption></figure>")
    cell_rows = []
    for cid, cell_recs in sorted(by_cell.items(), key=lambda kv: records_mod.spec_key(kv[1][0].get("spec") or {})):
        s = cell_recs[0].get("spec") or {}
        cell_rows.append([_e(s.get("model")), _e(s.get("attack")), _e(s.get("target")), _e(s.get("defense")),
                          _e(s.get("poison_rate")), _e(s.get("seed")), str(len(cell_recs)),
                          f'<a href="cells/{cid}.html">open</a>' + _markers(cell_recs)])
    revisions = sorted({str(r.get("code_revision"))[:10] for r in recs if r.get("code_revision")})
    body = [f'<p class="meta">{len(recs)} records · {len(by_cell)} cells · code revision(s) '
            f"{_e(', '.join(revisions) or '-')} · rendered by <code>bench leaderboard --html</code> "
            "from the records alone</p>",
            "<h2>Tables</h2>",
            _table(["grid", "what", "records", "cells"], grid_links, raw=True) if grid_links
            else '<p class="missing">(no grid files given: bench leaderboard --grid FILE --html DIR)</p>']
    if figs:
        body += ["<h2>Figures</h2>", "".join(figs)]
    body += ["<h2>Every cell</h2>",
             _table(["model", "attack", "target", "defense", "poison rate", "seed", "rows", "page"], cell_rows, raw=True)]
    write("index.html", _page("vl-backdoor-bench leaderboards", "\n".join(body)))
    return written
