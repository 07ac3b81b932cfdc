"""Tests of proxy.sources: locations, local/URL/AWS fetchers, and Material, against real servers on loopback."""
