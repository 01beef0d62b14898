#!/usr/bin/env bash
# Regenerates the committed Python stubs of io_server/proto/io_server.proto.
# Run from anywhere: `bash io_server/proto/generate.sh` (needs grpcio-tools, the `dev` extra).
# Generating with the repository root as the include path (-I.) makes the generated
# io_server_pb2_grpc.py import `from io_server.proto import io_server_pb2` (a package import).
# The generated code checks the protobuf runtime version at import (see the
# `ValidateProtobufRuntimeVersion` line in io_server_pb2.py); keep pyproject's `protobuf>=` at
# least that version.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m grpc_tools.protoc -I. \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  io_server/proto/io_server.proto
