"""narrows: a PyTorch toolkit for the bottlenecks of deep vision models.

Importing this package is cheap: it does not import torch, timm, matplotlib or any
optional dependency. Import the sub-packages (``narrows.models``, ``narrows.data``, ...)
for the API.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
