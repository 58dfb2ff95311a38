"""Shared fixtures: tiny seeded members on sklearn's digits (trained once per session)."""

from __future__ import annotations

import os

import pytest
import torch

from netmeld.demo.scenarios import Scenario, digits_scenario

os.environ.setdefault("NETMELD_PROGRESS", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))

TWO = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
THREE = [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]


@pytest.fixture(scope="session")
def digits2() -> Scenario:
    return digits_scenario(TWO, seed=0)


@pytest.fixture(scope="session")
def digits3() -> Scenario:
    return digits_scenario(THREE, seed=0)
