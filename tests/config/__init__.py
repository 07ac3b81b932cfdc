"""Tests of proxy.config: one file per module (loader, rules, values, model)."""
