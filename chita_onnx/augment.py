"""Extra distillation inputs for ``--distill``: convex mixtures of pairs of calibration samples.

``--distill`` fits the dense model's output distributions, which the dense model gives on any
input, not only on the calibration samples.  Between two calibration samples the dense model's
outputs are informative (neither class is certain there), so mixing pairs doubles the inputs the
fit sees without new data: for sample ``i`` and a seeded permutation ``π``,
``x̃_i = λ_i·x_i + (1 − λ_i)·x_π(i)`` with ``λ_i ~ U[MIX_LOW, MIX_HIGH]``, every batched input with
the same ``λ_i`` and ``π`` (static inputs unchanged).  Only floating-point inputs can be mixed: a
model with an integer input (token ids, masks, indices) gets no mixtures.

NumPy only (no onnx): arrays in, arrays out.
"""

from __future__ import annotations

import numpy as np

from .data import ArraySource

#: Range of the mixing weight λ: each mixture keeps at least 20% of either sample.
MIX_LOW, MIX_HIGH = 0.2, 0.8
#: Mixtures per calibration sample.
MIX_COPIES = 1


def mixed_inputs(source: ArraySource, n: int, seed: int = 0) -> ArraySource | None:
    """The first ``n`` samples of ``source`` followed by ``n`` mixtures of them (``2n`` samples).

    A mixture's label, when the source has labels, is the label of its larger part (``λ ≥ ½``: its
    own); ``--distill`` fits the dense outputs and does not use it.  Returns ``None`` when there is
    nothing to mix: fewer than two samples, or a batched input that is not floating point.
    """
    n = min(n, source.num_samples)
    batched = {k: v for k, v in source.inputs.items() if k not in source.static}
    if n < 2 or any(not np.issubdtype(v.dtype, np.floating) for v in batched.values()):
        return None
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(MIX_COPIES):
        perm = rng.permutation(n)
        draws.append((perm, rng.uniform(MIX_LOW, MIX_HIGH, n)))
    arrays: dict[str, np.ndarray] = {}
    for k, v in batched.items():
        x = v[:n]
        shape = (n,) + (1,) * (x.ndim - 1)
        parts = [x]
        for perm, lam in draws:
            lk = lam.reshape(shape).astype(x.dtype)
            parts.append(lk * x + (1 - lk) * x[perm])
        arrays[k] = np.concatenate(parts).astype(x.dtype, copy=False)
    arrays.update({k: v for k, v in source.inputs.items() if k in source.static})
    labels = None
    if source.labels is not None:
        own = source.labels[:n]
        labels = np.concatenate([own, *(np.where(lam >= 0.5, own, own[perm]) for perm, lam in draws)])
    return ArraySource(
        arrays, labels, batch_size=source.batch_size, origin=f"{source.origin} (with mixtures)", static=source.static
    )
