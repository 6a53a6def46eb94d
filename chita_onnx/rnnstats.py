"""Recurrent layers (ONNX ``LSTM``/``GRU``/``RNN``) as linear layers, for layer-wise reconstruction.

NumPy only; no onnx import.  The gate pre-activations of direction ``d`` at step ``t`` are

    g_t = W_d x_t + R_d h_{t−1} + b_d        (G·H rows: G = 4 LSTM ``iofc``, 3 GRU ``zrh``, 1 RNN),

linear in ``z_t = [x_t ; h_{t−1}]`` (``d_in = I + H``).  ``x_t`` is the node's input ``X`` and
``h_{t−1}`` its output ``Y`` one step earlier (one step *later* for the reverse direction, which runs
from the end of each sequence), or ``initial_h`` (zeros when absent) at a sequence's first step;
steps at or past a sequence's ``sequence_lens`` are no rows.  So per direction the node is a linear
layer with the *joint weight* ``[W_d  R_d]`` ``(G·H, I + H)`` whose input rows are built from
tensors that forward passes expose — which is all :mod:`chita_onnx.solver.layerwise` needs.

GRU's candidate gate ``h`` is the exception: with ``linear_before_reset=1`` (PyTorch's export) it
reads ``W_h x_t + r_t ⊙ (R_h h_{t−1} + Rb_h)``; both products are exact linear layers on their own
(``W_h`` on ``x``, ``R_h`` on ``h``), so they are separate *parts*.  With ``linear_before_reset=0`` its
``R_h`` reads ``r_t ⊙ h_{t−1}``; the reset gate ``r_t = σ(clip([W_r R_r] z_t + b_r))`` is computed here
from the same rows and the node's dense weights (exactly what the node computes on these inputs), so
that block is a linear layer on the rows ``r_t ⊙ h_{t−1}`` (part ``rh``; default ``Sigmoid`` only).

Peepholes (``P``) and biases are not fitted (they stay dense).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from .errors import ModelError
from .solver.layerwise import damp_gram, obs_saliency, split_budget, targets

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
Cols = Literal["xh", "x", "h", "rh"]


@dataclass(frozen=True)
class RecurrentGeometry:
    """Shape and attributes of one recurrent node: ``W [D, G·H, I]``, ``R [D, G·H, H]``.

    ``direction``: ``forward``, ``reverse`` or ``bidirectional``; ``layout`` 0 (``X [T, N, I]``,
    ``Y [T, D, N, H]``, ``initial_h [D, N, H]``) or 1 (``[N, T, I]``, ``[N, T, D, H]``, ``[N, D, H]``).
    """

    op: str
    directions: int
    hidden: int
    input_size: int
    direction: str = "forward"
    layout: int = 0
    linear_before_reset: bool = False
    clip: float = 0.0  # the node's ``clip`` (0: none), applied to the gate pre-activations
    sigmoid_gates: bool = True  # the ``f`` activation of every direction is Sigmoid (the default)

    @property
    def gates(self) -> int:
        return GATES[self.op]

    @property
    def d(self) -> int:
        return self.input_size + self.hidden

    def reverse(self, k: int) -> bool:
        """Whether direction index ``k`` runs from the end of each sequence."""
        return self.direction == "reverse" or (self.direction == "bidirectional" and k == 1)


@dataclass(frozen=True)
class Part:
    """A block of the joint weight ``[W_d  R_d]`` fitted as one linear layer: rows ``[r0, r1)`` of
    direction ``direction``, reading ``cols`` (``xh``: all ``I + H`` columns; ``x``: the first ``I``;
    ``h``: the last ``H``; ``rh``: the last ``H`` — the ``R`` columns — on the rows ``r_t ⊙ h_{t−1}``)."""

    direction: int
    r0: int
    r1: int
    cols: Cols

    def col_slice(self, geom: RecurrentGeometry) -> slice:
        i = geom.input_size
        return {"xh": slice(0, geom.d), "x": slice(0, i), "h": slice(i, geom.d), "rh": slice(i, geom.d)}[self.cols]

    def shape(self, geom: RecurrentGeometry) -> tuple[int, int]:
        s = self.col_slice(geom)
        return self.r1 - self.r0, s.stop - s.start


def parts(geom: RecurrentGeometry, fit_w: bool = True, fit_r: bool = True, *, name: str = "node") -> list[Part]:
    """The exact linear blocks of a node whose ``W`` (``fit_w``) and/or ``R`` (``fit_r``) are fitted.

    Raises :class:`~chita_onnx.errors.ModelError` for a GRU with ``linear_before_reset=0`` whose ``R``
    is to be fitted and whose reset gate is not a Sigmoid (its rows ``r ⊙ h`` are not reproduced here).
    """
    G, H = geom.gates, geom.hidden
    if not (fit_w or fit_r):
        return []
    only: Cols = "xh" if fit_w and fit_r else ("x" if fit_w else "h")
    if geom.op == "GRU" and not geom.linear_before_reset and fit_r and not geom.sigmoid_gates:
        raise ModelError(
            f"GRU node {name!r} has linear_before_reset=0 and a reset gate that is not a Sigmoid: its R reads "
            "r⊙h, which the layer-wise pass does not reproduce"
        )
    out: list[Part] = []
    hcols: Cols = "h" if geom.linear_before_reset else "rh"
    for k in range(geom.directions):
        if geom.op == "GRU" and only == "xh":
            out += [Part(k, 0, 2 * H, "xh"), Part(k, 2 * H, 3 * H, "x"), Part(k, 2 * H, 3 * H, hcols)]
        elif geom.op == "GRU" and only == "h":
            out += [Part(k, 0, 2 * H, "h"), Part(k, 2 * H, 3 * H, hcols)]
        else:
            out.append(Part(k, 0, G * H, only))
    return out


def part_rows(
    z: NDArray[np.float32],
    part: Part,
    geom: RecurrentGeometry,
    J: NDArray[np.floating] | None = None,
    bias: NDArray[np.floating] | None = None,
) -> NDArray[np.float32]:
    """The input rows of ``part`` from the rows ``z (R, I + H)`` of :func:`step_rows`.  For ``rh``:
    ``r ⊙ h`` with ``r = σ(clip(J[H:2H]·z + b_r))`` from the direction's dense joint weight ``J (3H,
    I + H)`` and bias ``bias (6H,)`` (``Wb ; Rb``, zeros when None)."""
    if part.cols != "rh":
        return np.ascontiguousarray(z[:, part.col_slice(geom)])
    if J is None:
        raise ValueError("the rows r⊙h need the dense weights of the reset gate")
    H, i = geom.hidden, geom.input_size
    b = np.zeros(6 * H) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    pre = z.astype(np.float64) @ np.asarray(J, np.float64)[H : 2 * H].T + b[H : 2 * H] + b[4 * H : 5 * H]
    if geom.clip > 0:
        pre = np.clip(pre, -geom.clip, geom.clip)
    r = 1.0 / (1.0 + np.exp(-pre))
    return np.ascontiguousarray(r * z[:, i:], dtype=np.float32)


def joint_weight(W: NDArray[np.floating], R: NDArray[np.floating]) -> NDArray[np.float64]:
    """``[W_d  R_d]`` for every direction: ``(D, G·H, I + H)`` float64."""
    return np.concatenate([np.asarray(W, np.float64), np.asarray(R, np.float64)], axis=2)


def split_joint(J: NDArray[np.floating], input_size: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Inverse of :func:`joint_weight`: ``(W, R)``."""
    a = np.asarray(J, np.float64)
    return np.ascontiguousarray(a[:, :, :input_size]), np.ascontiguousarray(a[:, :, input_size:])


def _time_major(
    X: NDArray[np.generic], Y: NDArray[np.generic], h0: NDArray[np.generic] | None, geom: RecurrentGeometry
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
    """``X [T, N, I]``, ``Y [T, D, N, H]``, ``h0 [D, N, H]`` (zeros when absent), float32."""
    x = np.asarray(X, np.float32)
    y = np.asarray(Y, np.float32)
    if geom.layout == 1:
        x = np.swapaxes(x, 0, 1)
        y = np.transpose(y, (1, 2, 0, 3))
    T, N = x.shape[:2]
    D, H = geom.directions, geom.hidden
    if x.shape[2] != geom.input_size or y.shape != (T, D, N, H):
        raise ModelError(
            f"recurrent node tensors do not match: X {list(np.shape(X))}, Y {list(np.shape(Y))} "
            f"for D={D}, H={H}, I={geom.input_size}, layout={geom.layout}"
        )
    if h0 is None:
        h = np.zeros((D, N, H), np.float32)
    else:
        h = np.asarray(h0, np.float32)
        if geom.layout == 1:
            h = np.swapaxes(h, 0, 1)
        h = np.broadcast_to(h, (D, N, H))
    return x, y, h


def _valid_lengths(lens: NDArray[np.integer] | None, T: int, N: int) -> NDArray[np.int64]:
    """Steps per sequence ``(N,)``: ``sequence_lens`` clipped to ``[0, T]``, or ``T`` when absent."""
    if lens is None:
        return np.full(N, T, np.int64)
    return np.clip(np.asarray(lens, np.int64).reshape(-1), 0, T)


def num_step_rows(X: NDArray[np.generic], geom: RecurrentGeometry, lens: NDArray[np.integer] | None = None) -> int:
    """How many rows :func:`step_rows` returns for ``X`` (per direction), without building them."""
    T, N = (X.shape[0], X.shape[1]) if geom.layout == 0 else (X.shape[1], X.shape[0])
    return int(_valid_lengths(lens, T, N).sum())


def step_rows(
    X: NDArray[np.generic],
    Y: NDArray[np.generic],
    geom: RecurrentGeometry,
    direction: int,
    *,
    initial_h: NDArray[np.generic] | None = None,
    lens: NDArray[np.integer] | None = None,
) -> NDArray[np.float32]:
    """The input rows ``z_t = [x_t ; h_{t−1}]`` of direction ``direction``: ``(R, I + H)`` float32,
    one per valid step ``t < lens[n]`` of every sequence ``n``, time-major (``t`` outer, ``n`` inner).

    ``Y`` is the node's own output on these inputs (so ``h_{t−1}`` is exact), ``initial_h`` its
    ``initial_h`` input, ``lens`` its ``sequence_lens`` (all ``T`` when absent).
    """
    x, y, h0 = _time_major(X, Y, initial_h, geom)
    T, N = x.shape[:2]
    hd = y[:, direction]  # [T, N, H]
    L = _valid_lengths(lens, T, N)
    prev = np.empty_like(hd)
    if geom.reverse(direction):
        prev[:-1] = hd[1:]
        prev[-1] = h0[direction]
        last = L - 1
        for n in np.flatnonzero((L < T) & (L > 0)):
            prev[last[n], n] = h0[direction, n]
    else:
        prev[1:] = hd[:-1]
        prev[0] = h0[direction]
    z = np.concatenate([x, prev], axis=2)  # [T, N, I + H]
    valid = np.arange(T)[:, None] < L[None, :]
    if valid.all():
        return np.ascontiguousarray(z.reshape(T * N, -1))
    return np.ascontiguousarray(z[valid])


def gate_preactivations(
    X: NDArray[np.generic],
    Y: NDArray[np.generic],
    W: NDArray[np.floating],
    R: NDArray[np.floating],
    geom: RecurrentGeometry,
    direction: int,
    *,
    initial_h: NDArray[np.generic] | None = None,
    lens: NDArray[np.integer] | None = None,
) -> NDArray[np.float64]:
    """``[W_d R_d] z_t`` for every row of :func:`step_rows` ``(R, G·H)`` (no biases)."""
    z = step_rows(X, Y, geom, direction, initial_h=initial_h, lens=lens).astype(np.float64)
    out: NDArray[np.float64] = z @ joint_weight(W, R)[direction].T
    return out


def saliency(
    W_bar: NDArray[np.floating], H: NDArray[np.floating], B: NDArray[np.floating] | None, damp: float, select: str
) -> NDArray[np.float64]:
    """How much keeping each weight of a part ``W̄ (M, d)`` is worth, comparable across parts: the OBS
    saliency ``w*² / [H_λ⁻¹]_jj`` of the damped re-fit target ``w*`` (``|w*|`` for ``magnitude``)."""
    dh = damp_gram(np.asarray(H, np.float64), damp)
    _, W_star = targets(np.asarray(W_bar, np.float64), dh, None if B is None else np.asarray(B, np.float64))
    if select == "magnitude":
        return np.abs(W_star)
    return obs_saliency(W_star, dh.inverse_diag())


def allot(scores: list[NDArray[np.float64]], keep: int) -> list[int]:
    """Keep counts per part (summing to exactly ``keep``) from the ``keep`` largest scores of all
    parts together (one threshold on comparable saliencies, as for the groups of a Conv)."""
    sizes = [int(s.size) for s in scores]
    if keep >= sum(sizes):
        return sizes
    width = max(sizes)
    padded = np.full((len(scores), 1, width), -np.inf)
    for k, s in enumerate(scores):
        padded[k, 0, : s.size] = s.reshape(-1)
    return [int(c) for c in split_budget(padded, keep)]
