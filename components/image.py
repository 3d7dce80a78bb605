"""The container images components run in (built from docker/; see docker/README.md).

Set at compile time: VIDISTILL_IMAGE_REGISTRY (default `ghcr.io/vidistill`) and
VIDISTILL_IMAGE_TAG (default the package version). GPU steps use the CUDA image.
"""

import os

from vidistill import __version__

REGISTRY = os.environ.get("VIDISTILL_IMAGE_REGISTRY", "ghcr.io/vidistill")
TAG = os.environ.get("VIDISTILL_IMAGE_TAG", __version__)
CPU_IMAGE = f"{REGISTRY}/vidistill:{TAG}-cpu"
CUDA_IMAGE = f"{REGISTRY}/vidistill:{TAG}-cuda"
