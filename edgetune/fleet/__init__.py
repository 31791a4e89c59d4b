"""Fleets: Skip2-LoRA (and the other small-adapter methods) across many devices on Flower.

The optional extra ``edgetune[fleet]`` installs Flower. Nothing outside this package
imports it, and inside it only ``apps.py`` and ``runner.py`` do, when they are used:
``partition.py`` (which samples each device holds), ``aggregate.py`` (screening and
averaging) and ``device.py`` (one device's training with its cache kept) are NumPy only.
See docs/fleet.md.
"""
from __future__ import annotations

from ..errors import EdgetuneError

INSTALL_HINT = 'pip install "edgetune[fleet]"'


class FleetUnavailable(EdgetuneError):
    """Flower is not installed."""


def require_flwr() -> None:
    """Raise FleetUnavailable, saying which extra to install, unless Flower imports."""
    try:
        import flwr  # noqa: F401
    except ImportError as e:
        raise FleetUnavailable(f"fleets need Flower, which is not installed ({e}); install it with: "
                               f"{INSTALL_HINT}") from None


def require_simulation() -> None:
    """Raise FleetUnavailable unless Flower's simulation engine can run: it needs Ray, which
    the ``fleet-device`` extra leaves out (Flower itself would only print "Exit Code: 701")."""
    require_flwr()
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise FleetUnavailable(f"'fleet simulate' needs Flower's simulation engine (Ray), which is not installed "
                               f"(the fleet-device extra leaves it out); install it with: {INSTALL_HINT}")
