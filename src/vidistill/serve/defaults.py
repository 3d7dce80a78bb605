"""Serving defaults shared by the command line (`options`) and the server (`app`); no imports, so the
`vidistill` parser stays fast and neither module imports the other at load time."""

DEFAULT_MAX_BODY_MB = 32.0
DEFAULT_GRPC_PORT = 8081
