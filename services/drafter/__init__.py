"""The draft service: proposers behind gRPC."""
