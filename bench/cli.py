"""The `bench` command line: run, list, leaderboard, show, triggers.

Bad input of any kind ends in one line on stderr and exit code 2, before anything is written.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from core.errors import BenchError

KINDS_SINGULAR = {"attacks": "attack", "targets": "target", "defenses": "defense", "models": "model", "tasks": "task"}


def _pairs(values: tuple[str, ...], what: str) -> dict:
    out = {}
    for v in values:
        if "=" not in v:
            raise BenchError(f"{what} must be key=value, got {v!r}")
        k, val = v.split("=", 1)
        out[k.strip()] = val.strip()
    return out


def _show_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)


def _values(recs: list[dict], key: str) -> list[str]:
    """The distinct values a (dotted) spec field takes among records, as text."""
    from bench.tables import flatten
    missing = object()
    vals = {(_show_value(x) if (x := flatten(r.get("spec") or {}).get(key, missing)) is not missing else "(unset)")
            for r in recs}
    return sorted(vals)


# Spec fields that become rows of one cell rather than settings: every defense of a setting is shown.
_ROW_FIELDS = ("defense", "defense_args")


def _settings_spread(recs: list[dict]) -> dict[str, list[str]]:
    """Spec fields (dotted) whose values differ among the records, with those values; a method's
    `*_args` are left out when the method itself differs (they follow from it)."""
    from bench.tables import flatten
    keys = sorted(set().union(*(flatten(r.get("spec") or {}) for r in recs)))
    keys = [k for k in keys if not any(k == f or k.startswith(f + ".") for f in _ROW_FIELDS)]
    spread = {k: v for k in keys if len(v := _values(recs, k)) > 1}
    return {k: v for k, v in spread.items()
            if not (k.split(".")[0].endswith("_args") and k.split(".")[0][: -len("_args")] in spread)}


def _threads() -> int:
    """Torch CPU threads: $BENCH_THREADS, else every core up to 8 (set it to share cores between jobs)."""
    raw = os.environ.get("BENCH_THREADS", "")
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise BenchError(f"BENCH_THREADS must be a positive integer, got {raw!r}")
        return int(raw)
    return max(1, min(os.cpu_count() or 1, 8))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """vl-backdoor-bench: backdoor attacks x defenses x vision-language models -> CP / ASR tables."""


CELL_OPTIONS = [
    click.option("--model", default="llada-v", show_default=True, help="victim model (bench list)"),
    click.option("--scale", default="tiny", show_default=True, help="tiny (embedded replica) | full (checkpoints)"),
    click.option("--weights", default=None, type=click.Path(),
                 help="the published checkpoint directory (--scale full; check it first: bench check-weights)"),
    click.option("--task", default="synthetic", show_default=True),
    click.option("--attack", default="badnets", show_default=True, help="trigger (bench list)"),
    click.option("--target", default="insertion", show_default=True, help="insertion | refusal | misclassification | keyword"),
    click.option("--defense", default="disp", show_default=True, help="defense (bench list); 'none' for Clean/Backdoored only"),
    click.option("--poison-rate", default=None, type=float,
                 help="share of the pool poisoned, in (0, 1)  [default: 0.2; the model's paper setting where it has one]"),
    click.option("--seed", default=0, show_default=True, type=int, help="0 <= seed < 2^32"),
    click.option("--trainable", default=None, help="parts a fine-tune trains: projector | projector+lm | all  [default: projector+lm; projector at --scale full]"),
    click.option("--lr", default=None, type=float, help="victim fine-tune peak lr (> 0)  [default: 1e-3]"),
    click.option("--epochs", default=None, type=int, help="victim fine-tune epochs (>= 1)  [default: 20]"),
    click.option("--steps", default=None, type=int, help="sampler steps, a multiple of the blocks  [default: the model family's; llada-v 32, lavida 16]"),
    click.option("--gen-length", default=None, type=int, help="answer tokens the sampler decodes  [default: 32]"),
    click.option("--train-length", default=None, type=int,
                 help="answer tokens training fits every response into (EOS-padded; a longer response is refused)  "
                      "[default: --gen-length]"),
    click.option("--block-length", default=None, type=int, help="semi-autoregressive block, divides gen-length  [default: the family's; llada-v 8, lavida 32]"),
    click.option("--remasking", default=None, help="low_confidence | random  [default: low_confidence]"),
    click.option("--attack-arg", multiple=True, help="key=value, repeatable; keys and defaults: bench list --args ATTACK"),
    click.option("--target-arg", multiple=True, help="key=value, repeatable; keys and defaults: bench list --args TARGET"),
    click.option("--defense-arg", multiple=True, help="key=value, repeatable; keys and defaults: bench list --args DEFENSE"),
    click.option("--model-arg", multiple=True,
                 help="key=value, repeatable (tiny sizes / base recipe); keys and defaults: bench list --args MODEL"),
    click.option("--task-arg", multiple=True,
                 help="key=value, repeatable (split sizes); keys and defaults: bench list --args TASK"),
    click.option("--results", default="results", show_default=True, type=click.Path(file_okay=False),
                 help="records dir (records.jsonl, outputs/)"),
    click.option("--cache", default=None, type=click.Path(file_okay=False), help="artifact cache (default $BENCH_CACHE or the user cache dir)"),
]


def cell_options(f):
    """The options that define one cell (shared by `bench run` and `bench sweep`)."""
    for opt in reversed(CELL_OPTIONS):
        f = opt(f)
    return f


def _spec_from(model, scale, task, attack, target, defense, poison_rate, seed, trainable, lr, epochs, steps,
               gen_length, block_length, remasking, attack_arg, target_arg, defense_arg, model_arg, task_arg,
               defense_args: dict | None = None, weights: str | None = None, train_length: int | None = None):
    from core import registry
    from bench.pipeline import make_spec, task_defaults
    from core.params import coerce_params

    recipe = {k: v for k, v in dict(lr=lr, epochs=epochs, train_length=train_length).items() if v is not None}
    decoding = {k: v for k, v in dict(steps=steps, gen_length=gen_length, block_length=block_length,
                                      remasking=remasking).items() if v is not None}
    entry = registry.get("models", model)
    if weights is not None and scale != "full":
        raise BenchError(f"--weights is for --scale full (got --scale {scale})")
    given = {"weights": weights} if weights is not None else {}
    m_args = {**coerce_params(_pairs(model_arg, "--model-arg"), entry.resolve(scale, given), "model"), **given}
    t_args = coerce_params(_pairs(task_arg, "--task-arg"), task_defaults(registry.get("tasks", task)), "task")
    return make_spec(model=model, scale=scale, task=task, attack=attack, target=target, defense=defense, seed=seed,
                     poison_rate=poison_rate, trainable=trainable, recipe=recipe, decoding=decoding, model_args=m_args,
                     task_args=t_args, attack_args=_pairs(attack_arg, "--attack-arg"),
                     target_args=_pairs(target_arg, "--target-arg"),
                     defense_args={**_pairs(defense_arg, "--defense-arg"), **(defense_args or {})})


@cli.command()
@cell_options
def run(model, scale, weights, task, attack, target, defense, poison_rate, seed, trainable, lr, epochs, steps, gen_length,
        train_length, block_length, remasking, attack_arg, target_arg, defense_arg, model_arg, task_arg, results,
        cache) -> None:
    """Run one cell (training what it needs) and print the DiSP Table 1 layout for it."""
    import torch

    from bench import tables
    from bench.cache import ArtifactCache
    from bench.pipeline import run_cell

    torch.set_num_threads(_threads())
    spec = _spec_from(model, scale, task, attack, target, defense, poison_rate, seed, trainable, lr, epochs, steps,
                      gen_length, block_length, remasking, attack_arg, target_arg, defense_arg, model_arg, task_arg,
                      weights=weights, train_length=train_length)
    recs = run_cell(spec, Path(results), ArtifactCache(Path(cache) if cache else None), log=lambda m: click.echo(m, err=True))
    df = tables.table1(recs, spec.model, spec.attack, [spec.target])
    click.echo(f"\n{spec.model} ({spec.scale}) · {spec.attack} · target {spec.target} · poison {spec.poison_rate:g} · "
               f"seed {spec.seed} · trainable {spec.trainable}")
    click.echo(tables.to_markdown(df))
    for rec in recs:     # what the defense cost, with its paired interval, and the check that CP reads the image
        m = rec["metrics"]
        cost = f"ΔCP vs Backdoored {tables.fmt_metric('delta_cp', m['delta_cp'], with_ci=True)} · " if "delta_cp" in m else ""
        click.echo(f"{tables.row_label(rec['row']):<12} {cost}CP (blind) {tables.fmt_metric('cp_blind', m.get('cp_blind'))}"
                   f" (chance 25.00)" + (" · saw poison flags (oracle)" if rec.get("uses_oracle") else ""))
    click.echo(f"\n{len(recs)} records appended to {Path(results) / 'records.jsonl'}")


@cli.command()
@cell_options
@click.option("--param", required=True, help="the defense arg to sweep (bench list --args DEFENSE), e.g. mask_ratio")
@click.option("--values", "values_", required=True, help="comma-separated values, e.g. 0.1,0.2,0.3,0.4,0.5")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="PNG + CSV dir  [default: <results>/sweeps]")
def sweep(param, values_, out, results, cache, **cell) -> None:
    """One cell per value of a defense arg; plot ASR (w/t), ASR (w/o) and relative CP against it (DiSP Fig. 2)."""
    import torch

    from bench import tables
    from bench.cache import ArtifactCache
    from bench.pipeline import run_cell

    torch.set_num_threads(_threads())
    values = [v.strip() for v in values_.split(",") if v.strip()]
    if not values:
        raise BenchError("--values needs at least one value")
    if cell["defense"] == "none":
        raise BenchError("bench sweep varies a defense arg; --defense none has none")
    specs = [_spec_from(**cell, defense_args={param: v}) for v in values]   # every value validated before any work
    runs = []
    for i, spec in enumerate(specs, 1):
        value = spec.args("defense")[param]
        click.echo(f"[sweep {i}/{len(specs)}] {spec.defense} {param}={value}", err=True)
        runs.append((value, run_cell(spec, Path(results), ArtifactCache(Path(cache) if cache else None),
                                     log=lambda m: click.echo(m, err=True))))
    df = tables.sweep_frame(runs, param, specs[0].defense)
    s = specs[0]
    stem = f"{s.model}-{s.scale}-{s.attack}-{s.target}-{s.defense}-{param}-seed{s.seed}"
    out_dir = Path(out) if out else Path(results) / "sweeps"
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / f"{stem}.csv", index=False)
    tables.plot_sweep(df, param, out_dir / f"{stem}.png",
                      f"{s.model} · {s.attack} → {s.target} · {s.defense} (seed {s.seed})")
    click.echo(tables.to_markdown(df.set_index(param)))
    click.echo(f"\nwrote {out_dir / (stem + '.png')} and .csv")


@cli.command()
@click.argument("grid_file", type=click.Path(dir_okay=False))
@click.option("--workers", default=2, show_default=True, type=int, help="tasks running at once (local: worker processes)")
@click.option("--threads", default=None, type=int,
              help="torch threads per task  [default: the grid file's resources.cpus, else 1]")
@click.option("--seeds", default=None, help="comma-separated seeds  [default: the grid file's]")
@click.option("--results", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--cache", default=None, help="artifact store: a path (shared by every node for slurm / ray) or "
              "file:///path  [default: $BENCH_CACHE or the user cache dir]")
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "slurm", "ray"]),
              help="local process pool | Slurm job arrays via submitit | Ray tasks")
@click.option("--retries", default=2, show_default=True, type=int, help="resubmissions of a task that crashed or was killed")
@click.option("--cluster", default="slurm", show_default=True, type=click.Choice(["slurm", "local", "debug"]),
              help="slurm executor: submitit's backend; local / debug try the Slurm path on this machine")
@click.option("--slurm-folder", default=None, type=click.Path(file_okay=False),
              help="slurm executor: submitit's job scripts and logs  [default: RESULTS/.submitit]")
@click.option("--ray-address", default=None, help="ray executor: a running cluster (e.g. auto)  "
              "[default: start a private Ray on 127.0.0.1]")
def grid(grid_file, workers, threads, seeds, results, cache, executor, retries, cluster, slurm_folder, ray_address) -> None:
    """Run every missing cell of a grid file (leaderboards/*.yaml), scheduling by stage on an executor."""
    from bench.grid import load_grid, run_grid

    if workers < 1 or (threads is not None and threads < 1) or retries < 0:
        raise BenchError("--workers and --threads must be >= 1, --retries >= 0")
    g = load_grid(grid_file)
    try:
        seed_list = tuple(int(x) for x in seeds.split(",") if x.strip()) if seeds else None
    except ValueError:
        raise BenchError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    specs = g.specs(seed_list)
    options = {"slurm": {"folder": Path(slurm_folder) if slurm_folder else Path(results) / ".submitit",
                         "cluster": cluster, "job_name": f"bench-{g.name}"},
               "ray": {"address": ray_address}}.get(executor, {})
    out = run_grid(specs, Path(results), cache, workers=workers, threads=threads,
                   log=lambda m: click.echo(m, err=True), executor=executor, retries=retries,
                   resources=g.resources, stage_resources=g.stage_resources, executor_options=options)
    click.echo(f"{g.name}: {out['recorded']} cells recorded, {out['skipped']} already there, "
               f"{out['stages']} stages computed -> {Path(results) / 'records.jsonl'}")


@cli.command(name="check-weights")
@click.option("--model", required=True, help="victim model with a full scale (llada-v, lavida)")
@click.argument("path", type=click.Path())
def check_weights(model, path) -> None:
    """Read only PATH's safetensors headers and config.json and report what `bench run --scale full
    --weights PATH` would load: tensor count, dtypes, size, the modules filled and the first
    mismatches (missing / unexpected / shape; exit 2 on any). No tensor data is read."""
    from core import registry

    entry = registry.get("models", model)
    fn = getattr(entry, "check_weights", None)
    if fn is None:
        raise BenchError(f"model {model} has no full-scale loader (scales: {', '.join(entry.scales)})")
    report = fn(path)
    click.echo(report.summary())
    if not report.ok:
        raise BenchError(report.error())


@cli.command(name="list")
@click.option("--args", "args_of", default=None, metavar="NAME",
              help="show NAME's --*-arg keys with their defaults (an attack, target, defense, model or task)")
def list_(args_of) -> None:
    """Every registered name, one per line: kind, name, what it is; or one method's args (--args NAME)."""
    from core import registry

    if args_of is not None:
        _list_args(args_of)
        return
    for kind in registry.KINDS:
        for name in registry.names(kind):
            obj = registry.get(kind, name)
            doc = (obj.__doc__ or "").strip().splitlines()
            click.echo(f"{KINDS_SINGULAR[kind]:<8} {name:<20} {doc[0] if doc else ''}")
            if kind == "models":     # family, scales, capabilities and trainable-part choices of a victim
                click.echo(f"{'':<29} family: {getattr(obj, 'family', '?')}; scales: {', '.join(obj.scales)}; "
                           f"capabilities: {', '.join(getattr(obj, 'capabilities', ())) or 'core only'}; "
                           f"trainable: {', '.join(getattr(obj, 'trainable_parts', ())) or '?'}")
            elif kind == "defenses" and getattr(obj, "kind", "none") != "none":
                click.echo(f"{'':<29} {_defense_needs(obj)}")


HOOK_ACTS = {"purify": "acts on the backdoored model", "filter": "filters the training set, retrains from the base",
             "objective": "adds a training-time loss term, trains from the base", "guard": "flags inputs at inference (they abstain)"}


def _defense_needs(cls) -> str:
    """One line: the hook, the victim capabilities, the data a defense is handed."""
    try:
        inst = cls()
        clean = int(inst.clean_slice)
    except Exception:       # a third-party defense whose config needs args: report the class default
        clean = int(getattr(cls, "clean_slice", 0)) if isinstance(getattr(cls, "clean_slice", 0), int) else 0
    data = "poison flags (oracle)" if getattr(cls, "uses_oracle", False) else "training set (defender's view)"
    parts = [f"hook: {cls.kind} ({HOOK_ACTS.get(cls.kind, '?')})",
             f"needs a victim with: {', '.join(cls.requires) if getattr(cls, 'requires', ()) else 'the core only'}",
             f"data: {data}" + (f" + {clean} held-out clean samples" if clean else "")]
    return "; ".join(parts)


def _method_args(kind: str, obj: Any) -> list[tuple[str, Any, str]]:
    """(key, default, type name) of every arg a registered method takes on the command line."""
    if kind == "models":   # the defaults of the first scale that resolves here (tiny for llada-v)
        for scale in obj.scales:
            try:
                defaults = obj.resolve(scale, {})
            except BenchError:
                continue
            return [(k, v, type(v).__name__) for k, v in defaults.items()]
        return []
    if kind == "tasks":
        from bench.pipeline import task_defaults
        return [(k, v, type(v).__name__) for k, v in task_defaults(obj).items()]
    cfg = getattr(obj, "Config", None)
    if cfg is None or not dataclasses.is_dataclass(cfg):
        return []
    defaults = dataclasses.asdict(cfg())
    return [(f.name, defaults[f.name], type(defaults[f.name]).__name__) for f in dataclasses.fields(cfg)]


def _list_args(name: str) -> None:
    from core import registry

    found = [(kind, registry.get(kind, name)) for kind in registry.KINDS if name in registry.names(kind)]
    if not found:
        every = sorted({n for kind in registry.KINDS for n in registry.names(kind)})
        raise BenchError(f"unknown name {name!r} (valid: {', '.join(every)})")
    for i, (kind, obj) in enumerate(found):
        singular = KINDS_SINGULAR[kind]
        doc = (obj.__doc__ or "").strip().splitlines()
        scales = f" (scale {obj.scales[0]})" if kind == "models" else ""
        click.echo(("\n" if i else "") + f"{singular} {name}{scales}: {doc[0] if doc else ''}".rstrip())
        full = getattr(obj, "full_args", None) if kind == "models" and "full" in obj.scales else None
        rows = _method_args(kind, obj)
        if not rows:
            click.echo("  (no args)")
        width = max((len(f"--{singular}-arg {k}={_show_value(v)}") for k, v, _ in rows), default=0)
        for k, v, t in rows:
            click.echo(f"  {f'--{singular}-arg {k}={_show_value(v)}':<{width}}  ({t})")
        if full is not None:    # scale full: the run args a checkpoint does not decide
            click.echo(f"  at scale full: --weights PATH (required), geometry read from the checkpoint; "
                       + " ".join(f"--model-arg {k}={_show_value(v)}" for k, v in full().items()))


@cli.command()
@click.option("--results", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="where the tables go  [default: RESULTS/leaderboards]")
@click.option("--grid", "grids", multiple=True, type=click.Path(dir_okay=False),
              help="also render this grid file's table (Markdown, CSV, LaTeX; mean ± 95%% interval across seeds); repeatable")
@click.option("--html", "html_dir", default=None, type=click.Path(file_okay=False),
              help="also write a static site here: index, one sortable page per --grid, the figures, a page per cell")
@click.option("--figure", "figures", multiple=True, type=click.Path(dir_okay=False),
              help="a PNG for the site  [default: RESULTS/*.png and RESULTS/sweeps/*.png]; repeatable")
def leaderboard(results, out, grids, html_dir, figures) -> None:
    """Re-render every table (Markdown + CSV) from the records alone; --html also writes a site."""
    from bench import records, tables
    from bench.grid import load_grid

    loaded = [load_grid(g) for g in grids]          # a bad grid file fails before anything is written
    missing = [f for f in figures if not Path(f).is_file()]
    if missing:
        raise BenchError(f"--figure {missing[0]} does not exist")
    recs = records.load(Path(results))
    if not recs:
        raise BenchError(f"no records in {Path(results) / 'records.jsonl'}")
    out_dir = Path(out) if out else Path(results) / "leaderboards"
    for p in tables.render_leaderboard(recs, out_dir):
        click.echo(str(p))
    for g in loaded:
        for p in tables.render_grid(g, recs, out_dir):
            click.echo(str(p))
    if html_dir:
        from bench.site import build_site

        figs = [Path(f) for f in figures] or sorted(Path(results).glob("*.png")) + \
            sorted((Path(results) / "sweeps").glob("*.png"))
        pages = build_site(recs, loaded, Path(html_dir), Path(results), figs)
        click.echo(f"{pages[-1]} ({len(pages)} pages)")


@cli.command()
@click.option("--results", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--where", multiple=True, metavar="KEY=VALUE",
              help="keep records whose spec field KEY equals VALUE; dotted keys reach nested fields "
                   "(poison_rate=0.2, attack_args.size=0.25, recipe.lr=0.001), row=... a row; repeatable")
@click.option("--model", default=None, help="same as --where model=...")
@click.option("--attack", default=None, help="same as --where attack=...")
@click.option("--target", default=None, help="same as --where target=...")
@click.option("--defense", default=None, help="same as --where defense=...")
@click.option("--seed", default=None, type=int, help="same as --where seed=...")
@click.option("--plot", default=None, type=click.Path(dir_okay=False), help="also write a bar chart PNG here")
def show(results, where, model, attack, target, defense, seed, plot) -> None:
    """One cell's metrics and sample outputs, side by side per row.

    Without filters it shows the one setting the records hold; when they hold several it says which
    values exist (add --where KEY=VALUE to pick one)."""
    from bench.tables import flatten
    from bench import records, tables

    recs = records.load(Path(results))
    if not recs:
        raise BenchError(f"no records in {Path(results) / 'records.jsonl'}")
    flt = _pairs(where, "--where")
    for key, value in dict(model=model, attack=attack, target=target, defense=defense, seed=seed).items():
        if value is None:
            continue
        if key in flt and str(flt[key]) != str(value):
            raise BenchError(f"--{key} {value} contradicts --where {key}={flt[key]}")
        flt[key] = value
    known = set().union(*(set(flatten(r.get("spec") or {})) | set(r.get("spec") or {}) for r in recs)) | {"row"}
    unknown = sorted(set(flt) - known)
    if unknown:
        raise BenchError(f"no record has spec field(s) {unknown} (fields: {', '.join(sorted(known))})")
    selected = [r for r in recs if tables.matches(r, flt)]
    if not selected:
        have = "; ".join(f"{k} has {', '.join(_values(recs, k) if k != 'row' else sorted({str(r.get('row')) for r in recs}))}"
                         for k in flt)
        raise BenchError(f"no records match {' '.join(f'{k}={v}' for k, v in flt.items())} ({have})")
    spread = _settings_spread(selected)
    if spread:
        raise BenchError(f"the {'selected ' if flt else ''}records hold several settings; pick one with --where: "
                         + "; ".join(f"{k}={'|'.join(v)}" for k, v in spread.items()))
    click.echo(tables.show_cell(recs, lambda rel: records.read_outputs(Path(results), rel), flt))
    if plot:
        click.echo(str(tables.plot_cell(recs, Path(plot), flt)))


@cli.command()
@click.option("--out", default="triggers", show_default=True, type=click.Path(file_okay=False))
@click.option("--attack", "attacks", multiple=True, help="attack to show (repeatable; default: every registered attack)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--cache", default=None, type=click.Path(file_okay=False), help="artifact cache (default $BENCH_CACHE or the user cache dir)")
def triggers(out, attacks, seed, cache) -> None:
    """Gallery PNG of every attack's trigger on one clean test image, plus mean L-inf / L2 per attack."""
    from core import registry
    from bench.cache import ArtifactCache
    from bench.gallery import trigger_gallery

    names = list(attacks) or registry.names("attacks")
    for name in names:
        registry.get("attacks", name)   # unknown names fail here, before anything is fitted or written
    paths = trigger_gallery(names, Path(out), seed, ArtifactCache(Path(cache) if cache else None),
                            log=lambda m: click.echo(m, err=True))
    click.echo(Path(paths["md"]).read_text())
    for p in paths.values():
        click.echo(str(p))


@cli.command(name="lmms-eval")
@cell_options
@click.option("--row", default="clean", show_default=True, help="which model of the cell: clean | backdoored | the defense's name")
@click.option("--lmms-task", default="mmmu_val", show_default=True, help="the stock lmms-eval task (DiSP's CP: mmmu_val)")
@click.option("--parquet", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="local parquet file of the task's test split in its published shape (repeatable)")
@click.option("--limit", default=None, type=int, help="score only the first N documents")
@click.option("--lmms-gen-length", default=None, type=int, help="answer tokens for these requests  [default: the cell's]")
@click.option("--lmms-steps", default=None, type=int, help="sampler steps for these requests  [default: the cell's]")
@click.option("--lmms-block-length", default=None, type=int, help="sampler block for these requests  [default: the cell's]")
def lmms_eval_(row, lmms_task, parquet, limit, lmms_gen_length, lmms_steps, lmms_block_length, results, cache, **cell) -> None:
    """Score one cached row of a cell with lmms-eval from local parquet files (bench/lmms.py) -> RESULTS/lmms_eval.jsonl."""
    import torch

    from bench.lmms import RESULTS_FILE, score

    torch.set_num_threads(_threads())
    spec = _spec_from(**cell)
    decoding = {k: v for k, v in dict(gen_length=lmms_gen_length, steps=lmms_steps, block_length=lmms_block_length).items()
                if v is not None}    # lmms-eval's decoding (MMMU: 2/2/2), not the cell's: the cell's keys stay the same
    if decoding:
        from bench.spec import Decoding
        Decoding(**{**spec.decoding.__dict__, **decoding})     # checked here, in one line
    rec = score(spec, row, lmms_task, list(parquet), Path(results), cache, limit=limit, model_args=decoding,
                log=lambda m: click.echo(m, err=True))
    cp = rec["metrics"]["cp"]
    value = "n/a" if cp["value"] is None else f"{cp['value']:.2f}"
    click.echo(f"{spec.model} ({spec.scale}) {row} · lmms-eval {rec['lmms_eval']['version']} {lmms_task}: "
               f"{cp['metric']} {value} ({rec['lmms_eval']['n_samples']}) -> {Path(results) / RESULTS_FILE}")


def _isatty(stream) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):
        return False


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors with exit 2 for bad input, no traceback.

    When stderr is not a terminal (a log file, a pipe) progress bars are off, so a log holds one line
    per stage and no bar redraws: TQDM_DISABLE is set here, before any command imports tqdm (tqdm >=
    4.66 reads TQDM_* when it is imported, so nothing at this module's top may import it). An
    explicit TQDM_DISABLE is left alone (empty = bars on; tqdm treats any non-empty value as true)."""
    quiet_bars = not _isatty(sys.stderr) and "TQDM_DISABLE" not in os.environ
    if quiet_bars:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        _main(argv)
    finally:
        if quiet_bars:
            os.environ.pop("TQDM_DISABLE", None)


def _main(argv: list[str] | None) -> None:
    try:
        rc = cli.main(args=argv, prog_name="bench", standalone_mode=False)
    except BenchError as e:
        click.echo(f"bench: error: {e}", err=True)
        sys.exit(2)
    except click.UsageError as e:
        click.echo(f"bench: error: {e.format_message()}", err=True)
        sys.exit(2)
    except click.Abort:
        click.echo("bench: aborted", err=True)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
