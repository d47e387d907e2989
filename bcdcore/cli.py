"""`bcdcore`: the headless command line. Recipe errors exit 2 with one line on stderr and no traceback."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from bcdcore.cli_runs import cmd_ls, cmd_tag
from bcdcore.nodeflags import load_with_flags, node_overrides, resume_recipe
from bcdcore.recipe import RecipeError, expand_grid, load_recipe, os_reason, toml_value
from bcdcore.rundir import RunLockedError, default_runs_dir
from bcdcore.runref import resolve_run


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bcdcore", description="Block coordinate descent workstation engine")
    parser.add_argument("--plugins", action="append", default=[], metavar="DIR",
                        help="a folder of your own packages (models, datasets, solvers, stoppers named by dotted "
                             "path in recipes); added to sys.path and to PYTHONPATH for the runs it starts")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run one recipe")
    run.add_argument("recipe", nargs="?", help="recipe .toml (omit with --resume)")
    run.add_argument("--runs-dir", type=Path, default=None, help="where run directories go (default ./runs or $BCD_RUNS)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one recipe key, e.g. --set algorithm.K=5 (repeatable)")
    run.add_argument("--resume", default=None, metavar="RUN",
                     help="continue a killed run (a run directory, or a run id looked up in --runs-dir)")
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
    ls.add_argument("--state", action="append", default=[], metavar="STATE[,STATE]",
                    help="only runs in these states (running, finished, failed, killed, lost, ...; repeatable)")
    ls.add_argument("--tag", action="append", default=[], metavar="TAG",
                    help="only runs with this tag (repeatable: all must match)")
    ls.add_argument("--json", action="store_true",
                    help="a JSON list of runs (id, display id, path, state, reason, lock holder, metrics, tags, "
                         "name, notes)")

    tag = sub.add_parser("tag", help="tag, name or annotate a run (RUN_DIR/annotations.json)")
    tag.add_argument("run", metavar="RUN", help="a run directory, or a run id / display id (prefix) in --runs-dir")
    tag.add_argument("--runs-dir", type=Path, default=None, help="where to look RUN up (default ./runs or $BCD_RUNS)")
    tag.add_argument("--add", action="extend", nargs="+", default=[], metavar="TAG", help="add tags")
    tag.add_argument("--remove", action="extend", nargs="+", default=[], metavar="TAG", help="remove tags")
    tag.add_argument("--name", default=None, help="a display name shown in place of the recipe's (\"\" clears it)")
    tag.add_argument("--notes", default=None, help="replace the notes (\"\" clears them)")
    tag.add_argument("--notes-file", default=None, metavar="FILE",
                     help="replace the notes with a file's text (- reads stdin)")

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
    plot.add_argument("runs", nargs="+", metavar="RUN", help="run directories or run ids (looked up in --runs-dir)")
    plot.add_argument("--runs-dir", type=Path, default=None,
                      help="where run ids are looked up (default ./runs or $BCD_RUNS)")
    plot.add_argument("--x", default="grad_evals", help="grad_evals | flops | samples | wall_s | round | bytes_comm | sim_time_s")
    plot.add_argument("--y", default="train_loss", help="a metric, e.g. train_loss, val_loss, val_acc")
    plot.add_argument("--out", type=Path, default=None, help=".png or .pdf (default: figures/ of the first run)")
    plot.add_argument("--logy", action="store_true", help="log-scale y axis")
    plot.add_argument("--logx", action="store_true", help="log-scale x axis")
    plot.add_argument("--title", default=None)
    plot.add_argument("--smooth", type=float, default=0.0, metavar="F",
                      help="EMA smoothing factor in [0, 1) (0: raw); the raw curve is drawn faint under it")

    export = sub.add_parser("export", help="export a run's trained model")
    export.add_argument("run_dir", metavar="RUN", help="a run directory or a run id (looked up in --runs-dir)")
    export.add_argument("--runs-dir", type=Path, default=None)
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
                "export": cmd_export, "tag": cmd_tag}
    try:
        if args.plugins:
            from bcdcore.plugins import add_plugin_dirs

            add_plugin_dirs(args.plugins)
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
            point_recipe = load_recipe(args.recipe, [*args.overrides,
                                                     *(f"{k}={toml_value(v)}" for k, v in point.items())])
            prepare(point_recipe)
            _check_stoppers(point_recipe)
        print(f"ok: {args.recipe} (sweep of {len(points)} runs over {', '.join(recipe.sweep)})")
        return 0
    prepared = prepare(recipe)
    _check_stoppers(recipe)
    from bcdcore.recipe.plugin_keys import plugin_names

    checked = plugin_names(recipe)  # each imported, its kind, signature and return checked by prepare
    print(f"ok: {args.recipe} ({recipe.model.name}, {prepared.params.n_blocks} blocks, "
          f"{recipe.data.name}, {recipe.algorithm.mode}/{recipe.algorithm.schedule}, ops {prepared.backend})"
          + (f"; {len(checked)} plugins checked" if checked else ""))
    return 0


def _check_stoppers(recipe) -> None:
    """Plugin stoppers are created (imported, their signature checked) as the run will create them."""
    from bcdcore.stoppers import build_stoppers

    build_stoppers(recipe.stop, recipe.run.wall_time_s)


def _announce(line: str) -> None:
    print(line, flush=True)


def _resume_nproc(path: Path, key: str = "nproc") -> int:
    try:
        return getattr(load_recipe(Path(path) / "recipe.toml").distributed, key)
    except (RecipeError, OSError):
        return 1  # resume_run says what is wrong


def _node_flags(args) -> list[str]:
    return node_overrides(args.nnodes, args.node_rank, args.rdzv)


def _exit_rank(code: int) -> NoReturn:
    """A rank's end after its part of the run is done and recorded: output and logs flushed, then out without
    the interpreter's teardown, where a thread of the process group's C++ side can still be joinable and
    std::terminate aborts the rank (SIGABRT) after a finished run (seen once in ~40 two-rank runs here)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def cmd_run(args) -> int:
    if args.attach is not None:
        from bcdcore.run import run_rank

        _exit_rank(run_rank(args.attach, args.attach_resume, None, None, None, args.quiet, _announce))
    if args.resume is not None:
        if args.recipe or args.overrides:
            raise RecipeError("--resume continues a run with its own recipe; drop the RECIPE and --set arguments")
        args.resume = resolve_run(args.resume, args.runs_dir or default_runs_dir())
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

        _exit_rank(run_rank(None, False, None if args.resume else recipe, args.runs_dir or default_runs_dir(),
                            args.resume, args.quiet, _announce))
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
    from bcdcore.run.console import PlainConsole

    run = resume_run(args.resume) if recipe is None else start_run(recipe, args.runs_dir or default_runs_dir())
    print(f"run directory: {run.rundir.path}", flush=True)
    # a terminal gets a live bar (on stderr); a pipe or a file gets one plain line per evaluation on stdout
    console = None if args.quiet else Console(stderr=True) if sys.stdout.isatty() else PlainConsole(sys.stdout)
    code = run.execute(console)
    print(final_summary(run.state, run.reason, getattr(run, "final_metrics", None)), flush=True)
    return code


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
    from bcdcore.plugins import share_sys_path

    share_sys_path()  # every point imports the plugins this process can
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

    runs = [resolve_run(ref, args.runs_dir or default_runs_dir()) for ref in args.runs]
    out = args.out or (runs[0] / "figures" / f"{args.y}_vs_{args.x}.png")
    try:
        plot_runs(runs, x=args.x, y=args.y, out=out, logy=args.logy, logx=args.logx, title=args.title,
                  smooth=args.smooth)
    except PlotError as exc:
        raise RecipeError(str(exc)) from None
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    from bcdcore.export import ExportError, export_onnx

    try:
        path = export_onnx(resolve_run(args.run_dir, args.runs_dir or default_runs_dir()))
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} (onnx.checker passed; outputs match torch on a test batch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
