"""edgetune's benchmark suite (not part of the installed package): run ``python -m benchmarks``
from a source checkout, or ``edgetune bench``. See ``benchmarks/suite.py``."""
