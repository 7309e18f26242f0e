"""The wire: protobuf <-> domain conversion (`codec/`) and the long-lived gRPC streams (`streams`)."""
