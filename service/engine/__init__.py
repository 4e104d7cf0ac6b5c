"""Model-agnostic explanation engine: torch and numpy only (no gRPC, no TorchServe)."""
