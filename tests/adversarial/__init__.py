"""Adversarial suite (issue 6): hostile clients, failing upstreams, load and fuzzing against the real process."""
