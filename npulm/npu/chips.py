"""Rockchip NPU chip configurations for the matmul API: the one table to edit when adding a chip.

Values come from the SDK 2.x header comments (alignment, native tiles, B K-split) and third-party probes (which
matmul types `rknn_matmul_create` accepts, per-call K, IOMMU budgets); the unverified ones are marked. Alignment is
in elements: the header says "aligned with N byte", read here as bytes / element size (what the RK3588 benchmark
enforces). Native layouts zero-pad K and N up to their tiles, so an aligned-but-untiled size is legal.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from .rknn import CORE_0, CORE_0_1, CORE_0_1_2, CORE_1, CORE_2, CORE_ALL, CORE_AUTO, ELEMENT_BITS, MATMUL_TYPES

GiB = 1 << 30


def _bytes_to_elems(rule: dict[str, int]) -> dict[str, int]:
    return {dt: nbytes * 8 // ELEMENT_BITS[dt] for dt, nbytes in rule.items()}


@dataclass(frozen=True, eq=False)  # identity hash: chips are table singletons (dict fields are unhashable)
class Chip:
    """One SoC's matmul-API rules. Element types: fp16 int8 int4 (inputs), fp32 fp16 bf16 int32 int16 int8 (C)."""

    name: str
    compatible: tuple[str, ...]  # device-tree "compatible" strings
    n_cores: int
    core_masks: frozenset[int]  # masks rknn_matmul_set_core_mask accepts; empty: the call fails (-1)
    matmul_types: frozenset[int]  # types rknn_matmul_create accepts (unverified beyond 1, 2, 10 on RK3588)
    k_align_bytes: dict[str, int]  # K rule per input element type (the stricter of A and B applies)
    n_align_bytes: dict[str, int]  # N rule per B element type
    a_tile: dict[str, int]  # A native (K/s, M, s): s per A element type
    b_tile: dict[str, tuple[int, int]]  # B native (N/sn, K/sk, sn, sk): (sn, sk) per B element type
    c_tile: dict[str, int]  # C native (N/s, M, s): s per C element type
    max_k: int  # K per call that pipelines should use (split larger K on the CPU)
    k_limit: int = 10240  # create fails above this K (header "K max: k <= 10240")
    b_split_k: int | None = None  # B native is stored in K-segments of this size when K exceeds it
    int4_b_normal: bool = False  # RK3588 benchmark: "INT4 B normal layout unsupported on current runtime"
    max_alloc_bytes: int = 2 * GiB  # per rknn_create_mem (rk-llama.cpp budget ~INT32_MAX; unverified)
    domain_bytes: int = 4 * GiB  # per IOMMU domain (header: "each domain has 4GB of space")
    n_domains: int = 16  # iommu_domain_id in [0, n_domains)
    notes: str = ""
    k_align: dict[str, int] = field(init=False, repr=False, compare=False)
    n_align: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "k_align", _bytes_to_elems(self.k_align_bytes))
        object.__setattr__(self, "n_align", _bytes_to_elems(self.n_align_bytes))

    # -- per matmul type -------------------------------------------------------------------------------------------

    def supports(self, mm_type: int) -> bool:
        return mm_type in self.matmul_types

    def dtypes(self, mm_type: int) -> tuple[str, str, str]:
        """(A, B, C) element types; KeyError for a type the API does not define."""
        return MATMUL_TYPES[mm_type]

    def align(self, mm_type: int) -> tuple[int, int]:
        """(K, N) element multiples rknn_matmul_create requires for this type."""
        a, b, _ = self.dtypes(mm_type)
        return max(self.k_align[a], self.k_align[b]), self.n_align[b]

    def tiles(self, mm_type: int) -> tuple[int, int, int, int]:
        """Native tile sizes (A sub_k, B sub_n, B sub_k, C sub_n)."""
        a, b, c = self.dtypes(mm_type)
        return self.a_tile[a], *self.b_tile[b], self.c_tile[c]

    def padded_align(self, mm_type: int) -> tuple[int, int]:
        """(K, N) multiples that are legal and need no padding in any native layout: what pipelines should pad to."""
        k, n = self.align(mm_type)
        a_k, b_n, b_k, c_n = self.tiles(mm_type)
        return math.lcm(k, a_k, b_k), math.lcm(n, b_n, c_n)


# Native tiles and alignment per the SDK 2.x header; RK3588 and RK3576 share them except C's INT16 tile.
_RK3588_LIKE = dict(
    k_align_bytes={"int8": 32, "fp16": 32, "int4": 32},
    n_align_bytes={"int8": 32, "fp16": 16, "int4": 64},
    a_tile={"int4": 32, "int8": 16, "fp16": 8},
    b_tile={"int4": (64, 32), "int8": (32, 32), "fp16": (16, 32)},
)
_C4 = {"fp32": 4, "fp16": 4, "bf16": 4, "int32": 4, "int16": 4, "int8": 4}

CHIPS: dict[str, Chip] = {
    "rk3588": Chip(
        name="rk3588", compatible=("rockchip,rk3588", "rockchip,rk3588s"), n_cores=3,
        core_masks=frozenset({CORE_AUTO, CORE_0, CORE_1, CORE_2, CORE_0_1, CORE_0_1_2, CORE_ALL}),
        matmul_types=frozenset({1, 2, 4, 10}),  # 1, 2, 10 third-party confirmed; 4 plausible (DPU fp32->fp16)
        c_tile={**_C4, "int16": 8}, max_k=8192, b_split_k=8192, **_RK3588_LIKE,
        notes="types 3, 5-9, 11, 12, 15 rejected per third-party probes; multi-core masks fall back to one core"),
    "rk3576": Chip(
        name="rk3576", compatible=("rockchip,rk3576",), n_cores=2,
        core_masks=frozenset({CORE_AUTO, CORE_0, CORE_1, CORE_0_1, CORE_ALL}),
        matmul_types=frozenset({1, 2, 4, 5, 6, 7, 8}),  # W8A16/W4A16 per RKLLM, no W4A4 per rk-llama.cpp; unverified
        c_tile=_C4, max_k=4096, b_split_k=4096, **_RK3588_LIKE),
    "rk3562": Chip(
        name="rk3562", compatible=("rockchip,rk3562",), n_cores=1, core_masks=frozenset(),
        matmul_types=frozenset({1, 2}),
        k_align_bytes={"int8": 32, "fp16": 32}, n_align_bytes={"int8": 16, "fp16": 8},
        a_tile={"int8": 16, "fp16": 8}, b_tile={"int8": (16, 32), "fp16": (8, 32)}, c_tile=_C4, max_k=4096),
    "rk3568": Chip(
        name="rk3568", compatible=("rockchip,rk3568", "rockchip,rk3566"), n_cores=1, core_masks=frozenset(),
        matmul_types=frozenset({1, 2}),
        k_align_bytes={"int8": 32, "fp16": 16}, n_align_bytes={"int8": 16, "fp16": 8},
        a_tile={"int8": 8, "fp16": 4}, b_tile={"int8": (16, 32), "fp16": (8, 16)}, c_tile=_C4, max_k=4096),
}
ALIASES = {"rk3588s": "rk3588", "rk3566": "rk3568"}


class UnknownChipError(ValueError):
    pass


def get_chip(name: str) -> Chip:
    """The configuration for a chip name ("rk3588", "RK3566", ...)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in CHIPS:
        known = sorted([*CHIPS, *ALIASES])
        raise UnknownChipError(f"unknown Rockchip chip {name!r}; known: {', '.join(known)}")
    return CHIPS[key]


DEVICE_TREE_COMPATIBLE = "/proc/device-tree/compatible"


def detect_chip(compatible_path: str = DEVICE_TREE_COMPATIBLE) -> Chip | None:
    """The chip named in the device tree (NUL-separated "vendor,model" strings), or None when not a known board."""
    try:
        with open(compatible_path, "rb") as f:
            entries = [e.decode(errors="replace").strip() for e in f.read().split(b"\0") if e]
    except OSError:
        return None
    for entry in entries:
        for chip in CHIPS.values():
            if entry in chip.compatible:
                return chip
    return None


def chip_from_env_or_board(default: str = "rk3588") -> Chip:
    """$NPULM_CHIP, else the board's device tree, else `default`."""
    name = os.environ.get("NPULM_CHIP")
    if name:
        return get_chip(name)
    return detect_chip() or get_chip(default)
