"""Fixtures shared by the integration tests that run on the shipped organism."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def shipped_organism():
    """``shapes-llava`` loaded once per module, run on one thread (the thread count is restored after)."""
    import haltrace

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: a second thread only adds contention for a 1M-parameter model
    try:
        yield haltrace.load("shapes-llava")
    finally:
        torch.set_num_threads(threads)
