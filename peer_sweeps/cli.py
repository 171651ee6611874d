"""The `peer-sweeps` command: thin wiring of the study, data, runner, status and report modules.

Exit codes: 0 success; 1 some trials failed (the others' results are kept); 2 invalid input, with one
short message naming the file and field, and no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.26 carries its own copy of click
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer uses click itself
    import click

_NoArgsIsHelp = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _OneLineErrors(TyperGroup):
    """Usage errors (a missing argument, an unknown option, a value out of range) as one line and exit code 2,
    like every other invalid input, instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NoArgsIsHelp as e:  # a bare command: its help, as click does
            if not standalone_mode:
                raise
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            if not standalone_mode:
                raise
            command = e.ctx.command_path if getattr(e, "ctx", None) is not None else "peer-sweeps"
            message = "; ".join(line.strip() for line in e.format_message().splitlines() if line.strip())
            typer.echo(f"peer-sweeps: error: {message} (see `{command} --help`)", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            typer.echo("peer-sweeps: aborted", err=True)
            sys.exit(1)
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Scaling studies of sparse expert language models (PEER, PKM, MoE, dense) on Ray.")
data_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Prepare text data suites.")
app.add_typer(data_app, name="data")

WANDB_MODES = ("online", "offline", "disabled")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"peer-sweeps: error: {message}", err=True)
    raise typer.Exit(code)


def _guard(fn, *args, **kwargs):
    """Runs a command body; user errors become one line and exit code 2."""
    from .data import DataError
    from .results import ResultsDirError
    from .study import StudyError

    try:
        return fn(*args, **kwargs)
    except (StudyError, DataError, ResultsDirError) as e:
        _fail(str(e))


@data_app.command("prepare")
def data_prepare(
    suite: str = typer.Option("default", help="Suite name (default, fixture, c4)."),
    vocab_size: int = typer.Option(8192, help="Tokenizer vocabulary size."),
    root: Optional[Path] = typer.Option(None, help="Data root (default $PEER_SWEEPS_DATA or ./data)."),
    study: Optional[Path] = typer.Option(None, help="Prepare what this study file needs instead."),
):
    """Fetch, clean, split and tokenize a suite; idempotent."""
    from rich.console import Console

    from .data import manifest_table, prepare_suite

    def body():
        nonlocal suite, vocab_size, root
        if study is not None:
            from .study import load_study

            spec = load_study(study).data
            suite, vocab_size, root = spec.suite, spec.vocab_size, Path(spec.root) if spec.root else root
        console = Console(stderr=True)
        manifest = prepare_suite(suite, root, vocab_size, progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
        Console(width=max(120, Console().width)).print(manifest_table(manifest))

    _guard(body)


@app.command()
def plan(study: Path = typer.Argument(..., help="Study YAML file."),
         as_json: bool = typer.Option(False, "--json", help="Print a JSON array, one object per trial."),
         check_data: bool = typer.Option(False, "--check-data", help="Also check that the study's data suite is "
                                         "prepared; prepare a shipped suite that is missing."),
         no_prepare: bool = typer.Option(False, "--no-prepare", help="With --check-data: stop instead of preparing.")):
    """Expand a study into its trials; run nothing."""
    from .plan import load_and_plan

    loaded, trials = _guard(load_and_plan, study)
    if check_data:
        from rich.console import Console

        from .data import ensure_study_data

        _guard(ensure_study_data, loaded.data, study, not no_prepare,
               Console(stderr=True, highlight=False, soft_wrap=True).print)
    if as_json:
        typer.echo(json.dumps([t.to_json() for t in trials], indent=1))
        return
    _print_plan(loaded, trials)


def _print_plan(spec, trials) -> None:
    from rich.console import Console
    from rich.table import Table

    from .plan import storage_totals

    table = Table(title=f"{trials[0].study}: {len(trials)} trials", title_justify="left")
    for column in ("trial_id", "method", "cell", "budget", "params total", "params active", "lr", "tokens", "steps",
                   "FLOPs", "micro-batch", "GB/worker", "ckpt GB", "est. CPU time", "est. GPU-h"):
        table.add_column(column, justify="left" if column in ("trial_id", "method", "cell") else "right")
    for t in trials:
        micro = t.training["micro_batch_size"] or t.batch_tokens // t.seq_len // t.resources["workers_per_trial"]
        table.add_row(t.trial_id, t.method, t.label, f"{t.budget_flops:.3g}" if t.budget_flops else "-",
                      _si(t.params_total), _si(t.params_active), f"{t.training['lr']:.3g}", _si(t.tokens), str(t.steps),
                      f"{t.total_flops:.3g}", str(micro), f"{t.memory_gb_per_worker:.1f}", f"{t.checkpoint_gb:.3g}",
                      _minutes(t.estimated_cpu_seconds()), f"{t.estimated_gpu_hours():.3g}")
    cpu = sum(t.estimated_cpu_seconds() for t in trials)
    gpu = sum(t.estimated_gpu_hours() for t in trials)
    Console(width=240).print(table)
    per_method = ", ".join(f"{m} {sum(t.gpu_hours for t in trials if t.method == m):.3g}"
                           for m in dict.fromkeys(t.method for t in trials))
    typer.echo(f"total: {sum(t.total_flops for t in trials):.3g} FLOPs; about {_minutes(cpu)} of one CPU worker, "
               f"{gpu:.3g} GPU-hours on H100-class GPUs ({per_method}; cost model: README)")
    concurrent = spec.resources.max_concurrent or 1
    storage = storage_totals(trials, concurrent)
    typer.echo(f"memory: up to {max(t.memory_gb_per_worker for t in trials):.1f} GB per worker "
               f"(resources.gpu_memory_gb {spec.resources.gpu_memory_gb:g} on GPU workers); checkpoints: "
               f"{storage['kept']:.4g} GB kept when done, {storage['peak']:.4g} GB at peak with {concurrent} "
               f"trial(s) at a time, {storage['written']:.4g} GB written")


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _minutes(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _wandb_mode(cli_value: Optional[str], study_path: Path) -> str:
    import os

    if cli_value is not None and cli_value not in WANDB_MODES:
        _fail(f"--wandb: {cli_value!r} is not one of {', '.join(WANDB_MODES)}")
    if cli_value is None and os.environ.get("WANDB_MODE") not in (None, *WANDB_MODES):
        _fail(f"WANDB_MODE={os.environ['WANDB_MODE']!r} is not one of {', '.join(WANDB_MODES)}")
    from .study import load_study
    from .tracking import resolve_wandb_mode

    study = _guard(load_study, study_path)
    return resolve_wandb_mode(cli_value, study.tracking.wandb_mode)


@app.command()
def run(
    study: Path = typer.Argument(..., help="Study YAML file."),
    out: Optional[Path] = typer.Option(None, help="Results directory (default runs/<study name>)."),
    address: Optional[str] = typer.Option(None, help="Join an existing Ray cluster: auto or ray://host:port."),
    max_concurrent: Optional[int] = typer.Option(None, min=1, help="At most this many trials at once."),
    wandb: Optional[str] = typer.Option(None, help="W&B mode: online, offline or disabled."),
    no_prepare: bool = typer.Option(False, "--no-prepare", help="Stop, instead of preparing a missing data suite."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Ray's, Tune's and DeepSpeed's output instead of "
                                 "sending it to DIR/logs/."),
):
    """Run every trial of a study not yet done; re-running resumes."""
    from .runner import RunOptions, run_study

    mode = _wandb_mode(wandb, study)
    code = _guard(run_study, study, RunOptions(out=out, address=address, max_concurrent=max_concurrent, wandb_mode=mode,
                                               prepare_data=not no_prepare, verbose=verbose))
    raise typer.Exit(code)


@app.command()
def trial(
    study: Path = typer.Argument(..., help="Study YAML file."),
    trial_id: str = typer.Argument(..., help="Trial id (or a unique prefix) from `peer-sweeps plan`."),
    out: Optional[Path] = typer.Option(None, help="Results directory (default runs/<study name>)."),
    wandb: Optional[str] = typer.Option(None, help="W&B mode: online, offline or disabled."),
    no_prepare: bool = typer.Option(False, "--no-prepare", help="Stop, instead of preparing a missing data suite."),
):
    """Run one trial of a study outside a sweep (debugging)."""
    from .runner import run_single_trial

    mode = _wandb_mode(wandb, study)
    raise typer.Exit(_guard(run_single_trial, study, trial_id, out, mode, not no_prepare))


@app.command()
def status(directory: Path = typer.Argument(..., help="Results directory of a study."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Trials completed / running / failed / diverged / pending; how far the running ones are; the ETA."""
    from .console import duration
    from .status import study_status

    info = _guard(study_status, directory)
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    eta = f"; ETA {duration(info['eta_seconds'])}" if info["run_in_progress"] else ""
    typer.echo(f"{info['study']}: {info['total']} trials - completed {info['completed']}, running {info['running']}, "
               f"failed {info['failed']}, diverged {info['diverged']}, pending {info['pending']}"
               f"{' (a run is in progress)' if info['run_in_progress'] else ''}{eta}")
    for p in info["running_trials"]:
        loss = f", loss {p['loss']:.3f}" if p["loss"] is not None else ""
        speed = f", {p['tokens_per_second']:,.0f} tokens/s" if p["tokens_per_second"] else ""
        typer.echo(f"  running {p['trial_id']} {p['label']}: step {p['step']}/{p['steps']}{loss}{speed}, "
                   f"ETA {duration(p['eta_seconds'])}")
    for tid, error in info["failed_trials"].items():
        typer.echo(f"  failed {tid}: {error}")


@app.command()
def report(directory: Path = typer.Argument(..., help="Results directory of a study."),
           out: Optional[Path] = typer.Option(None, help="Report directory (default DIR/report)."),
           wandb: Optional[str] = typer.Option(None, help="Also log the report as one W&B run: online, offline "
                                               "or disabled.")):
    """Draw isoFLOP curves, frontiers and ablation tables from the Parquet results."""
    from .report import write_report
    from .results import ResultsDirError

    if wandb is not None and wandb not in WANDB_MODES:
        _fail(f"--wandb: {wandb!r} is not one of {', '.join(WANDB_MODES)}")

    def body():
        if not directory.is_dir():
            raise ResultsDirError(f"{directory}: {'not a directory' if directory.exists() else 'no such'} "
                                  f"results directory")
        return write_report(directory, out)

    written = _guard(body)
    typer.echo(f"report written to {written}/report.html")
    if wandb is None:
        return
    from .report.wandb_run import log_report_run

    try:
        run_dir = _guard(log_report_run, directory, written, wandb)
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - W&B unreachable: the report is written, say so in one line
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _fail(f"W&B ({wandb}) report run failed, the report itself is written: {type(e).__name__}: {cause}", code=1)
    if run_dir is not None:
        typer.echo(f"W&B report run ({wandb}): {run_dir}")


@app.command("eval")
def eval_(directory: Path = typer.Argument(..., help="Results directory of a study."),
          trial_id: str = typer.Argument(..., help="Id of a finished trial."),
          set_name: Optional[str] = typer.Option(None, "--set", help="Only this evaluation set."),
          tokens: Optional[str] = typer.Option(None, help="Tokens per set: N (a sample of whole documents) or all "
                                                         "(default: the study's data.eval_tokens)."),
          as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Re-evaluate a finished trial from its final checkpoint: perplexity, bits per byte, tokens scored per set."""
    from .reevaluate import reevaluate

    if tokens is not None and tokens != "all" and not (tokens.isdigit() and int(tokens) > 0):
        _fail(f"--tokens: {tokens!r} is neither a positive number of tokens nor 'all'")
    sample = int(tokens) if tokens is not None and tokens != "all" else tokens
    scores = _guard(reevaluate, directory, trial_id, set_name, sample)
    if as_json:
        typer.echo(json.dumps(scores, indent=1))
        return
    for name, s in scores.items():
        typer.echo(f"{name:<14} ppl {s['ppl']:10.4f}   bpb {s['bpb']:.4f}   tokens {s['tokens']:,}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted; run the same command again to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
