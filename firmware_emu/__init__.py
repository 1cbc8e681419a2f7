"""The emulated nvcim chip: one backend of the contract in ``nvcim.firmware_emu.contract``.

Nothing is imported here, so ``nvcim.firmware_emu.contract`` (the datasheet a host
driver builds on) can be used without loading the emulator. The ``emu://`` pyserial URL
scheme is served by ``protocol_emu``, which pyserial imports the first time such a URL
is opened (the package is registered by the driver through the ``nvcim.url_handlers``
entry point).
"""
