"""CLI and params.yaml: precedence, validation before work, clear one-line errors."""

import pytest

from vidistill import cli
from vidistill.config import ConfigError, PrepConfig, TeachConfig, from_dict


def _cfg(argv, section, cls):
    args = cli.build_parser().parse_args(argv)
    return cli.build_config(section, cls, args)


def test_precedence_defaults_params_flags(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("teach:\n  model: r2plus1d_student\n  train:\n    epochs: 7\n    lr: 0.01\n")
    cfg = _cfg(["teach", "--params", str(params), "--epochs", "3", "--set", "train.seed=5"], "teach", TeachConfig)
    assert cfg.train.epochs == 3  # flag beats params.yaml
    assert cfg.train.lr == 0.01  # params.yaml beats default
    assert cfg.train.seed == 5  # --set
    assert cfg.model == "r2plus1d_student"
    assert cfg.out == "runs/teacher_rgb"  # derived default
    assert cfg.train.batch_size == TeachConfig().train.batch_size


def test_nested_flags_and_bools(tmp_path):
    cfg = _cfg(["prep", "--params", str(tmp_path / "none.yaml"), "--synth-domain", "2", "--frames", "4"], "prep", PrepConfig)
    assert cfg.synth.domain == 2 and cfg.frames == 4
    cfg = _cfg(["teach", "--params", str(tmp_path / "none.yaml"), "--hflip"], "teach", TeachConfig)
    assert cfg.train.hflip is True


@pytest.mark.parametrize("argv, message", [
    (["prep", "--dataset", "kinetics"], "prep.dataset must be one of"),
    (["prep", "--crop", "128", "--short-side", "64"], "short_side"),
    (["prep", "--frames", "abc"], "frames must be a int"),
    (["teach", "--model", "resnet9000"], "not a registered model"),
    (["teach", "--epochs", "0"], "epochs must be >= 1"),
    (["teach", "--set", "train.nonsense=1"], "unknown key"),
    (["prep", "--root", "data/a", "--synth-out", "data/b"], "prep.synth.out (data/b) differs from prep.root"),
])
def test_bad_parameters_are_refused_before_work(argv, message, tmp_path, capsys):
    rc = cli.main(argv + ["--params", str(tmp_path / "none.yaml"), "--no-track"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ConfigError, match="prep.bogus"):
        from_dict(PrepConfig, {"bogus": 1}, where="prep.")


def test_shipped_params_yaml_is_valid():
    from pathlib import Path

    from vidistill.config import load_params

    params = load_params(Path(__file__).parents[1] / "params.yaml")
    for command, (section, cls) in cli.STAGE_CONFIGS.items():
        data = params
        for key in section.split("."):
            data = data[key]
        from_dict(cls, data, where=f"{section}.").validate()


def test_bench_settings_are_typed_by_the_benchmark_and_checked_before_work(capsys):
    from vidistill.benchmarks import bench_overrides
    from vidistill.benchmarks.methods import bench_methods
    from vidistill.flow.bench import bench_flow

    assert bench_overrides(bench_methods, ["seeds=2", "sweep.sd.lambda_=0,1.5", "sweep.toy.beta=1", "methods=none,d3d"]) == {
        "seeds": 2, "sweep": {"sd": {"lambda_": ["0", "1.5"]}, "toy": {"beta": ["1"]}}, "methods": ("none", "d3d")}
    assert bench_overrides(bench_flow, ["pairs=8", "backends=opencv"]) == {"pairs": 8, "backends": ("opencv",)}
    for item, message in (("nonsense=1", "unknown benchmark setting 'nonsense'; valid: "), ("seeds=two", "seeds='two'"),
                          ("sweep=1", "takes dotted keys"), ("sweep.d3d.gamma=1", "unknown hyperparameter sweep.d3d.gamma"),
                          ("sweep.d4d.x=1", "sweep names method(s) d4d")):
        assert cli.main(["bench", "methods", "--set", item]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_methods_lists_every_registered_method_plugins_included(capsys):
    from vidistill.distill import list_methods

    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.strip().splitlines()]
    assert listed == list_methods() and "toy" in listed  # toy: an entry point of tests/plugins
    toy = next(line for line in out.splitlines() if line.startswith("toy"))
    assert "'beta': 0.5" in toy and "needs: teacher_rgb" in toy and "student: toy_composite" in toy
