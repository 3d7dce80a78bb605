"""The container images components run in (built from docker/; see docker/README.md).

Set at compile time: VIDISTILL_IMAGE_REGISTRY (default `localhost:5000`, as docker/build.sh) and
VIDISTILL_IMAGE_TAG (default the package version). GPU steps use the CUDA image.
"""

import os

from vidistill import __version__

REGISTRY = os.environ.get("VIDISTILL_IMAGE_REGISTRY", "localhost:5000")  # same default as docker/build.sh
TAG = os.environ.get("VIDISTILL_IMAGE_TAG", __version__)
CPU_IMAGE = f"{REGISTRY}/vidistill:{TAG}-cpu"
CUDA_IMAGE = f"{REGISTRY}/vidistill:{TAG}-cuda"
