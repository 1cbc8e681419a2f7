"""nvcim: a virtual non-volatile compute-in-memory DNN accelerator.

One distribution, one namespace; each part lives in its own top-level folder of the
repository and is installed under this package:

- ``nvcim.firmware_emu.contract``: the chip's contract (register map, wire protocol,
  program format), the floor everything else stands on;
- ``nvcim.compiler``: ONNX to crossbar program;
- ``nvcim.driver``: the host driver (``driver.load(path)``, ``driver.open(url)``);
- ``nvcim.firmware_emu``: the emulated chip, one backend of the contract;
- ``nvcim.tools``: the ``nvcim`` command, training and the TSB workflow.
"""

__version__ = "0.1.0"
