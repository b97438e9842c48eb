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


def _yield_bare_name(name: str, module: dict) -> None:
    """Give the bare name ``name`` (``kernels``, ``engine``) to the installed package that owns it.

    Called (with the module's globals) when a checkout's ``kernels/`` or ``engine/`` folder is
    imported by its bare name, which happens when the checkout's root is on ``sys.path``
    (``python -m`` or a script run from it, the tests). That name belongs to another distribution
    (``kernels`` is Hugging Face's kernel hub, which transformers imports when it is installed): load
    that one in its place. Without one, the module stays empty, with no ``__file__`` (transformers'
    availability probe then reads it as no installation), and any name read from it raises
    AttributeError naming ``tritonrlhf.<name>``.
    """
    import importlib.machinery
    import importlib.util

    ours = _CHECKOUT / name
    others = [p for p in sys.path if Path(p or ".").resolve() != _CHECKOUT]
    spec = importlib.machinery.PathFinder.find_spec(name, others)
    if spec is None or spec.loader is None:
        message = (
            f"the folder {ours} is this project's 'tritonrlhf.{name}', not a top-level '{name}' "
            f"(import it as 'from tritonrlhf.{name} import ...')"
        )

        def __getattr__(attr: str):
            raise AttributeError(f"module {name!r} has no attribute {attr!r}: {message}")

        module.update(__file__=None, __path__=[], __getattr__=__getattr__)
        return
    other = importlib.util.module_from_spec(spec)
    sys.modules[name] = other
    try:
        spec.loader.exec_module(other)
    except BaseException:
        sys.modules.pop(name, None)
        raise
