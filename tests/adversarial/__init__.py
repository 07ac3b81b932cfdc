"""Adversarial suite: hostile clients, failing upstreams, load and fuzzing against the real process."""
