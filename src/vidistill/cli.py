"""The `vidistill` command: a thin edge over `vidistill.stages`.

Every stage command reads its section of `params.yaml` (`--params`), then applies command-line
flags, which are generated from the stage's config dataclass (`--epochs 3`, `--synth-domain 1`;
`--set section.key=value` reaches anything), validates, and calls one function in `stages`.

A mistake a user can fix (`vidistill.errors.UserError`: a bad parameter, a missing or broken file, an
output location that cannot be written or is in use, a loss that diverged) is printed as one line
naming the value or file and what to do, with exit status 2; `--debug` (or `VIDISTILL_DEBUG=1`)
shows its traceback. Any other exception is a bug and keeps its traceback. Ctrl-C and SIGTERM end
the stage's MLflow run as KILLED and exit with 130 / 143; `--resume` continues from the last
checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from vidistill import config as C
from vidistill.errors import Terminated, UserError

DEBUG_ENV = "VIDISTILL_DEBUG"

# command -> (params.yaml section, config class)
STAGE_CONFIGS: dict[str, tuple[str, type]] = {
    "synth": ("prep.synth", C.SynthConfig),
    "prep": ("prep", C.PrepConfig),
    "flow": ("flow", C.FlowConfig),
    "teach": ("teach", C.TeachConfig),
    "experts": ("experts", C.ExpertsConfig),
    "distill": ("distill", C.DistillConfig),
    "evaluate": ("evaluate", C.EvaluateConfig),
    "export": ("export", C.ExportConfig),
    "register": ("register", C.RegisterConfig),
}


def _leaf_fields(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dataclasses.Field]]:
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            out += _leaf_fields(type(default), prefix + (f.name,))
        elif not isinstance(default, dict):  # free-form sections (distill.methods) are reached with --set
            out.append((prefix + (f.name,), f))
    return out


def _flag(path: tuple[str, ...]) -> str:
    """`("epochs",)` -> `--epochs`; `("train", "epochs")` -> `--epochs`; `("synth", "domain")` -> `--synth-domain`."""
    parts = path[1:] if path[0] == "train" else path
    return "--" + "-".join(parts).rstrip("_").replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    for path, f in _leaf_fields(cls):
        flag = _flag(path)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        kind = type(default)
        help_text = f"(params: {'.'.join(path)}; default {default!r})"
        if kind is bool:
            parser.add_argument(flag, dest="cfg:" + ".".join(path), action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(flag, dest="cfg:" + ".".join(path), default=None, metavar=path[-1].upper(), help=help_text)


def build_config(section: str, cls: type, args: argparse.Namespace) -> Any:
    """dataclass defaults < params.yaml[section] < --set < flags; validated before returning."""
    data: Any = C.load_params(args.params)
    for key in section.split("."):
        if data and key not in data and section != STAGE_CONFIGS.get(args.command, (section,))[0]:
            raise C.ConfigError(f"{args.params} has no section {section!r}")
        data = (data or {}).get(key) or {}
    if not isinstance(data, dict):
        raise C.ConfigError(f"section {section!r} of {args.params} must be a mapping")
    data = json.loads(json.dumps(data))
    for item in args.set or []:
        if "=" not in item:
            raise C.ConfigError(f"--set takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        C.set_dotted(data, key.removeprefix(section + "."), value)
    for key, value in vars(args).items():
        if key.startswith("cfg:") and value is not None:
            C.set_dotted(data, key[4:], value)
    cfg = C.from_dict(cls, data, where=f"{section}.")
    cfg.validate()
    return cfg


def _print(obj: Any) -> None:
    from rich.console import Console

    Console().print_json(json.dumps(obj, default=str))


# ----------------------------------------------------------------------------------------------
# commands


def cmd_synth(cfg: C.SynthConfig, args: argparse.Namespace) -> None:
    from vidistill.data import generate

    path = generate(cfg, progress=not args.quiet, writer="synth")
    print(f"synthetic videos written to {path}")


def cmd_prep(cfg: C.PrepConfig, args: argparse.Namespace) -> None:
    from vidistill import stages

    s = stages.prep(cfg, progress=not args.quiet, track=not args.no_track)
    _summarise_prep(s)


def _summarise_prep(s: dict[str, Any]) -> None:
    splits = ", ".join(f"{k}: {v['clips']} clips / {v['videos']} videos" for k, v in s["splits"].items())
    print(f"prep: {splits} -> {s['out']} ({s.get('frames_per_s', 0):.0f} decoded frames/s)")
    if s["skipped"]:
        print(f"prep: {len(s['skipped'])} input(s) skipped:")
        for item in s["skipped"]:
            print(f"  - {item['file']}: {item['reason']}")
    if s.get("notes"):
        print(f"prep: {len(s['notes'])} file(s) used with fewer frames than declared or stored:")
        for item in s["notes"]:
            print(f"  - {item['file']}: {item['note']}")
    for warning in s.get("warnings", []):
        print(f"prep: warning: {warning}")


def cmd_flow(cfg: C.FlowConfig, args: argparse.Namespace) -> None:
    from vidistill import stages

    s = stages.flow(cfg, progress=not args.quiet, track=not args.no_track)
    print(f"flow: {s['pairs']} pairs in {s['seconds']:.1f} s ({s['pairs_per_s']:.1f} pairs/s) -> {cfg.out}; "
          f"{s['skipped_shards']} shard(s) already done; {s['failed']} clip(s) failed")
    if s["failed"]:
        print(f"flow: failed clips are stored as zero flow; {cfg.out}/manifest.json lists each with its reason")


def _scores(s: dict[str, Any]) -> str:
    """`top1 0.857 (mean class 0.500) top5 ... mAP ...`: mean class accuracy beside top-1, which alone hides
    a model that always answers the majority class."""
    mca = s.get("mean_class_accuracy")
    beside = f" (mean class {mca:.3f})" if isinstance(mca, float) else ""
    return f"top1 {s['top1']:.3f}{beside} top5 {s['top5']:.3f} mAP {s['mAP']:.3f}"


def cmd_teach(cfg: C.TeachConfig, args: argparse.Namespace) -> None:
    from vidistill import stages

    s = stages.teach(cfg, progress=not args.quiet, track=not args.no_track)
    if "heldout_loss" in s:  # a masked pretext: no classifier
        print(f"teach (--pretext {cfg.pretext}): held-out masked-reconstruction loss {s['heldout_loss_init']:.4f} "
              f"untrained -> {s['heldout_loss']:.4f} -> {s['model']}")
        return
    if "top1" not in s:  # a worker rank under torchrun: rank 0 reports
        return
    print(f"teach ({cfg.modality}): {_scores(s)} -> {s['model']}")


def cmd_experts(cfg: C.ExpertsConfig, args: argparse.Namespace) -> None:
    from vidistill import stages

    m = stages.experts(cfg, progress=not args.quiet, track=not args.no_track)
    for d in m["datasets"]:
        print(f"experts: {d['name']}: {len(d['classes'])} classes, {d['splits']['train']['clips']} train clips, "
              f"expert top1 {d['top1']:.3f} -> {cfg.out}/{d['expert']}")
    print(f"experts: every expert ran once over {m['encoder_clips']} clips; embeddings cached in {cfg.out}/embeddings")


def cmd_distill(cfg: C.DistillConfig, args: argparse.Namespace) -> None:
    from vidistill import stages

    s = stages.distill(cfg, progress=not args.quiet, track=not args.no_track)
    if "top1" not in s:  # a worker rank under torchrun: rank 0 reports
        return
    print(f"distill ({cfg.method}): {_scores(s)} -> {s['model']}")


def cmd_evaluate(cfg: C.EvaluateConfig, args: argparse.Namespace) -> None:
    from vidistill import stages

    m = stages.evaluate(cfg, track=not args.no_track)
    print(f"evaluate: {_scores(m)} -> {m['files']['metrics']}, {m['files']['confusion']}")


def cmd_export(cfg: C.ExportConfig, args: argparse.Namespace) -> None:
    from vidistill import stages

    r = stages.export(cfg, track=not args.no_track)
    p = r["parity"]
    print(f"export: {r['onnx']} (opset {cfg.opset}); parity on {p['n']} clips: max |diff| {p['max_abs_diff']:.2e}, "
          f"top-1 agreement {p['top1_agreement']:.3f} -> {'passed' if p['passed'] else 'FAILED'}")
    if r.get("int8"):  # issue 29: the int8 model's accuracy gate
        g = r["int8"]
        print(f"export: int8 {g['onnx']} ({g['bytes_int8'] / 1024:.0f} KiB vs {g['bytes_fp32'] / 1024:.0f}): top-1 {g['top1_int8']:.3f} "
              f"vs {g['top1_fp32']:.3f} (drop {g['drop_points']:.2f} points, allowed {g['max_drop_points']:g}), agreement "
              f"{g['top1_agreement']:.3f} on {g['n']} clips -> {'passed' if g['passed'] else 'REFUSED: not registered as int8'}")
    for name, folder in (r.get("repository") or {}).items():
        print(f"export: Triton/KServe model repository {name}: {folder}")


def cmd_register(cfg: C.RegisterConfig, args: argparse.Namespace) -> None:
    from vidistill import stages

    r = stages.register(cfg, track=not args.no_track)
    print(f"register: {cfg.model_name} version {r['version']}")
    if r["decision"]:
        _print(r["decision"])


COMMANDS: dict[str, Callable[[Any, argparse.Namespace], None]] = {
    "synth": cmd_synth, "prep": cmd_prep, "flow": cmd_flow, "teach": cmd_teach, "experts": cmd_experts, "distill": cmd_distill,
    "evaluate": cmd_evaluate, "export": cmd_export, "register": cmd_register,
}
HELP = {
    "synth": "generate the synthetic motion dataset (real encoded videos, folder layout)",
    "prep": "decode videos into fixed-size uint8 clip shards + manifest",
    "flow": "TV-L1 optical flow for every clip (stored as uint8, bound 20)",
    "teach": "train a teacher (RGB or flow stream) and evaluate it",
    "experts": "one expert per dataset (main + experts.datasets), frozen, and their cached embeddings of every dataset (jedi)",
    "distill": "train an RGB student with a distillation method (--method; see `vidistill methods`)",
    "export": "export a student to ONNX (dynamic batch) and check parity with PyTorch; fails loudly on mismatch",
    "register": "register an exported student in the MLflow registry and run the promotion gate",
    "evaluate": "top-1/top-5/mAP/per-class/confusion of one model or an ensemble (comma-separated checkpoints)",
}


PLUGIN_GROUP = "vidistill.commands"


def add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Subcommands of installed plugins (entry-point group `vidistill.commands`; e.g. `pipeline` and `demo`
    from the orchestration package). Each entry point is a function `register(subparsers)` whose
    subparsers set a `handler(args) -> int`. The library itself imports no plugin."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        ep.load()(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidistill", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of a user error too (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (section, cls) in STAGE_CONFIGS.items():
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        p.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml; missing = defaults)")
        p.add_argument("--section", default=section, help=f"params.yaml section to read (default {section!r})")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help=f"override any key of section {section!r}")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
        add_config_flags(p, cls)
    add_plugin_commands(sub)  # `pipeline` and `demo` come from the orchestration package
    promote = sub.add_parser("promote", help="gate a registered version: champion if parity passed and top-1 beats the champion by --margin")
    promote.add_argument("--model-name", required=True, help="registered model name (register.model_name)")
    promote.add_argument("--version", required=True, help="the registered version to gate")
    promote.add_argument("--margin", type=float, default=0.0,
                         help="top-1 the version must gain over the champion to replace it (default 0.0)")
    rollback = sub.add_parser("rollback", help="move the champion alias back to --version or the previous champion")
    rollback.add_argument("--model-name", required=True, help="registered model name (register.model_name)")
    rollback.add_argument("--version", default=None, help="version to make champion (default: the previous champion)")
    serve = sub.add_parser("serve", help="serve an ONNX student with ONNX Runtime: KServe v2 over REST (JSON, binary) and gRPC, video upload, metrics")
    from vidistill.serve.options import add_serve_arguments

    add_serve_arguments(serve)
    sub.add_parser("methods", help="list the registered distillation methods and their hyperparameters")
    bench = sub.add_parser("bench", help="benchmarks (numbers for the README)")
    from vidistill.benchmarks import BENCHMARKS

    bench.add_argument("what", choices=list(BENCHMARKS), help="which benchmark: " + ", ".join(BENCHMARKS))
    bench.add_argument("--quick", action="store_true", help="fewer items, for a smoke run")
    bench.add_argument("--json", help="also write the results to this JSON file")
    bench.add_argument("--set", action="append", metavar="NAME=VALUE",
                       help="a setting of the benchmark, e.g. methods: seeds=3, videos_per_class=96, methods=none,d3d, "
                            "sweep.d3d.lambda_=1,0.1 (every combination of a method's listed values)")
    return parser


def _list_methods() -> None:
    """`vidistill methods`: every registered method (plugins included) with its summary, hyperparameters
    and defaults, the model files it needs and the student it trains."""
    import dataclasses as dc

    from vidistill.distill import get_method, list_methods

    default_student = C.DistillConfig().student
    for key in list_methods():
        cls = get_method(key)
        hp = {f.name: f.default for f in dc.fields(cls.Params)}
        summary = cls.__doc__.strip().splitlines()[0] if cls.__doc__ else ""
        needs = ", ".join(cls.needs) or "no teacher"
        student = cls.student_preset or f"distill.student ({default_student})"
        print(f"{key:6s} {summary}  {hp}  needs: {needs}; student: {student}")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is the whole story: printed as one line, no traceback."""
    errors: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, ValueError, ImportError,
                                                FloatingPointError, PermissionError)
    if "vidistill.export.onnx" in sys.modules:
        errors += (sys.modules["vidistill.export.onnx"].ExportError,)
    return errors


def _tracking_error(exc: BaseException) -> str | None:
    """One line for an MLflow client error (server down, 401, 403, a Host header it refuses), else None."""
    if "mlflow" not in sys.modules:
        return None
    from vidistill.registry.tracking import tracking_error_message

    return tracking_error_message(exc)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
    from vidistill import interrupts

    restore = interrupts.install()  # Ctrl-C and SIGTERM end the MLflow run as KILLED, never mid-write
    try:
        if args.command in STAGE_CONFIGS:
            section, cls = STAGE_CONFIGS[args.command]
            cfg = build_config(args.section, cls, args)
            COMMANDS[args.command](cfg, args)
        elif getattr(args, "handler", None) is not None:  # a plugin's subcommand
            return args.handler(args)
        elif args.command in ("promote", "rollback"):
            from vidistill.registry.models import promote, rollback

            C.validate_model_name(args.model_name, "--model-name")
            if args.command == "promote":
                _print(promote(args.model_name, args.version, margin=args.margin))
            else:
                _print(rollback(args.model_name, args.version))
        elif args.command == "serve":
            from vidistill.serve.options import serve_from_args

            serve_from_args(args)
        elif args.command == "methods":
            _list_methods()
        elif args.command == "bench":
            from vidistill.benchmarks import run_bench

            results = run_bench(args.what, quick=args.quick, overrides=args.set)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    except Exception as exc:  # user-caused errors get one line; anything else is a bug and keeps its traceback
        tracking = _tracking_error(exc)
        if debug or not (tracking or isinstance(exc, _user_errors())):
            raise
        print(f"vidistill {args.command}: error: {tracking or _one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"vidistill {args.command}: {what}; rerun with --resume to continue from the last checkpoint",
              file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
