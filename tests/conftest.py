"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture()
def one_cpu_thread():
    """Run torch on one intra-op thread: tiny models gain nothing from threads, and on a shared 2-core
    machine they only contend (a 200-step run went from 30 s to 6.5 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
