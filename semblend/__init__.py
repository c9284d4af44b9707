"""SemBlend: engine adapters (``semblend.integration.*``) and the ``semblend`` CLI over ``semblend_core``."""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
