"""The chip's contract: register map, wire protocol and program format.

This is what a vendor ships as SDK headers. The compiler, the host driver and the tools
build on it; the emulated chip in ``nvcim.firmware_emu`` is one implementation of it. It
imports nothing of the emulator, so a host application talking to a real board never
loads the emulator.
"""
