"""Generated gRPC stubs of io_server.proto (regenerate with generate.sh in this folder)."""
