"""`bcdcore`: the headless command line. Recipe errors exit 2 with one line on stderr and no traceback."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from bcdcore.nodeflags import load_with_flags, node_overrides, resume_recipe
from bcdcore.recipe import RecipeError, expand_grid, load_recipe, os_reason, toml_value
from bcdcore.rundir import RunLockedError, default_runs_dir, list_runs


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bcdcore", description="Block coordinate descent workstation engine")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run one recipe")
    run.add_argument("recipe", nargs="?", help="recipe .toml (omit with --resume)")
    run.add_argument("--runs-dir", type=Path, default=None, help="where run directories go (default ./runs or $BCD_RUNS)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one recipe key, e.g. --set algorithm.K=5 (repeatable)")
    run.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR", help="continue a killed run")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--nnodes", type=int, default=None, help="hosts of a multi-node run ([distributed] nnodes)")
    run.add_argument("--node-rank", type=int, default=None, help="this host's number, 0 = the rendezvous host")
    run.add_argument("--rdzv", default=None, metavar="HOST:PORT", help="rendezvous endpoint on node 0")
    run.add_argument("--sweep-point", action="store_true", help=argparse.SUPPRESS)  # set by `bcdcore sweep`
    # set by the distributed launcher: this process is one rank of the run in RUN_DIR
    run.add_argument("--attach", type=Path, default=None, help=argparse.SUPPRESS)
    run.add_argument("--attach-resume", action="store_true", help=argparse.SUPPRESS)

    check = sub.add_parser("check", help="validate a recipe without running it")
    check.add_argument("recipe")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    ls = sub.add_parser("ls", help="list runs with state and final metrics")
    ls.add_argument("--runs-dir", type=Path, default=None)
    ls.add_argument("--json", action="store_true",
                    help="one JSON object per run (state, reason, writer lock holder, metrics, bad lines)")

    sweep = sub.add_parser("sweep", help="run a recipe's [sweep] grid over device slots")
    sweep.add_argument("recipe")
    sweep.add_argument("--gpus", default=None, help="comma-separated GPU ids (default: all detected; none: CPU)")
    sweep.add_argument("--per-gpu", type=int, default=1, help="concurrent runs per GPU (or on the CPU)")
    sweep.add_argument("--runs-dir", type=Path, default=None)
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sweep.add_argument("--slurm", action="store_true", help="submit the points as Slurm jobs (submitit)")
    sweep.add_argument("--partition", default=None, help="--slurm: Slurm partition")
    sweep.add_argument("--gpus-per-job", type=int, default=None, help="--slurm: GPUs per job (default 1; 0 on CPU)")
    sweep.add_argument("--time", type=int, default=60, metavar="MINUTES", help="--slurm: time limit per job")
    sweep.add_argument("--account", default=None, help="--slurm: Slurm account")
    sweep.add_argument("--slots-per-job", type=int, default=1, help="--slurm: points run at once in one job")
    sweep.add_argument("--slurm-executor", default="slurm", help=argparse.SUPPRESS)  # "local": tests, no Slurm

    plot = sub.add_parser("plot", help="curves of runs (seed groups as mean +/- std bands)")
    plot.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    plot.add_argument("--x", default="grad_evals", help="grad_evals | flops | samples | wall_s | round | bytes_comm | sim_time_s")
    plot.add_argument("--y", default="train_loss", help="a metric, e.g. train_loss, val_loss, val_acc")
    plot.add_argument("--out", type=Path, default=None, help=".png or .pdf (default: figures/ of the first run)")
    plot.add_argument("--logy", action="store_true", help="log-scale y axis")
    plot.add_argument("--logx", action="store_true", help="log-scale x axis")
    plot.add_argument("--title", default=None)

    export = sub.add_parser("export", help="export a run's trained model")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--onnx", action="store_true", required=True, help="write RUN_DIR/model.onnx")
    return parser


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (argparse's default prints the whole usage block first)."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


# Exit codes (DESIGN "Processes"): 0 done, 2 bad input (nothing was written), 1 a failure during a run,
# 128+signal when killed. Every error is one line on stderr; BCD_DEBUG=1 adds the traceback.
EXIT_BAD_INPUT, EXIT_FAILED = 2, 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    commands = {"run": cmd_run, "check": cmd_check, "ls": cmd_ls, "sweep": cmd_sweep, "plot": cmd_plot,
                "export": cmd_export}
    try:
        return commands[args.command](args)
    except (RecipeError, RunLockedError) as exc:
        return _fail(f"error: {exc}", EXIT_BAD_INPUT)
    except BrokenPipeError:  # output piped into `head` and friends
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return _fail("interrupted (Ctrl-C); nothing was left running", 128 + signal.SIGINT)
    except OSError as exc:  # the environment refused (a file, a folder, the disk) before or after any run
        return _fail(f"error: {os_reason(exc)}", EXIT_BAD_INPUT)
    except MemoryError:
        return _fail("error: out of memory; use a smaller model, batch_size or dataset", EXIT_FAILED)
    except Exception as exc:  # a bug of ours, still as one line: the run directory (if any) records its state
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return _fail(f"error: internal error: {type(exc).__name__}: {lines[0] if lines else ''} "
                     "(set BCD_DEBUG=1 for the traceback)", EXIT_FAILED)


def _fail(line: str, code: int) -> int:
    if os.environ.get("BCD_DEBUG"):
        import traceback

        traceback.print_exc()
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    return code


def cmd_check(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    # The full check builds the model (block count, per-block lists) and opens the dataset.
    from bcdcore.run import prepare

    if recipe.sweep:
        points = expand_grid(recipe.sweep)
        for point in points:
            prepare(load_recipe(args.recipe, [*args.overrides, *(f"{k}={toml_value(v)}" for k, v in point.items())]))
        print(f"ok: {args.recipe} (sweep of {len(points)} runs over {', '.join(recipe.sweep)})")
        return 0
    prepared = prepare(recipe)
    print(f"ok: {args.recipe} ({recipe.model.name}, {prepared.params.n_blocks} blocks, "
          f"{recipe.data.name}, {recipe.algorithm.mode}/{recipe.algorithm.schedule}, ops {prepared.backend})")
    return 0


def _announce(line: str) -> None:
    print(line, flush=True)


def _resume_nproc(path: Path, key: str = "nproc") -> int:
    try:
        return getattr(load_recipe(Path(path) / "recipe.toml").distributed, key)
    except (RecipeError, OSError):
        return 1  # resume_run says what is wrong


def _node_flags(args) -> list[str]:
    return node_overrides(args.nnodes, args.node_rank, args.rdzv)


def cmd_run(args) -> int:
    if args.attach is not None:
        from bcdcore.run import run_rank

        return run_rank(args.attach, args.attach_resume, None, None, None, args.quiet, _announce)
    if args.resume is not None:
        if args.recipe or args.overrides:
            raise RecipeError("--resume continues a run with its own recipe; drop the RECIPE and --set arguments")
        recipe = None
        if _node_flags(args) or _resume_nproc(args.resume, "nnodes") > 1:  # this node's part of a multi-node run
            recipe = resume_recipe(args.resume, _node_flags(args))
    else:
        if not args.recipe:
            raise RecipeError("bcdcore run: give a recipe file (or --resume RUN_DIR)")
        recipe = load_with_flags(args.recipe, args.overrides, _node_flags(args))  # before torch: errors come fast
        if recipe.sweep and not args.sweep_point:
            raise RecipeError(f"{args.recipe}: has a [sweep] table; run its grid with `bcdcore sweep`")
        recipe.sweep = {}  # a sweep point runs as a plain recipe
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):  # started by an external torchrun: this process is one rank
        from bcdcore.run import run_rank

        return run_rank(None, False, None if args.resume else recipe, args.runs_dir or default_runs_dir(),
                        args.resume, args.quiet, _announce)
    if recipe is not None and recipe.distributed.nnodes > 1:
        from bcdcore.run.multinode import launch_nodes

        return launch_nodes(recipe, args.runs_dir or default_runs_dir(), args.resume, args.quiet, _announce)
    if recipe is not None and args.resume is not None:
        recipe = None  # one host: the run's own recipe, read where it is resumed
    nproc = recipe.distributed.nproc if recipe is not None else _resume_nproc(args.resume)
    if nproc > 1:
        from bcdcore.run import launch_distributed

        return launch_distributed(recipe, args.runs_dir or default_runs_dir(), args.resume, args.quiet, _announce)
    from rich.console import Console

    from bcdcore.run import final_summary, resume_run, start_run

    run = resume_run(args.resume) if recipe is None else start_run(recipe, args.runs_dir or default_runs_dir())
    print(f"run directory: {run.rundir.path}", flush=True)
    console = None if args.quiet else Console(stderr=True)
    code = run.execute(console)
    print(final_summary(run.state, run.reason, getattr(run, "final_metrics", None)), flush=True)
    return code


def cmd_ls(args) -> int:
    """One row per run. A run whose status cannot be read shows as `unreadable: <reason>` with what its events
    still tell; bad event lines are skipped and counted in the state cell. Nothing in a run directory can
    make this raise: the readers are total (bcdcore.records)."""
    from bcdcore.rundir import printable

    runs_dir = Path(args.runs_dir or default_runs_dir())
    problem = _runs_dir_problem(runs_dir)
    if problem:
        print(f"error: {printable(str(runs_dir))}: {problem}", file=sys.stderr)
        return 2
    runs = list_runs(runs_dir)
    if not runs:
        print(f"no runs in {printable(str(runs_dir))}")
        return 0
    records = [_ls_record(path) for path in runs]
    if getattr(args, "json", False):
        import json

        print(json.dumps(_plain_json(records), indent=1))
        return 0
    header = ("run", "state", "round", "train_loss", "val", "test")
    rows = [_ls_row(record) for record in records]
    if not sys.stdout.isatty():  # scripts get whole run ids, tab-separated
        for row in (header, *rows):
            print("\t".join(row))
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(*header)
    table.columns[0].no_wrap = True
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # Text, not markup: a run named "[/x]" is just a name
    Console().print(table)
    return 0


def _runs_dir_problem(runs_dir: Path) -> str:
    """Why `runs_dir` cannot be listed ("" when it can, or does not exist: then it has no runs)."""

    try:
        with os.scandir(runs_dir):
            return ""
    except FileNotFoundError:
        return ""
    except NotADirectoryError:
        return "not a directory"
    except OSError as exc:
        return f"cannot list it ({os_reason(exc, with_path=False)})"


def _ls_record(path: Path) -> dict:
    """What `ls` knows of one run: its displayed state (bcdcore.rundir.run_state) and its last metrics."""
    from bcdcore.rundir import lost_reason, printable, read_events, read_status_checked, run_state

    status, problem = read_status_checked(path)
    state = run_state(status, path, problem)
    events = read_events(path)
    metrics = [e for e in events if e["kind"] == "metric"]
    starts = [i for i, e in enumerate(events) if e["kind"] == "start"]
    ends = [e for e in events[starts[-1] if starts else 0:] if e["kind"] == "end"]  # of the last segment only
    last = metrics[-1] if metrics else {}
    progress = status.get("progress") or {}
    val = next((k for k in ("val_acc", "val_loss") if k in last), None)
    test = next((k for k in ("test_acc", "test_loss") if k in last), None)
    return {"run": printable(path.name), "path": printable(str(path)), "state": state.state,
            "reason": lost_reason(state, ends[-1] if ends else None), "holder": state.holder,
            "round": progress.get("round", last.get("round", 0)),  # unreadable status: the events still tell
            "rounds": progress.get("rounds"), "train_loss": last.get("train_loss"),
            "val": {"name": val, "value": last[val]} if val else None,
            "test": {"name": test, "value": last[test]} if test else None,
            "bad_lines": events.bad_lines, "note": events.note}


def _plain_json(value):
    """Non-finite floats as the strings "nan", "inf", "-inf" (as in metrics.jsonl): JSON has no such numbers."""
    if isinstance(value, float) and (value != value or abs(value) == float("inf")):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_json(v) for v in value]
    return value


def _ls_row(record: dict) -> tuple[str, ...]:
    label = _state_cell(record)
    rounds = record["rounds"] if record["rounds"] is not None else "?"
    return (record["run"], label, f"{record['round']}/{rounds}", _fmt(record["train_loss"]),
            _fmt((record["val"] or {}).get("value")), _fmt((record["test"] or {}).get("value")))


def _state_cell(record: dict) -> str:
    """The state cell: `unreadable: <reason>` or the state, with the bad lines skipped when there were any."""
    if record["state"] == "unreadable":
        return f"unreadable: {record['reason']}"
    n = record["bad_lines"]
    if n:
        return f"{record['state']} ({n} bad line{'s' if n > 1 else ''})"
    return f"{record['state']} ({record['note']})" if record["note"] else record["state"]


def cmd_sweep(args) -> int:
    from bcdcore.sweep import Sweep, detect_gpus

    recipe = load_recipe(args.recipe, args.overrides)
    if not recipe.sweep:
        raise RecipeError(f"{args.recipe}: has no [sweep] table; add one (e.g. \"algorithm.K\" = [1, 5]) "
                          "or use `bcdcore run`")
    if args.slurm:
        return _cluster_sweep(args, recipe)
    if args.per_gpu < 1:
        raise RecipeError(f"--per-gpu must be >= 1, got {args.per_gpu}")
    if args.gpus is not None:
        devices = [g.strip() for g in args.gpus.split(",") if g.strip()]
        if not devices or not all(g.isdigit() for g in devices):
            raise RecipeError(f"--gpus {args.gpus!r}: give GPU ids like 0,1")
    else:
        devices = detect_gpus() if recipe.run.device != "cpu" else []
    sweep = Sweep(Path(args.recipe), recipe, args.runs_dir or default_runs_dir(), devices or [None],
                  args.per_gpu, args.overrides)
    print(f"sweep directory: {sweep.dir} ({len(sweep.points)} runs, {len(sweep.slots)} slots)", flush=True)
    code = sweep.run(report=lambda line: print(line, flush=True))
    failed = sum(p.exit_code not in (0, None) for p in sweep.points)
    print(f"sweep {'stopped' if sweep.stop_signal else 'done'}: "
          f"{sum(p.exit_code == 0 for p in sweep.points)} finished, {failed} not finished", flush=True)
    return code


def _cluster_sweep(args, recipe) -> int:
    from bcdcore.cluster import ClusterOptions, ClusterSweep

    gpus = args.gpus_per_job if args.gpus_per_job is not None else (0 if recipe.run.device == "cpu" else 1)
    options = ClusterOptions(args.partition, gpus, args.time, args.account, args.slots_per_job, args.slurm_executor)
    options.check()
    sweep = ClusterSweep(Path(args.recipe), recipe, args.runs_dir or default_runs_dir(), options, args.overrides,
                         poll_s=1.0 if options.executor == "local" else 10.0)
    print(f"sweep directory: {sweep.dir} ({len(sweep.points)} runs in {len(sweep.jobs)} job(s))", flush=True)
    code = sweep.run(report=lambda line: print(line, flush=True))
    states = [j.state for j in sweep.jobs]
    print(f"sweep {'stopped' if sweep.stop_signal else 'done'}: "
          f"{sum(p['exit_code'] == 0 for p in sweep.points)} finished; jobs: "
          + ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states)), flush=True)
    return code


def cmd_plot(args) -> int:
    from bcdcore.plot import PlotError, plot_runs

    out = args.out or (args.runs[0] / "figures" / f"{args.y}_vs_{args.x}.png")
    try:
        plot_runs(args.runs, x=args.x, y=args.y, out=out, logy=args.logy, logx=args.logx, title=args.title)
    except PlotError as exc:
        raise RecipeError(str(exc)) from None
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    from bcdcore.export import ExportError, export_onnx

    try:
        path = export_onnx(args.run_dir)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} (onnx.checker passed; outputs match torch on a test batch)")
    return 0


def _fmt(value) -> str:
    from bcdcore.rundir import printable

    if isinstance(value, bool) or value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, (int, float)) else printable(str(value))


if __name__ == "__main__":
    sys.exit(main())
