"""The wine table scenario, made once per test session and shared by the test modules."""

from __future__ import annotations

import functools

from netmeld.demo.scenarios import TableScenario, table_scenario


@functools.cache
def wine_scenario() -> TableScenario:
    """Two MLP members reading alternate columns of sklearn's wine table (tests must not
    change them)."""
    return table_scenario("wine", seed=0)
