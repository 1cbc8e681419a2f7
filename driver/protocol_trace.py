"""pyserial URL handler ``trace://DEVICE#file=PATH&echo=1``: any device, every frame recorded.

pyserial finds this module by the scheme's name (the driver registers the package
through the ``nvcim.url_handlers`` entry point); the port itself is ``trace.TracingSerial``.
"""

from .trace import TracingSerial as Serial

__all__ = ["Serial"]
