"""The other candidate, measured and not chosen: the student behind the `kserve` SDK's ModelServer.

Kept so the comparison in the README can be rerun. It does not import vidistill (the `kserve` SDK
caps pandas < 3 and psutil < 6, which conflict with the project's pins, so it runs in its own
virtual environment):

    python3.11 -m venv /tmp/kserve-venv
    /tmp/kserve-venv/bin/pip install kserve==0.21.0 onnxruntime==1.31.1
    /tmp/kserve-venv/bin/python src/vidistill/serve/kserve_candidate.py --onnx model.onnx \\
        --model_name bench --http_port 8090 --grpc_port 8091

then `python -m vidistill.serve.conformance --http 127.0.0.1:8090 --grpc 127.0.0.1:8091 --model bench
--onnx model.onnx` and `vidistill bench serve --set kserve_python=/tmp/kserve-venv/bin/python`.

The model implements what a user of the SDK has to write: metadata (`get_input_types` and
`get_output_types`, empty otherwise), the shape/datatype/output-name checks (the SDK does none),
requested-output filtering. The SDK provides REST v1/v2, the binary extension, gRPC and /metrics.
"""

from __future__ import annotations

import argparse
import sys
import uuid

import numpy as np
import onnxruntime as ort

import kserve
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.errors import InvalidInput


class OnnxStudent(Model):
    """An exported vidistill student (one FP32 input (B, 3, T, H, W), FP32 outputs) on ONNX Runtime."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.session: ort.InferenceSession | None = None
        self.load()

    def load(self) -> bool:
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.inp = self.session.get_inputs()[0]
        self.outs = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return self.ready

    @staticmethod
    def _meta(v: ort.NodeArg) -> dict:
        return {"name": v.name, "datatype": "FP32", "shape": [d if isinstance(d, int) else -1 for d in v.shape]}

    def get_input_types(self) -> list[dict]:
        return [self._meta(self.inp)]

    def get_output_types(self) -> list[dict]:
        return [self._meta(o) for o in self.session.get_outputs()]

    async def predict(self, payload: InferRequest, headers: dict | None = None, response_headers: dict | None = None) -> InferResponse:
        if len(payload.inputs) != 1 or payload.inputs[0].name != self.inp.name:
            raise InvalidInput(f"expected one input named {self.inp.name!r}")
        t = payload.inputs[0]
        if t.datatype != "FP32":
            raise InvalidInput(f"input datatype must be FP32, got {t.datatype}")
        fixed = [d for d in self.inp.shape[1:]]
        if len(t.shape) != 5 or list(t.shape[1:]) != fixed:
            raise InvalidInput(f"wrong shape {t.shape}, expected [B, {fixed}]")
        wanted = [o.name for o in payload.request_outputs] if payload.request_outputs else list(self.outs)
        unknown = [n for n in wanted if n not in self.outs]
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}")
        x = np.ascontiguousarray(t.as_numpy(), dtype=np.float32)
        if not np.isfinite(x).all():
            raise InvalidInput("NaN/Inf in the input")
        results = dict(zip(self.outs, self.session.run(self.outs, {self.inp.name: x}), strict=True))
        outputs = [InferOutput(name=n, shape=list(results[n].shape), datatype="FP32", data=results[n]) for n in wanted]
        return InferResponse(
            response_id=payload.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=outputs, model_version=payload.model_version,
            requested_outputs=payload.request_outputs, use_binary_outputs=bool((payload.parameters or {}).get("binary_data_output")),
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--onnx", required=True)
    args, _ = parser.parse_known_args()
    model = OnnxStudent(args.model_name, args.onnx)
    sys.exit(ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1).start([model]))
