"""The `handoff.v1` protobuf messages (`handoff_pb2`) and gRPC stubs, generated at build time."""
