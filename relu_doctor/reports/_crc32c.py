"""CRC-32C (Castagnoli), the checksum of TensorBoard's record framing, vectorised with numpy.

Without TensorFlow installed, tensorboard computes it in a Python loop over the bytes, about
0.1 us a byte: a log of a 256-site model (its scalars, histograms and findings text, some
300 KB of events) spent some 80 ms there, most of what writing TensorBoard cost it. No
dependency of relu_doctor computes CRC-32C.

Here the CRC is taken as linear in the message's bits. The table of :func:`_tails` holds,
for a byte ``b`` at distance ``d`` from a block's end, what ``b`` followed by ``d`` zero bytes
leaves in a register that started at zero; a block's register
is the XOR of its bytes' entries at their distances from the block's end (one gather and one
reduction for every block at once). The blocks are then chained: a register ``s`` entering a
block acts as ``s``'s four bytes XORed into the block's first four (the reflected CRC's
update), so the register after it is the block's own XOR the entries of ``s``'s bytes at
the distances of the block's first four. The initial register 0xFFFFFFFF enters the same
way, and zero bytes in front of a message leave a zero register zero, so a message is padded
in front to whole blocks. Short messages take the byte loop, which numpy's fixed cost per
call would not beat. Checked against tensorboard's own function in
``tests/reports/test_tensorboard.py``.
"""

from __future__ import annotations

from functools import cache

import numpy as np

__all__ = ["crc32c", "masked_crc32c"]

_POLY = 0x82F63B78  # reflected Castagnoli polynomial
_BLOCK = 512  # bytes per block: the table is _BLOCK x 256 x 4 bytes (512 KB), made at first use
_SHORT = 192  # messages up to this many bytes take the byte loop (as fast there)


@cache
def _table() -> list[int]:
    out = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        out.append(c)
    return out


@cache
def _tails() -> tuple[np.ndarray, tuple[list[int], list[int], list[int], list[int]]]:
    """(the table, its rows by position in a block: row ``i`` for a block's byte ``i``; the
    rows of a block's first four bytes as lists, for the chaining loop)."""
    t0 = np.array(_table(), dtype=np.uint32)
    rows = np.empty((_BLOCK, 256), dtype=np.uint32)
    rows[0] = t0
    for d in range(1, _BLOCK):  # one more zero byte: the register's low byte leaves
        prev = rows[d - 1]
        rows[d] = t0[prev & 0xFF] ^ (prev >> 8)
    by_position = np.ascontiguousarray(rows[::-1])
    first = tuple(by_position[j].tolist() for j in range(4))
    return by_position, first


def _loop(crc: int, data: bytes | bytearray | memoryview) -> int:
    table = _table()
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """The CRC-32C of ``data`` (as ``crc32c.crc32c`` and TensorFlow compute it)."""
    n = len(data)
    if n <= _SHORT:
        return _loop(0xFFFFFFFF, data) ^ 0xFFFFFFFF
    tail, first = _tails()
    blocks = -(-n // _BLOCK)
    buf = np.zeros(blocks * _BLOCK, dtype=np.uint8)
    start = blocks * _BLOCK - n
    buf[start:] = np.frombuffer(data, dtype=np.uint8)
    buf[start : start + 4] ^= 0xFF  # the initial register, entering at the first byte
    m = buf.reshape(blocks, _BLOCK)
    own = np.bitwise_xor.reduce(tail[np.arange(_BLOCK), m], axis=1).tolist()
    f0, f1, f2, f3 = first
    crc = 0
    for reg in own:
        crc = reg ^ f0[crc & 0xFF] ^ f1[(crc >> 8) & 0xFF] ^ f2[(crc >> 16) & 0xFF] ^ f3[crc >> 24]
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """The masked CRC that TFRecord framing stores (rotated right by 15, plus a constant)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
