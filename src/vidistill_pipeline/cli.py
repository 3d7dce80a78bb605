"""`vidistill pipeline ...` and `vidistill demo`, added to the `vidistill` command through the
`vidistill.commands` entry point (pyproject.toml), so the library never imports this package.

Only argparse is imported here; the handlers import kfp and the pipeline when they run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROFILES = ("default", "tiny", "demo", "large")  # keys of runner.PROFILES (checked by tests/test_pipeline.py)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `demo` and `pipeline` subcommands to the `vidistill` parser; each sets `handler`."""
    demo = sub.add_parser("demo", help="the main job: the whole pipeline on synthetic data with kfp.local, then a summary",
                          description="Run the whole pipeline on this machine (kfp.local), then print the comparison, "
                                      "the registration decision and where everything is.")
    _run_flags(demo, default_profile="demo")
    demo.set_defaults(handler=_run, local=True, host=None)

    pipe = sub.add_parser("pipeline", help="compile (Kubeflow IR + dvc.yaml), run locally or once on a cluster, or schedule")
    psub = pipe.add_subparsers(dest="action", required=True)
    pc = psub.add_parser("compile", help="write the Kubeflow IR (pipeline.yaml) and dvc.yaml from params.yaml and the "
                                         "method registry")
    pc.add_argument("--params", default="params.yaml", help="parameter file the pipeline's defaults come from "
                                                            "(default: params.yaml)")
    pc.add_argument("--out", default="pipeline.yaml", help="Kubeflow IR YAML (default: pipeline.yaml)")
    pc.add_argument("--dvc", default=None, help="DVC stage file (default: dvc.yaml where the working directory is a "
                                                "checkout holding src/vidistill; '' = do not write it)")
    pc.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 naming each file that differs from what compile would write")
    pc.set_defaults(handler=_compile)
    pr = psub.add_parser("run", help="run the pipeline: --local on this machine (kfp.local), or --host URL once on a "
                                     "Kubeflow Pipelines cluster",
                         description="Run the pipeline on this machine (--local) or submit one run to a Kubeflow "
                                     "Pipelines cluster (--host). --set reaches any key of params.yaml; every value is "
                                     "checked before any work starts. Cluster credentials come from the environment "
                                     "(VIDISTILL_KFP_TOKEN, VIDISTILL_KFP_COOKIES for a Kubeflow login, "
                                     "KF_PIPELINES_SA_TOKEN_PATH), never from flags.")
    where = pr.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="run every task on this machine with kfp.local's "
                                                            "SubprocessRunner")
    where.add_argument("--host", metavar="URL", help="Kubeflow Pipelines API URL: submit one run there and print its URL "
                                                     "and id")
    _run_flags(pr)
    cluster = pr.add_argument_group("cluster runs (--host)")
    cluster.add_argument("--experiment", default="vidistill", help="KFP experiment of the run, created when missing "
                                                                   "(default: vidistill)")
    cluster.add_argument("--run-name", default=None, help="display name of the run (default: pipeline.run_name and the "
                                                          "time)")
    cluster.add_argument("--wait", action="store_true", help="follow the run to its end; exit 1 unless it succeeded")
    cluster.add_argument("--poll", type=float, default=10.0, metavar="SECONDS",
                         help="seconds between status requests with --wait (default: 10)")
    cluster.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                         help="with --wait, stop waiting (exit 1) after this many seconds (default: no limit)")
    pr.set_defaults(handler=_run)
    ps = psub.add_parser("schedule", help="create a Kubeflow recurring run (6-field cron, one at a time, no catch-up)")
    ps.add_argument("--cron", required=True, help="6 fields, seconds first: '0 0 2 * * *' = every day at 02:00")
    ps.add_argument("--host", required=True, help="Kubeflow Pipelines API URL")
    _run_flags(ps, local=False)
    ps.add_argument("--experiment", default="vidistill", help="KFP experiment of the runs (default: vidistill)")
    ps.add_argument("--job-name", default="vidistill-nightly", help="name of the recurring run (default: vidistill-nightly)")
    ps.set_defaults(handler=_schedule)


def _run_flags(p: argparse.ArgumentParser, default_profile: str = "default", local: bool = True) -> None:
    p.add_argument("--profile", default=default_profile, choices=PROFILES,
                   help="preset overrides of params.yaml: default (params.yaml as it is), tiny (tests, ~minutes), "
                        "demo (make demo: the benchmark regime on the synthetic data, students labelled with 10 "
                        f"videos per class), large (a GPU pool); default: {default_profile}")
    p.add_argument("--params", default="params.yaml", help="parameter file to start from (default: params.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override any params.yaml key, after the profile; repeatable. The value is read as YAML: "
                        "--set prep.dataset=folder --set prep.root=/videos --set register.model_name=my-videos "
                        "--set 'pipeline.methods=[none, kd]'")
    if not local:
        return
    p.add_argument("--workdir", default=".", help="(local) where data/, runs/, outputs/ and mlflow.db go (default: .)")
    p.add_argument("--no-cache", action="store_true",
                   help="(local) recompute every task instead of reusing kfp.local's cache")


def _run(args: argparse.Namespace) -> int:
    from vidistill_pipeline.runner import parse_sets

    overrides = parse_sets(args.set)
    if getattr(args, "host", None):
        return _submit(args, overrides)
    from vidistill_pipeline.demo import run_demo
    from vidistill_pipeline.runner import PipelineFailed

    try:
        run_demo(profile=args.profile, params=args.params, workdir=Path(args.workdir), cache=not args.no_cache,
                 overrides=overrides)
    except PipelineFailed as exc:
        for task in exc.tasks:
            tail = task.tail()
            print(f"\ntask {task.label} failed after {task.seconds:.1f} s; the last {len(tail)} lines of its log:",
                  file=sys.stderr)
            print("\n".join(f"    {line}" for line in tail), file=sys.stderr)
            print(f"full log: {task.log}", file=sys.stderr)
            if task.error():
                print(f"error: {task.error()}", file=sys.stderr)
        print(f"vidistill {args.command}: the pipeline failed at {', '.join(t.label for t in exc.tasks)}", file=sys.stderr)
        return 1
    return 0


def _submit(args: argparse.Namespace, overrides: dict) -> int:
    import time

    from vidistill_pipeline.runner import resolve_params, submit, wait_for_run

    params = resolve_params(args.params, profile=args.profile, overrides=overrides, absolute=False)
    result = submit(args.host, params, experiment=args.experiment, run_name=args.run_name)
    print(f"submitted run {result['run_id']} ({result['name']!r}, experiment {result['experiment']!r})")
    print(f"run: {result['url']}", flush=True)
    if not args.wait:
        return 0
    try:
        state = wait_for_run(args.host, result["run_id"], poll_s=args.poll, timeout_s=args.timeout,
                             on_state=lambda s: print(f"  {time.strftime('%H:%M:%S')} {s}", flush=True))
    except TimeoutError as exc:
        print(f"vidistill pipeline run: {exc}", file=sys.stderr)
        return 1
    if state != "SUCCEEDED":
        print(f"vidistill pipeline run: run {result['run_id']} ended {state}: {result['url']}", file=sys.stderr)
        return 1
    print(f"run {result['run_id']} succeeded")
    return 0


def _compile(args: argparse.Namespace) -> int:
    from vidistill_pipeline import dvc, runner

    outputs = {Path(args.out): lambda p: runner.compile_pipeline(p, params_file=args.params)}
    if args.dvc is None:
        args.dvc = "dvc.yaml" if dvc.library_inside(Path(args.params).absolute().parent) else ""
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

    params = runner.resolve_params(args.params, profile=args.profile, overrides=runner.parse_sets(args.set), absolute=False)
    r = runner.schedule(args.host, params, cron=args.cron, experiment=args.experiment, job_name=args.job_name)
    print(f"recurring run {getattr(r, 'recurring_run_id', r)} created: {args.cron}")
    return 0
