"""One demo-size pipeline run, shared by the slow demo tests.

``test_demo`` asserts the README's success criteria on it and ``test_pipeline`` checks that every
stage ran for real and that the report agrees with the stages' own outputs. One run of
``tritonrlhf.engine.demo.pipeline --size demo`` (what ``scripts/demo.sh`` runs) serves both, instead of a
second, smaller run: the suite's most expensive set-up happens once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """The run directory and the summary ``run_pipeline`` returned (size ``demo``, seed 0, with the
    teacher judge's AI labels and the RM on them: ``scripts/demo.sh RUN_DIR --rlaif``)."""
    from tritonrlhf.engine.demo.pipeline import run_pipeline

    run = tmp_path_factory.mktemp("demo") / "demo"
    return run, run_pipeline(run, size="demo", rlaif=True)
