"""The `bench` command line: run, list, leaderboard, show, triggers.

Bad input of any kind ends in one line on stderr and exit code 2, before anything is written.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

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


@cli.command()
@click.option("--model", default="llada-v", show_default=True, help="victim model (bench list)")
@click.option("--scale", default="tiny", show_default=True, help="tiny (embedded replica) | full (checkpoints)")
@click.option("--task", default="synthetic", show_default=True)
@click.option("--attack", default="badnets", show_default=True, help="trigger (bench list)")
@click.option("--target", default="insertion", show_default=True, help="insertion | refusal | misclassification | keyword")
@click.option("--defense", default="disp", show_default=True, help="defense (bench list); 'none' for Clean/Backdoored only")
@click.option("--poison-rate", default=0.2, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--trainable", default=None, help="parts a fine-tune trains: projector | projector+lm | all")
@click.option("--lr", default=None, type=float, help="victim fine-tune peak lr")
@click.option("--epochs", default=None, type=int, help="victim fine-tune epochs")
@click.option("--steps", default=None, type=int, help="sampler steps")
@click.option("--gen-length", default=None, type=int)
@click.option("--block-length", default=None, type=int)
@click.option("--remasking", default=None, help="low_confidence | random")
@click.option("--attack-arg", multiple=True, help="key=value, repeatable")
@click.option("--target-arg", multiple=True, help="key=value, repeatable")
@click.option("--defense-arg", multiple=True, help="key=value, repeatable")
@click.option("--model-arg", multiple=True, help="key=value, repeatable (tiny sizes / base recipe)")
@click.option("--task-arg", multiple=True, help="key=value, repeatable (split sizes)")
@click.option("--results", default="results", show_default=True, type=click.Path(file_okay=False),
              help="records dir (records.jsonl, outputs/)")
@click.option("--cache", default=None, type=click.Path(file_okay=False), help="artifact cache (default $BENCH_CACHE or the user cache dir)")
def run(model, scale, task, attack, target, defense, poison_rate, seed, trainable, lr, epochs, steps, gen_length,
        block_length, remasking, attack_arg, target_arg, defense_arg, model_arg, task_arg, results, cache) -> None:
    """Run one cell (training what it needs) and print the DiSP Table 1 layout for it."""
    import torch

    from bench import tables
    from core import registry
    from bench.cache import ArtifactCache
    from bench.pipeline import make_spec, run_cell, task_defaults
    from core.params import coerce_params

    torch.set_num_threads(_threads())
    recipe = {k: v for k, v in dict(lr=lr, epochs=epochs).items() if v is not None}
    decoding = {k: v for k, v in dict(steps=steps, gen_length=gen_length, block_length=block_length,
                                      remasking=remasking).items() if v is not None}
    entry = registry.get("models", model)
    m_args = coerce_params(_pairs(model_arg, "--model-arg"), entry.resolve(scale, {}), "model")
    t_args = coerce_params(_pairs(task_arg, "--task-arg"), task_defaults(registry.get("tasks", task)), "task")
    spec = make_spec(model=model, scale=scale, task=task, attack=attack, target=target, defense=defense, seed=seed,
                     poison_rate=poison_rate, trainable=trainable, recipe=recipe, decoding=decoding, model_args=m_args, task_args=t_args,
                     attack_args=_pairs(attack_arg, "--attack-arg"), target_args=_pairs(target_arg, "--target-arg"),
                     defense_args=_pairs(defense_arg, "--defense-arg"))
    recs = run_cell(spec, Path(results), ArtifactCache(Path(cache) if cache else None), log=lambda m: click.echo(m, err=True))
    df = tables.table1(recs, spec.model, spec.attack, [spec.target])
    click.echo(f"\n{spec.model} ({spec.scale}) · {spec.attack} · target {spec.target} · poison {spec.poison_rate:g} · "
               f"seed {spec.seed} · trainable {spec.trainable}")
    click.echo(tables.to_markdown(df))
    click.echo(f"\n{len(recs)} records appended to {Path(results) / 'records.jsonl'}")


@cli.command(name="list")
def list_() -> None:
    """Every registered name, one per line: kind, name, what it is."""
    from core import registry

    for kind in registry.KINDS:
        for name in registry.names(kind):
            obj = registry.get(kind, name)
            doc = (obj.__doc__ or "").strip().splitlines()
            click.echo(f"{KINDS_SINGULAR[kind]:<8} {name:<20} {doc[0] if doc else ''}")


@cli.command()
@click.option("--results", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--out", default="leaderboards", show_default=True, type=click.Path(file_okay=False))
def leaderboard(results, out) -> None:
    """Re-render every table (Markdown + CSV) from the records alone."""
    from bench import records, tables

    recs = records.load(Path(results))
    if not recs:
        raise BenchError(f"no records in {Path(results) / 'records.jsonl'}")
    for p in tables.render_leaderboard(recs, Path(out)):
        click.echo(str(p))


@cli.command()
@click.option("--results", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--model", default="llada-v", show_default=True)
@click.option("--attack", default="badnets", show_default=True)
@click.option("--target", default="insertion", show_default=True)
@click.option("--defense", default="disp", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--plot", default=None, type=click.Path(dir_okay=False), help="also write a bar chart PNG here")
def show(results, model, attack, target, defense, seed, plot) -> None:
    """One cell's metrics and sample outputs, side by side per row."""
    from bench import records, tables

    recs = records.load(Path(results))
    flt = {"model": model, "attack": attack, "target": target, "defense": defense, "seed": seed}
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


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors with exit 2 for bad input, no traceback."""
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
