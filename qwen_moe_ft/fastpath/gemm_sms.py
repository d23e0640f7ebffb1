"""Experimental: quack's persistent GEMMs leave some SMs free for the optimizer's updates (--gemm-sm-reserve N).

Replaces (quack-kernels 0.6.5, quack_experts.QUACK_VERSION): `get_max_active_clusters` as quack.gemm and
quack.gemm_runtime.host imported it, the count of clusters a persistent GEMM launches (one per cluster that fits on the
GPU at once): N SMs' worth fewer. The tiles and each tile's arithmetic stay the same, only fewer CTAs take turns at
them, so the results do not change (tests/unit/fastpath/test_gemm_sms.py: the count here, and on a GPU the experts'
chain bit for bit with and without).

Why: with step_overlap the AdamW updates (bandwidth-bound, 3.2-4.1 ms a Qwen3-30B-A3B layer on an H100) wait on a side
stream for SMs the persistent GEMMs (compute-bound, ~7 ms a layer) never give back, so the two run one after the
other. With N SMs free the updates can stream beside the GEMMs, at the price of N/132 of the GEMMs' speed: whether
that pays is what `python -m qwen_moe_ft.bench --gemm-sm-reserve N` measures. Off (0) by default, unmeasured.

quack builds a plan per GEMM signature on its first call and keeps the count in it, so the reserve is installed
before any quack GEMM runs (the experts' probe included) and holds for the process.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable

# the quack modules that size persistent grids with their own import of get_max_active_clusters
CLUSTER_COUNTERS = ("quack.gemm", "quack.gemm_runtime.host")


def fewer_clusters(max_active_clusters: Callable[..., int], sms: int) -> Callable[..., int]:
    """max_active_clusters (cluster_size, ...) -> clusters, less as many clusters as cover `sms` SMs, at least one."""
    def counted(cluster_size: int, *args, **kwargs) -> int:
        return max(1, max_active_clusters(cluster_size, *args, **kwargs) - math.ceil(sms / cluster_size))

    counted.reserved_sms = sms
    return counted


def reserve_sms(sms: int) -> Callable[[], None]:
    """Have quack's persistent GEMMs leave `sms` SMs free from now on; returns what puts quack's own count back."""
    if sms < 1:
        raise ValueError(f"reserve_sms: at least 1 SM, got {sms}")
    modules = [importlib.import_module(name) for name in CLUSTER_COUNTERS]
    originals = [module.get_max_active_clusters for module in modules]
    if any(hasattr(original, "reserved_sms") for original in originals):
        raise RuntimeError("reserve_sms: quack's GEMMs already leave SMs free in this process")
    for module, original in zip(modules, originals):
        module.get_max_active_clusters = fewer_clusters(original, sms)

    def restore() -> None:
        for module, original in zip(modules, originals):
            module.get_max_active_clusters = original

    return restore
