"""`vidistill pipeline ...` and `vidistill demo`, added to the `vidistill` command through the
`vidistill.commands` entry point (pyproject.toml), so the library never imports this package.

Only argparse is imported here; the handlers import kfp and the pipeline when they run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROFILES = ("tiny", "demo", "regime", "large")  # keys of runner.PROFILES (checked by tests/test_pipeline.py)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `demo` and `pipeline` subcommands to the `vidistill` parser; each sets `handler`."""
    demo = sub.add_parser("demo", help="the main job: the whole pipeline on synthetic data with kfp.local, then a summary")
    _local_run_flags(demo)
    demo.set_defaults(handler=_run)

    pipe = sub.add_parser("pipeline", help="compile (Kubeflow IR + dvc.yaml), run locally, or schedule the pipeline")
    psub = pipe.add_subparsers(dest="action", required=True)
    pc = psub.add_parser("compile", help="write the Kubeflow IR (pipeline.yaml) and dvc.yaml from params.yaml and the "
                                         "method registry")
    pc.add_argument("--params", default="params.yaml")
    pc.add_argument("--out", default="pipeline.yaml", help="Kubeflow IR YAML (default: pipeline.yaml)")
    pc.add_argument("--dvc", default=None, help="DVC stage file (default: dvc.yaml where the working directory is a "
                                                "checkout holding src/vidistill; '' = do not write it)")
    pc.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 naming each file that differs from what compile would write")
    pc.set_defaults(handler=_compile)
    pr = psub.add_parser("run", help="run the pipeline (--local: kfp.local.SubprocessRunner on this machine)")
    pr.add_argument("--local", action="store_true", required=True)
    _local_run_flags(pr)
    pr.set_defaults(handler=_run)
    ps = psub.add_parser("schedule", help="create a Kubeflow recurring run (6-field cron, one at a time, no catch-up)")
    ps.add_argument("--cron", required=True, help="6 fields, seconds first: '0 0 2 * * *' = every day at 02:00")
    ps.add_argument("--host", required=True, help="Kubeflow Pipelines API URL")
    ps.add_argument("--params", default="params.yaml")
    ps.add_argument("--job-name", default="vidistill-nightly")
    ps.set_defaults(handler=_schedule)


def _local_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="demo", choices=PROFILES)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--workdir", default=".", help="where data/, outputs/ and mlflow.db go")
    p.add_argument("--no-cache", action="store_true", help="recompute every task instead of reusing kfp.local's cache")


def _run(args: argparse.Namespace) -> int:
    from vidistill_pipeline.demo import run_demo

    run_demo(profile=args.profile, params=args.params, workdir=Path(args.workdir), cache=not args.no_cache)
    return 0


def _compile(args: argparse.Namespace) -> int:
    from vidistill_pipeline import dvc, runner

    outputs = {Path(args.out): lambda p: runner.compile_pipeline(p, params_file=args.params)}
    if args.dvc is None:
        args.dvc = "dvc.yaml" if dvc.library_inside(Path(args.params).resolve().parent) else ""
        if not args.dvc:
            print("dvc.yaml not written: the vidistill library is not inside this project (DVC stages list its code)")
    if args.dvc:
        outputs[Path(args.dvc)] = lambda p: dvc.write_dvc_yaml(p, params_file=args.params)
    if not args.check:
        for path, write in outputs.items():
            print(f"compiled {write(path)}")
        return 0
    import tempfile

    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        for path, write in outputs.items():
            fresh = write(Path(tmp) / path.name)
            if not path.exists() or _normalised(fresh) != _normalised(path):
                stale.append(str(path))
    if stale:
        print(f"vidistill pipeline compile: {', '.join(stale)} out of date; run `vidistill pipeline compile` and commit",
              file=sys.stderr)
        return 1
    print(f"up to date: {', '.join(str(p) for p in outputs)}")
    return 0


def _normalised(path: Path) -> list:
    """The YAML documents of `path` without the compiling kfp's version (which differs between installs)."""
    import yaml

    docs = list(yaml.safe_load_all(path.read_text()))
    return [{k: v for k, v in d.items() if k != "sdkVersion"} if isinstance(d, dict) else d for d in docs]


def _schedule(args: argparse.Namespace) -> int:
    from vidistill_pipeline import runner

    r = runner.schedule(args.host, cron=args.cron, params_file=args.params, job_name=args.job_name)
    print(f"recurring run {getattr(r, 'recurring_run_id', r)} created: {args.cron}")
    return 0
