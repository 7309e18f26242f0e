"""The model core: plain PyTorch, no transport. Imports torch and nothing of gRPC, Redis or protobuf."""
