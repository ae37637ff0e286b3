"""The client-facing gateway: admission, SLOs, continuous batching and the step loop."""
