"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest

from hf_svdkv.weight_svd import single_threaded


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole module (`pytestmark = pytest.mark.usefixtures("one_thread")`): on a small shared
    CPU, spinning BLAS / OpenMP threads make tiny ops and MKL SVDs take seconds."""
    with single_threaded():
        yield
