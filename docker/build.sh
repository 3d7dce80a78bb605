#!/usr/bin/env bash
# Build (and optionally push) the vidistill images:
#   ${REGISTRY}/${IMAGE}:${VERSION}-cpu     Kubeflow components on CPU   (Dockerfile.cpu, target runtime)
#   ${REGISTRY}/${IMAGE}:${VERSION}-serve   ONNX Runtime serving         (Dockerfile.cpu, target serve)
#   ${REGISTRY}/${IMAGE}:${VERSION}-cuda    GPU components, PyTorchJob   (Dockerfile.cuda)
#   ${REGISTRY}/${IMAGE}:${VERSION}-mlflow  MLflow tracking server       (Dockerfile.mlflow)
#
# Usage: docker/build.sh [--push] [--dry-run] [FLAVOUR...]      FLAVOUR: cpu serve cuda mlflow (default: all)
# Environment:
#   REGISTRY         registry/namespace prefix (default: localhost:5000; e.g. us-docker.pkg.dev/PROJECT/vidistill)
#   IMAGE            repository name (default: vidistill)
#   VERSION          tag prefix (default: the version in pyproject.toml)
#   TORCH_INDEX_URL  wheel index for torch in the CPU images (default: PyTorch's CPU index)
#   PLATFORM         target platform (default: linux/amd64)
#   DOCKER           container CLI (default: docker; podman works too)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

push=0
dry_run=0
flavours=()
for arg in "$@"; do
    case "$arg" in
        --push) push=1 ;;
        --dry-run) dry_run=1 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        cpu|serve|cuda|mlflow) flavours+=("$arg") ;;
        *) echo "build.sh: unknown argument '$arg' (flavours: cpu serve cuda mlflow; flags: --push --dry-run)" >&2; exit 2 ;;
    esac
done
if [ "${#flavours[@]}" -eq 0 ]; then
    flavours=(cpu serve cuda mlflow)
fi

default_version="$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)"
REGISTRY="${REGISTRY:-localhost:5000}"
IMAGE="${IMAGE:-vidistill}"
VERSION="${VERSION:-$default_version}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
PLATFORM="${PLATFORM:-linux/amd64}"
DOCKER="${DOCKER:-docker}"
if [ -z "$VERSION" ]; then
    echo "build.sh: no VERSION given and none found in pyproject.toml" >&2
    exit 2
fi
REGISTRY="${REGISTRY%/}"
revision="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

run() {
    if [ "$dry_run" -eq 1 ]; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}

for flavour in "${flavours[@]}"; do
    case "$flavour" in
        cpu) file=docker/Dockerfile.cpu; target=runtime; extra=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL") ;;
        serve) file=docker/Dockerfile.cpu; target=serve; extra=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL") ;;
        cuda) file=docker/Dockerfile.cuda; target=runtime; extra=() ;;
        mlflow) file=docker/Dockerfile.mlflow; target=runtime; extra=() ;;
    esac
    tag="$REGISTRY/$IMAGE:$VERSION-$flavour"
    echo "== $flavour: $tag" >&2
    run "$DOCKER" build --file "$file" --target "$target" --platform "$PLATFORM" \
        --build-arg "VERSION=$VERSION" --build-arg "REVISION=$revision" --build-arg "CREATED=$created" \
        "${extra[@]}" --tag "$tag" .
    if [ "$push" -eq 1 ]; then
        run "$DOCKER" push "$tag"
    fi
done
