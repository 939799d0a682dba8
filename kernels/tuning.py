"""Tuned launch configs per GPU (JSON tables in configs/), with a safe default elsewhere.

A table maps "NxK" (or "*") to a list of {"max_m": int, "config": {...}} rows sorted by max_m;
the first row whose max_m >= M wins. Shapes without a row (and rows that say
``{"DEFAULT": true}``) fall back to the defaults: on Hopper :func:`gemv_mma_default` (1-4
tokens) or :func:`ws_default` where they name a config, else :func:`default_config`.

A table of your own (say, tuned on a GPU without a shipped one by
``benchmarks/kernels/bench_w4a16.py --tune my_gpu.json --tune-only --shapes KxN,...``) takes
precedence when the environment variable ``MODELOPT_LITE_KERNEL_CONFIGS`` names its file:

    MODELOPT_LITE_KERNEL_CONFIGS=my_gpu.json python serve.py

Packed weights whose words are tiled already (``PackedInt4.tiled``; what ``deploy`` stores in
``Int4Linear``) are read tile by tile by every config, with no copy. For words packed row by
row (``pack_weight``'s output), configs with ``TILED`` (the warp-specialized kernel reading a
tile-by-tile copy of the packed words) keep that copy beside the weight, one per tile height a
shape's configs use: two or three times the INT4 word memory of the layers they serve. They
take it only after :func:`allow_tiled_copies` (or ``MODELOPT_LITE_TILED=1``); otherwise they
run the same config on the packed words as they are.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

_DIR = Path(__file__).parent / "configs"
_NUM_SMS_DEFAULT = 132
ENV_TABLE = "MODELOPT_LITE_KERNEL_CONFIGS"
ENV_TILED = "MODELOPT_LITE_TILED"
_TILED_COPIES: bool | None = None   # None: the environment decides


def allow_tiled_copies(enabled: bool = True) -> None:
    """Let configs with ``TILED`` keep a tile-by-tile copy of each row-by-row packed weight
    they serve (``kernels.ws.tiled_words``; as large as the packed words, one per tile height,
    kept while the weight lives) in exchange for faster small-batch calls on the largest shapes
    (H100: 28672x8192 at M = 1-16 52.6-55.7 -> 49.3-49.9 us; ``benchmarks/kernels/NOTES.md``,
    v32; v36: 52.1 -> 49.0 us at M = 1). Deployed layers (``Int4Linear``) need none of it:
    their words are tiled already (``PackedInt4.tiled``) and read in place. Off by default;
    the environment variable ``MODELOPT_LITE_TILED=1`` turns it on too. Copies already made
    stay until their weights are freed.

        >>> from modelopt_lite.kernels import allow_tiled_copies
        >>> allow_tiled_copies()        # for pack_weight() output: trade memory for speed
    """
    global _TILED_COPIES
    _TILED_COPIES = bool(enabled)


def tiled_copies_allowed() -> bool:
    if _TILED_COPIES is not None:
        return _TILED_COPIES
    return os.environ.get(ENV_TILED, "0").strip().lower() in ("1", "true", "yes", "on")


def _gpu_key(device) -> str:
    import torch

    if device is None or getattr(device, "type", "cpu") != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for key in ("h200", "h100"):
        if key in name:
            return key
    return "default"


@functools.lru_cache(maxsize=None)
def _table(key: str) -> dict:
    path = _DIR / f"{key}.json"
    return json.loads(path.read_text()) if path.exists() else {}


@functools.lru_cache(maxsize=None)
def _user_table(path: str) -> dict:
    """The table named by ``MODELOPT_LITE_KERNEL_CONFIGS``, checked once per path."""
    fix = (f"{ENV_TABLE} must name a JSON file mapping \"NxK\" (or \"*\") to rows "
           "[{\"max_m\": int, \"config\": {...}}, ...] in ascending max_m")
    try:
        table = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{ENV_TABLE}={path}: no such file; {fix}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{ENV_TABLE}={path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(table, dict):
        raise ValueError(f"{ENV_TABLE}={path}: the top level is not an object; {fix}")
    for key, rows in table.items():
        ok = isinstance(rows, list) and all(
            isinstance(r, dict) and isinstance(r.get("max_m"), int)
            and isinstance(r.get("config"), dict) for r in rows)
        if not ok or [r["max_m"] for r in rows] != sorted(r["max_m"] for r in rows):
            raise ValueError(f"{ENV_TABLE}={path}: entry {key!r} is not a list of rows in "
                             f"ascending max_m; {fix}")
    return table


def _rows(table: dict, n: int, k: int):
    return table.get(f"{n}x{k}") or table.get("*")


@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    import torch

    if device is None or getattr(device, "type", "cpu") != "cuda":
        return _NUM_SMS_DEFAULT
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _smem_bytes(device):
    """Shared memory one block may use on ``device`` (opt-in limit), or None off CUDA."""
    import torch

    if device is None or getattr(device, "type", "cpu") != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", None)


def fused_smem_bytes(cfg: dict) -> int:
    """Shared memory of a fused-kernel config: its pipeline stages of activation tile
    ([BM, 128] half), words ([BN, 16] int32) and, with PAIRS, one word per row."""
    stage = cfg["BM"] * 128 * 2 + cfg["BN"] * 64 + (cfg["BN"] * 4 if cfg.get("PAIRS") else 0)
    return cfg.get("num_stages", 3) * stage


def default_config(m: int, n: int, k: int, num_sms: int = _NUM_SMS_DEFAULT,
                   smem_bytes: int | None = None) -> dict:
    """Shape-only heuristic: one token takes the GEMV path; 2..16 tokens the small-M tensor-core
    GEMV (MMA), K split until ~16 programs per SM; M >= 512 dequantizes once and calls cuBLAS;
    in between, big tensor-core tiles (K split until ~2 programs per SM, the partial sums added
    into the fp16 output: OUT16), with each block's scale and zero term read as one word (PAIRS)
    where K >= 8192. With ``smem_bytes`` (the GPU's per-block shared memory), those tiles drop
    pipeline stages until they fit."""
    if m >= 512:  # H100 (NOTES.md, v13): the fused 256-token tile only ties on shapes outside
        # the table (4096x11008, 11008x4096, 5120x13824) and loses 2-3x at N = 1024 (16 tiles)
        return dict(DEQUANT=True, DQ_BN=32, DQ_CHUNKS=4, DQ_WARPS=4)
    if 2 <= m <= 16:  # H100: beat the fused kernel on all five Llama shapes (NOTES.md)
        cfg = (dict(MMA=True, BN=64, num_warps=4, PREFETCH=False, OUT16=True) if m <= 8 else
               dict(MMA=True, BN=256, num_warps=8, PREFETCH=True, OUT16=True))
        tiles, k_tiles, split = -(-n // cfg["BN"]), -(-k // 128), 1
        while tiles * split < 16 * num_sms and split < 16 and split * 2 <= max(1, k_tiles // 2):
            split *= 2
        cfg.update(SPLIT_K=split)
        return cfg
    per_sm = 2
    if m == 1:  # CUDA-core GEMV; ~8 programs per SM hide the memory latency
        cfg, per_sm = dict(GEMV=True, BN=64, num_warps=4, num_stages=3, PREFETCH=True), 8
    elif m <= 64:
        cfg = dict(BM=64, BN=64, num_warps=4, num_stages=3, FUSE_K=True)
    else:
        cfg = dict(BM=128, BN=128, num_warps=8, num_stages=4, FUSE_K=True)
    tiles = -(-n // cfg["BN"]) * -(-m // cfg.get("BM", 1))
    k_tiles = -(-k // 128)
    split = 1
    while tiles * split < per_sm * num_sms and split * 2 <= max(1, k_tiles // 4):
        split *= 2
    cfg.update(SPLIT_K=split, GROUP_N=8)
    if "FUSE_K" in cfg and k >= 8192:  # H100: 4-14 % faster at K >= 8192, slower at 4096
        cfg.update(PAIRS=True)
    if "FUSE_K" in cfg and split > 1:  # fp16 atomics into the output: faster on every fused
        cfg.update(OUT16=True)         # split-K row of the H100 / H200 tables (NOTES.md, v15)
    if "FUSE_K" in cfg and smem_bytes is not None:
        while cfg["num_stages"] > 2 and fused_smem_bytes(cfg) > smem_bytes:
            cfg["num_stages"] -= 1
    return cfg


# the fused kernel's tile for a WS config, where the warp-specialized kernel cannot run
WS_FUSED_TILE = dict(BM=256, BN=128, num_warps=8, num_stages=3, FUSE_K=True, PAIRS=True)


def ws_shape_ok(n: int, k: int, group_size: int, capability) -> bool:
    """Whether the warp-specialized kernel takes the shape on a GPU of this compute capability:
    9.0 (wgmma), block 128, K a positive multiple of 128, N of 4 (the transposed pairs' rows)."""
    return (tuple(capability) == (9, 0) and group_size == 128 and k > 0 and n > 0
            and k % 128 == 0 and n % 4 == 0)


# Hopper, shapes without a table row at M < 512 (NOTES.md, v41; H100, interleaved A/B against
# the shape heuristic): (largest M, fewest weight elements N x K, the WS tile). Stream-K
# balances any tile count, so one tile per M range serves every shape measured: 19-41 % faster
# than the heuristic on 3584x18944 / 18944x3584 / 5120x13824 / 13824x5120 / 8192x8192 /
# 8192x10240 at M = 16 / 64 / 256 and ahead of Humming on all of them. Below ~25 M weights the
# heuristic's GEMV / MMA paths win at M <= 64 (2048x8192: 9.1 vs 9.2 us at M = 1, 11.1 vs
# 12.3 at M = 64); the stream-K tiles still win from M = 128 (2048x8192: 14.1 vs 19.0 us).
_WS_MID = (
    (16, 24 << 20, dict(BM=16, BN=128, MAXNREG=80, STREAM=2, STAGES=4)),
    (64, 24 << 20, dict(BM=64, BN=256, WGS=4, STREAM=1, STAGES=5)),
    (256, 16 << 20, dict(BM=256, BN=128, STREAM=1, STAGES=3)),
    (511, 16 << 20, dict(BM=128, BN=256, STREAM=1, STAGES=4)),
)


def ws_default(m: int, n: int, k: int, group_size: int, capability,
               num_sms: int = _NUM_SMS_DEFAULT) -> dict | None:
    """The warp-specialized kernel (``WS``, :mod:`~.ws`) for shapes without a table row, on a
    GPU of compute capability 9.0, block 128, K a multiple of 128, N of 4; None where the shape
    heuristic (:func:`default_config`) is the better guess.

    - M < 512, layers of at least 16-24 M weights: stream-K tiles by M range (``_WS_MID``),
      measured on shapes outside the tables (NOTES.md, v41).
    - M >= 512, at least half a wave of 128 x 256 tiles: persistent (one program per SM walking
      its tiles). At M = 1024 it beat or tied the fused kernel on every table shape of both
      cards, and the fused kernel beat dequantize + cuBLAS there (NOTES.md, v13 / v18). On four
      shapes outside the tables (H100, v19 / v20) it beat dequantize + cuBLAS and the fused tile
      at M = 512 / 1024, and dequantize + cuBLAS on three of four at M = 4096; persistence
      gained 1-10 % on all eight M = 1024 / 4096 pairs.

    Where the kernel cannot run after all (unaligned rows), the fused kernel takes the tile."""
    if not ws_shape_ok(n, k, group_size, capability):
        return None
    if m < 512:
        for max_m, min_weights, tile in _WS_MID:
            if m <= max_m:
                if n * k < min_weights:
                    return None
                return dict(WS_FUSED_TILE, WS=True, COAL=True, OUT16=True, GROUP_N=8,
                            SPLIT_K=1, **tile)
    if 2 * -(-n // 128) * -(-m // 256) < num_sms:   # a short grid: dequantize + cuBLAS
        return None
    return dict(WS_FUSED_TILE, WS=True, STAGES=3, GROUP_N=8, SPLIT_K=1, PERSIST=1)


# Hopper, shapes without a table row at M <= 4 (NOTES.md, v51; H200, interleaved A/B): the
# 4-warp tensor-core GEMV (64 rows a program, several blocks' scales per load, evict-first
# words) with the K split nearest 14 programs per SM against the warp-specialized 16-token tile
# and the shape heuristic, on 8 shapes of 16-64 M weights (3584x18944 ... 2048x8192) at M = 1
# and 4: faster on 14 of 16 pairs (1.2-25 %), 0.7 % and 0.2 % slower on the other two, ahead
# of Humming on all. Then on 14 held-out (shape, M) pairs of 9 shapes (4096x6144, 5120x27648,
# 2560x9728, 11008x4096 with 2 blocks' scales per load, ...): 1.6-28 % faster on every one.
# On the H100 the tables' rows for the Llama-3-70B shapes took the same kernel (v50: splits 4
# and 7, the split nearest 14 per SM within 1 % of 7); shapes outside them are measured on the
# H200 only.
_GEMV_MMA = dict(MMA=True, BN=64, num_warps=4, PREFETCH=False, OUT16=True, QE="evict_first")
_GEMV_MMA_PER_SM = 14


def gemv_mma_default(m: int, n: int, k: int, group_size: int, capability,
                     num_sms: int = _NUM_SMS_DEFAULT) -> dict | None:
    """The small-M tensor-core GEMV for 1-4 tokens on shapes without a table row, on a GPU of
    compute capability 9.0, block 128, layers of at least 16 M weights; None elsewhere (the
    measured range). ``SV`` (blocks whose scales one load brings) is 4 where the layer's
    128-blocks per row are a multiple of 4, else 2 where they are even; the K split cuts them
    into slices of a multiple of SV blocks, nearest ``_GEMV_MMA_PER_SM`` programs per SM. An
    odd number of blocks per row gives None."""
    if (m > 4 or tuple(capability) != (9, 0) or group_size != 128 or k <= 0 or k % 128
            or n * k < 16 << 20):
        return None
    k_blocks, tiles = k // 128, -(-n // _GEMV_MMA["BN"])
    for sv in (4, 2):
        splits = [s for s in range(1, k_blocks + 1)
                  if k_blocks % s == 0 and (k_blocks // s) % sv == 0]
        if splits:
            split = min(splits, key=lambda s: abs(tiles * s - _GEMV_MMA_PER_SM * num_sms))
            return dict(_GEMV_MMA, SV=sv, SPLIT_K=split)
    return None


def pick_config(m: int, n: int, k: int, group_size: int, device=None) -> dict:
    """The launch config for an [M, K] x [K, N] product: the ``MODELOPT_LITE_KERNEL_CONFIGS``
    table's row for the shape if there is one, else the GPU's shipped table's, else
    :func:`default_config` (also where a row says ``{"DEFAULT": true}``), or on Hopper
    :func:`gemv_mma_default` (1-4 tokens) or :func:`ws_default` where they name a config."""
    user = os.environ.get(ENV_TABLE)
    rows = (_rows(_user_table(user), n, k) if user else None) or _rows(_table(_gpu_key(device)),
                                                                       n, k)
    if rows:
        for row in rows:
            if m <= row["max_m"]:
                if row["config"].get("DEFAULT"):  # this M range takes the defaults below
                    break
                return dict(row["config"])
    sms = _num_sms(device)
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        import torch

        cap = torch.cuda.get_device_capability(device)
        cfg = (gemv_mma_default(m, n, k, group_size, cap, sms)
               or ws_default(m, n, k, group_size, cap, sms))
        if cfg:
            return cfg
    return default_config(m, n, k, sms, _smem_bytes(device))
