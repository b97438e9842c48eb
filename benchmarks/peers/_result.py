"""What a peer script writes back to the benchmark: its measurements plus the peer's versions.

Imported by the scripts beside it (their folder is first on ``sys.path`` when run as scripts, in
the peer's own environment, which cannot import this repository).
"""

from __future__ import annotations

import json
from typing import Any


def write_result(out_path: str, **fields: Any) -> None:
    """``fields`` with the trl / transformers / torch versions and torch's thread count, as JSON."""
    import torch
    import transformers
    import trl

    versions = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    result = {**fields, "versions": versions, "threads": torch.get_num_threads()}
    with open(out_path, "w") as f:
        f.write(json.dumps(result, indent=1))
