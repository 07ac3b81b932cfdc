"""Shared pytest fixtures.

Owns: fixtures used by more than one test module.  Each section says what its fixtures build.
Must not: hold module-level mutable state; anything expensive is session-scoped and immutable.
"""

from __future__ import annotations

import pytest

from tests.pki import Pki

# ---- PKI: certificates, keys and CRLs for the whole session (see tests/pki.py) ---------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.build(tmp_path_factory.mktemp("pki"))
