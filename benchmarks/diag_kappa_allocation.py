"""Diagnosis: a compensation-aware OBD allocation, ``F_jj·w_j²·κ_j^a`` (issue 9, stop 55; not adopted).

    KAPPA_POW=1 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diag_kappa_allocation.py \\
        benchmarks/ab_audit_select.py '[{}]' --dir ~/.cache/chita-onnx/unseen-torch5 --sparsities 0.3,0.5

Runs the given script (here the selection-split A/B) with the default's OBD allocation score
``F_jj·w_j²`` multiplied by ``κ_j^a`` (``a`` = ``KAPPA_POW``; 0 leaves the default as it is).
``κ_j = 1/(G_jj·[G⁻¹]_jj)`` for an input ``j`` of a layer whose (damped, 1% of the mean diagonal)
input Gram is ``G``: OBS's saliency ``w²/[G⁻¹]_jj`` over OBD's ``w²·G_jj``, the share of a lone
weight's cost that the layer's other weights can compensate.  ``G`` is taken from the dense model's
layer inputs on the first 64 calibration samples (at most 20,000 rows per layer).  The row weights
of the pass keep the plain Fisher diagonal.
"""

from __future__ import annotations

import logging
import os
import runpy
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

import chita_onnx.reconstruct as recon
from chita_onnx.activations import LayerSite, SegmentRunner, inline_fixed_ifs
from chita_onnx.layerstats import input_rows, rows_to_weight
from chita_onnx.rnnlayers import split_layers

POWER = float(os.environ.get("KAPPA_POW", "1"))
log = logging.getLogger("diag_kappa")
_allocate = recon.allocate


def kappa(prep: Any, config: Any) -> NDArray[np.float64]:
    """``κ`` for every prunable weight ``(p,)`` (1 where the weight is not a layer-wise layer's)."""
    base, batches, _ = recon.layer_data(prep, config)
    model = inline_fixed_ifs(base, batches)
    sites = [s for s in split_layers(model, prep.layout.names)[0] if isinstance(s, LayerSite)]
    first, seen = [], 0
    for batch in batches:  # the batches holding the first 64 calibration samples
        first.append(batch)
        seen += len(next(iter(batch.values())))
        if seen >= 64:
            break
    runner = SegmentRunner(model, first)
    runner.advance(len(runner.nodes), extra=[s.input for s in sites])
    grams: dict[str, NDArray[np.float64]] = {}
    rng = np.random.default_rng(0)
    for s in sites:
        for value in runner.values(s.input):
            x = input_rows(np.asarray(value), s.geometry).astype(np.float64)  # (R, g, d)
            if x.shape[0] > 20000:
                x = x[rng.choice(x.shape[0], 20000, replace=False)]
            grams[s.weight] = grams.get(s.weight, 0.0) + np.einsum("rgi,rgj->gij", x, x)
    runner.close()
    out = np.ones(prep.layout.p)
    slots = {sl.name: sl for sl in prep.layout.slots}
    for s in sites:
        if s.weight not in slots:
            continue
        G = grams[s.weight]
        k = np.empty(G.shape[:2])
        for g in range(G.shape[0]):
            H = G[g] + (0.01 * np.mean(np.diag(G[g])) + 1e-12) * np.eye(G.shape[1])
            k[g] = 1.0 / (np.diag(H) * np.diag(np.linalg.inv(H)))
        full = np.broadcast_to(k[:, None, :], (k.shape[0], s.geometry.outputs_per_group, k.shape[1]))
        sl = slots[s.weight]
        out[sl.offset : sl.stop] = rows_to_weight(full, s.geometry).reshape(-1)
        log.info("%s: median κ %.3f", s.weight, float(np.median(out[sl.offset : sl.stop])))
    return out


def allocate(prep: Any, config: Any, w_bar: Any, sparsity: float, gradients: Any,
             diagonal: Callable[[int], Any] | None = None) -> Any:  # fmt: skip
    if POWER == 0 or config.allocation != "obd" or diagonal is None:
        return _allocate(prep, config, w_bar, sparsity, gradients, diagonal)
    scale = kappa(prep, config) ** POWER
    plain: list[Any] = []

    def scaled(rows: int) -> Any:
        got = diagonal(rows)
        plain.append(got)
        return None if got is None else np.asarray(got, np.float64) * scale

    keep, how, _ = _allocate(prep, config, w_bar, sparsity, gradients, scaled)
    return keep, how, None if not plain or plain[0] is None else np.asarray(plain[0], np.float64)


if __name__ == "__main__":
    recon.allocate = allocate
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
