"""tritonrlhf: fused Triton kernels for RLHF (``tritonrlhf.kernels``) and the engine that trains with them
(``tritonrlhf.engine``).

One import namespace, so nothing installed beside it (Hugging Face's ``kernels``, which transformers and
TRL import; any other ``engine``) can shadow it or be shadowed by it. A wheel holds both subpackages in
this folder. A checkout keeps them at the repository's top level (``kernels/``, ``engine/``; setup.py's
``package_dir`` maps them here), so when this file is the checkout's, the checkout's root joins this
package's search path and ``tritonrlhf.kernels`` is ``kernels/`` without an install.
"""

from __future__ import annotations

import sys
from pathlib import Path

__version__ = "0.1.0"

_HERE = Path(__file__).resolve().parent
_CHECKOUT = _HERE.parent
if not (_HERE / "engine").is_dir() and all(
    (_CHECKOUT / p / "__init__.py").is_file() for p in ("kernels", "engine")
):
    __path__.append(str(_CHECKOUT))  # noqa: F821 - a package's own search path


def _yield_bare_name(name: str) -> None:
    """Give the bare name ``name`` (``kernels``, ``engine``) to the installed package that owns it.

    Called when a checkout's ``kernels/`` or ``engine/`` folder is imported by its bare name, which
    happens when the checkout's root is on ``sys.path`` (``python -m`` or a script run from it). That
    name belongs to another distribution (``kernels`` is Hugging Face's kernel hub, which transformers
    imports when it is installed): load that one in its place, or raise ImportError naming ours.
    """
    import importlib.machinery
    import importlib.util

    ours = _CHECKOUT / name
    others = [p for p in sys.path if Path(p or ".").resolve() != _CHECKOUT]
    spec = importlib.machinery.PathFinder.find_spec(name, others)
    if spec is None or spec.loader is None:
        raise ImportError(
            f"no module named {name!r}: the folder {ours} is this project's 'tritonrlhf.{name}' "
            f"(import it as 'from tritonrlhf.{name} import ...')",
            name=name,
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
