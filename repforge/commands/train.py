"""`repforge pretrain|finetune|sweep|runs`: training jobs (Ray Train), sweeps (Ray Tune), run reports."""

from __future__ import annotations

from repforge.commands.common import job_config, job_parser


def register(commands) -> dict:
    job_parser(commands, "pretrain", "self-supervised pretraining (Ray Train)")
    job_parser(commands, "finetune", "PEFT fine-tuning with a linear head (Ray Train)")
    sweep = job_parser(commands, "sweep", "hyperparameter and rank search (Ray Tune)")
    sweep.add_argument(
        "--job", choices=["finetune", "pretrain"], default="finetune", help="what each trial runs"
    )
    sweep.add_argument(
        "--resume", action="store_true", help="continue an interrupted sweep of the same run.name"
    )
    runs = commands.add_parser("runs", help="inspect training runs")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True, metavar="SUBCOMMAND")
    show = runs_commands.add_parser("show", help="print a run's metrics; write curves.png beside them")
    show.add_argument("run", help="run folder, or a run name under --storage")
    show.add_argument("--storage", default="runs", help="storage root of bare run names")
    return {"pretrain": run_train, "finetune": run_train, "sweep": run_sweep, "runs": run_runs}


def run_train(args) -> str:
    from system.train import run_training

    published = run_training(job_config(args), args.command)
    for name, uri in published.items():
        print(f"{name}: {uri}")
    return published["model"]


def run_sweep(args) -> str:
    from tune.sweep import run_sweep as sweep

    return sweep(job_config(args), job=args.job, resume=args.resume)


def run_runs(args) -> str:
    from system.train.runs import show_run

    return show_run(args.run, args.storage)
