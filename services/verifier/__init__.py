"""The verify service: the target model behind gRPC."""
