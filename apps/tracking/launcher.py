"""The ``hybridops-track`` console script: one line naming the missing extra instead of a traceback.

The app's modules need the ``[tracking]`` extra; this module imports none of them (the package's
``__init__`` is lazy) so that ``pip install hybridops`` without the extra still gets a clear answer.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import List, Optional

# The import names of setup.py's extras_require["tracking"] (Pillow comes with torchvision).
EXTRA_MODULES = ("numpy", "tqdm", "matplotlib", "torchvision", "PIL")


def missing_extra_modules() -> List[str]:
    """The modules of the ``[tracking]`` extra that cannot be imported."""
    return [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]


def main(argv: Optional[List[str]] = None) -> int:
    missing = missing_extra_modules()
    if missing:
        print(f"hybridops-track needs the [tracking] extra ({', '.join(missing)} not installed): "
              f"pip install 'hybridops[tracking]'", file=sys.stderr)
        return 1
    from .cli import main as cli_main
    return cli_main(argv)
