"""What the drafter and the verifier services share: their configuration, model loading, the
servicer base with the serve loop, and the compute thread that keeps model calls off the event loop."""
