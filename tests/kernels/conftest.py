"""Run every kernel test once per device in ``DEVICES`` (CPU, plus CUDA where present).

The autouse ``device`` fixture makes that device torch's default for the test's body,
so tensors the tests build land on it without each test naming it. Tests marked
``cuda`` run on CUDA only and skip, with the reason, on a machine without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DEVICES

NO_CUDA = "needs a CUDA GPU (run scripts/gpu_check.sh on the GPU machine)"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" not in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("cuda") is not None:
        params = [
            pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))
        ]
    else:
        params = DEVICES
    metafunc.parametrize("device", params, indirect=True)


@pytest.fixture(autouse=True)
def device(request: pytest.FixtureRequest):
    """The device this test instance runs on, made torch's default device meanwhile."""
    with torch.device(request.param):
        yield request.param
