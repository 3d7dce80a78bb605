"""`python -m vidistill.serve --model models:/NAME@champion` (or a path to model.onnx)."""

import sys

from vidistill.serve.options import main

if __name__ == "__main__":
    sys.exit(main())
