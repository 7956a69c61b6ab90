"""kdlab: a kernel developer's debug lab served over D-Bus."""

__version__ = "0.1.0"
