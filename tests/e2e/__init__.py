"""End-to-end tests: one file per operator-visible behaviour, real TLS, real upstreams, real clients."""
