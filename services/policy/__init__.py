"""The policy brain: learns step costs and draft survival from telemetry, publishes the strategy."""
