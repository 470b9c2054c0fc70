"""Self-supervised objectives: small modules with a scalar ``forward`` (losses) or explicit state
updates (centering), combined by the meta-architectures that the trainer drives."""
