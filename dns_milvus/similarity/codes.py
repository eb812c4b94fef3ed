"""Packing of binary codes: ±1 codes ``[..., L]`` <-> uint8 ``[..., L/8]``.

Bit 1 stands for +1 and bit 0 for -1; bit ``i`` (value ``1 << i``) of byte ``j`` holds code
``8*j + i`` (little-endian bit order within a byte, numpy's ``bitorder="little"``). A video's
codes ``[T, R, L]`` pack to exactly ``T * R * L / 8`` bytes.

Both functions take and return either torch tensors (any device) or numpy arrays, so the
numpy-only store can use the same convention without torch.
"""

from __future__ import annotations

from typing import overload

import numpy as np
import torch
from torch import Tensor

from dns_milvus.errors import InvalidInputError

#: Weights of the 8 codes that share a byte: code 8*j+i sets bit i.
_BIT_WEIGHTS = tuple(1 << i for i in range(8))


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _check_array(x: object, expected: str) -> None:
    if not isinstance(x, Tensor | np.ndarray):
        raise InvalidInputError(
            f"expected {expected} as a torch tensor or numpy array, got {type(x).__name__}"
        )


def _check_codes(codes: Tensor | np.ndarray) -> None:
    expected = "±1 codes [..., L] with L a positive multiple of 8"
    _check_array(codes, expected)
    if codes.ndim == 0 or codes.shape[-1] == 0 or codes.shape[-1] % 8:
        raise InvalidInputError(f"expected {expected}, got shape {_shape(tuple(codes.shape))}")
    real = (
        not (codes.is_complex() or codes.dtype == torch.bool)
        if isinstance(codes, Tensor)
        else codes.dtype.kind in "iuf"
    )
    if not real:
        raise InvalidInputError(f"expected real {expected}, got dtype {codes.dtype}")
    if not bool(((codes == 1) | (codes == -1)).all()):  # also catches NaN, 0 and any other value
        raise InvalidInputError(
            f"expected {expected}: every value must be -1 or +1 (found 0, NaN or another value)"
        )


def _check_packed(packed: Tensor | np.ndarray, bits: int | None) -> int:
    """Validate packed codes; returns the number of codes L to unpack."""
    expected = "packed codes uint8 [..., L/8]"
    _check_array(packed, expected)
    dtype_ok = packed.dtype == torch.uint8 if isinstance(packed, Tensor) else packed.dtype == np.uint8
    if not dtype_ok:
        raise InvalidInputError(f"expected {expected}, got dtype {packed.dtype}")
    if packed.ndim == 0 or packed.shape[-1] == 0:
        raise InvalidInputError(
            f"expected {expected} with a non-empty last axis, got shape {_shape(tuple(packed.shape))}"
        )
    available = 8 * int(packed.shape[-1])
    if bits is not None and bits != available:
        raise InvalidInputError(
            f"expected {expected} holding L = {bits} codes, got {packed.shape[-1]} bytes ({available} codes)"
        )
    return available


def pack_signs(signs: np.ndarray) -> np.ndarray:
    """Pack boolean codes ``[..., L]`` (True = +1) into uint8 ``[..., L/8]``: :func:`pack_codes`
    for codes already given as their signs."""
    if signs.dtype != np.bool_ or signs.ndim == 0 or signs.shape[-1] % 8 or signs.shape[-1] == 0:
        raise InvalidInputError(
            "expected boolean codes [..., L] with L a positive multiple of 8, "
            f"got {signs.dtype} {list(signs.shape)}"
        )
    return np.packbits(signs, axis=-1, bitorder="little")


@overload
def pack_codes(codes: Tensor) -> Tensor: ...
@overload
def pack_codes(codes: np.ndarray) -> np.ndarray: ...


def pack_codes(codes: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """Pack ±1 codes ``[..., L]`` (L a multiple of 8) into uint8 ``[..., L/8]``.

    Returns the same kind of array as given (a torch tensor stays on its device). Raises
    ``InvalidInputError`` for any value other than -1 and +1 (0 and NaN included), or an L that
    is not a positive multiple of 8.
    """
    _check_codes(codes)
    if isinstance(codes, np.ndarray):
        return pack_signs(codes > 0)
    bits = (codes > 0).reshape(*codes.shape[:-1], codes.shape[-1] // 8, 8).to(torch.uint8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=codes.device)
    # the 8 weighted bits of a byte are disjoint powers of two: their sum never exceeds 255
    return (bits * weights).sum(dim=-1, dtype=torch.uint8)


@overload
def unpack_codes(packed: Tensor, bits: int | None = ..., dtype: torch.dtype = ...) -> Tensor: ...
@overload
def unpack_codes(packed: np.ndarray, bits: int | None = ..., dtype: torch.dtype = ...) -> np.ndarray: ...


def unpack_codes(
    packed: Tensor | np.ndarray, bits: int | None = None, dtype: torch.dtype = torch.float32
) -> Tensor | np.ndarray:
    """Unpack uint8 ``[..., L/8]`` into ±1 codes ``[..., L]`` of ``dtype`` (float32 by default).

    ``bits``, when given, is the expected code length L and must equal 8 x the last axis. A numpy
    input gives a numpy array of the matching numpy dtype.
    """
    n_bits = _check_packed(packed, bits)
    if isinstance(packed, np.ndarray):
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype  # bfloat16 has no numpy twin: a TypeError
        unpacked = np.unpackbits(packed, axis=-1, bitorder="little", count=n_bits)
        return unpacked.astype(np_dtype) * 2 - 1
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bit_values = (packed.unsqueeze(-1) >> shifts) & 1
    return (bit_values.to(dtype) * 2 - 1).flatten(-2)
