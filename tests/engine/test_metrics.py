"""metrics.jsonl: a resumed run drops the rows its killed predecessor logged past the checkpoint."""

from __future__ import annotations

import json

from tritonrlhf.engine.metrics import drop_rows_after


def test_drop_rows_after_keeps_up_to_the_step_and_drops_a_torn_line(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(rows) + '\n{"step": 5, "lo')  # killed while writing step 5
    drop_rows_after(path, 3)
    assert path.read_text() == "\n".join(rows[:3]) + "\n"
    drop_rows_after(path, 3)  # nothing more to drop: the file is left as it is
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    drop_rows_after(tmp_path / "missing.jsonl", 3)  # no log yet: nothing to do
    assert not (tmp_path / "missing.jsonl").exists()
