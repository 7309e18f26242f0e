"""What computes, with no transport: the stage runner, the expert runner, the in-process chain (torch, no gRPC)."""
