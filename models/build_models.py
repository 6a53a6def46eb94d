"""Train and export the example models bundled with chita-onnx.

Run ``python models/build_models.py`` (from any directory) to rebuild, deterministically:

* ``models/digits_mlp.onnx`` -- a small MLP on scikit-learn's 8x8 handwritten digits,
* ``models/digits_cnn.onnx`` -- a small CNN (Conv, depthwise Conv, BatchNormalization, MaxPool,
  GlobalAveragePool, Gemm) on the same data,
* ``models/digits_calib.npz`` and ``models/digits_test.npz`` -- fixed calibration and test splits.

Training needs neither PyTorch nor ``onnxruntime.training.artifacts``: each network is written once as
an ONNX *training* graph (batch-statistics BatchNormalization spelled out as arithmetic, followed by
``SoftmaxCrossEntropyLoss``), onnxruntime-training's ``GradientGraphBuilder`` turns it into a graph
that also outputs the gradient of the loss with respect to every weight, a plain single-threaded
``onnxruntime.InferenceSession`` runs that graph over seeded mini-batches, and AdamW is done in NumPy.
The exported *inference* graph uses real ``BatchNormalization`` nodes whose running mean/variance are
recomputed exactly over the training set after training.

The module is also a small library.  :func:`train_classifier` trains any network described by a
:class:`Network`, and :func:`train_mlpnet_mnist` trains the CHITA paper's MLPNet on MNIST (used by
``benchmarks/make_mlpnet.py``).  It has no side effects on import and can be loaded by path::

    spec = importlib.util.spec_from_file_location("build_models", "models/build_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
"""

import argparse
import contextlib
import io
import logging
import math
import os
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import _pybind_state as ort_c

LOGGER = logging.getLogger("build_models")

#: ONNX versions of every exported model.  onnxruntime 1.19 loads at most IR version 10 / opset 21,
#: while ``onnx.helper.make_model`` defaults to newer ones, so both are always set explicitly.
OPSET = 17
IR_VERSION = 10
PRODUCER_NAME = "chita-onnx models/build_models.py"
PRODUCER_VERSION = "0.1.0"

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
LABELS_NAME = "labels"
LOSS_NAME = "loss"
BN_EPSILON = 1e-5

#: Seed of everything random in the digits models: the test split, the calibration subset, the
#: weight initialisation and the mini-batch order.
DIGITS_SEED = 0
DIGITS_TEST_SIZE = 500
DIGITS_CALIB_SIZE = 256
#: The digits pixels are integers 0..16; the models take ``pixel / 16``.
DIGITS_PIXEL_MAX = 16.0

#: MNIST normalisation used by the CHITA / CBS papers for MLPNet.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_SEED = 0
MNIST_CALIB_SIZE = 1000

MODELS_DIR = Path(__file__).resolve().parent
Weights = dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Images and integer labels of one data split, ready to feed to a model."""

    image: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.image.dtype != np.float32 or self.labels.dtype != np.int64:
            raise TypeError(f"expected float32 images and int64 labels, got {self.image.dtype}, {self.labels.dtype}")
        if len(self.image) != len(self.labels):
            raise ValueError(f"{len(self.image)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "Split":
        """Return the samples at ``indices`` (a copy)."""
        return Split(np.ascontiguousarray(self.image[indices]), np.ascontiguousarray(self.labels[indices]))


@dataclass(frozen=True)
class DigitsData:
    """The fixed splits of the 8x8 digits data set: ``train`` (never shipped), ``calib`` (a subset of
    ``train``) and ``test`` (held out, stratified)."""

    train: Split
    calib: Split
    test: Split


def load_digits_splits(seed: int = DIGITS_SEED) -> DigitsData:
    """Load scikit-learn's 1,797 8x8 digits and split them deterministically.

    The test split holds ``DIGITS_TEST_SIZE`` images, stratified by class; the remaining images are
    the training split, of which a seeded random subset of ``DIGITS_CALIB_SIZE`` images is the
    calibration split.  Images are float32 ``[N, 1, 8, 8]`` scaled by 1/16, labels int64 ``[N]``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (np.asarray(digits.images, dtype=np.float64) / DIGITS_PIXEL_MAX).astype(np.float32)
    images = images.reshape(-1, 1, 8, 8)
    labels = np.asarray(digits.target, dtype=np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_SIZE, stratify=labels, random_state=seed
    )
    full = Split(images, labels)
    train = full.subset(np.asarray(train_idx))
    rng = np.random.default_rng(seed)
    calib = train.subset(rng.choice(len(train), size=DIGITS_CALIB_SIZE, replace=False))
    return DigitsData(train=train, calib=calib, test=full.subset(np.asarray(test_idx)))


def normalise_mnist(images: np.ndarray) -> np.ndarray:
    """Map uint8 MNIST images ``[N, 28, 28]`` to float32 ``[N, 784]`` as ``(x/255 - 0.1307)/0.3081``."""
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1) / 255.0
    return ((x - MNIST_MEAN) / MNIST_STD).astype(np.float32)


def save_npz(path: Path, split: Split) -> None:
    """Save ``split`` as a compressed ``.npz`` with keys ``image`` and ``labels``.

    Unlike ``numpy.savez_compressed``, the zip entries get a fixed timestamp, so that the same data
    always gives a bitwise identical file.  The arrays are written with ``allow_pickle=False``.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in (("image", split.image), ("labels", split.labels)):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


# --------------------------------------------------------------------------------------------------
# Network description
# --------------------------------------------------------------------------------------------------


class GraphWriter:
    """Collects the ONNX nodes of one network, either in its training or in its inference form.

    The two forms differ only in :meth:`batchnorm`: the training form normalises with the statistics
    of the current mini-batch, spelled out as differentiable arithmetic (``GradientGraphBuilder`` has
    no gradient for ``BatchNormalization``), the inference form is a ``BatchNormalization`` node that
    reads the running statistics ``<prefix>.mean`` / ``<prefix>.var``.  Node names equal the names of
    their (first) output tensors.
    """

    def __init__(self, *, training: bool) -> None:
        self.training = training
        self.nodes: list[onnx.NodeProto] = []
        self.constants: dict[str, np.ndarray] = {}
        #: BatchNormalization prefix -> name of the tensor it normalises.
        self.batchnorm_inputs: dict[str, str] = {}

    def add(
        self,
        op_type: str,
        inputs: Sequence[str],
        outputs: str | Sequence[str],
        *,
        node_name: str | None = None,
        **attrs: Any,
    ) -> str:
        """Append a node (named ``node_name``, default: its first output) and return its first output."""
        names = [outputs] if isinstance(outputs, str) else list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=node_name or names[0], **attrs))
        return names[0]

    def constant(self, name: str, value: np.ndarray) -> str:
        """Register a non-trainable initializer and return its name."""
        self.constants[name] = value
        return name

    def conv(self, x: str, name: str, *, pads: int = 0, group: int = 1) -> str:
        """Bias-free 2-D convolution with weight ``<name>.weight``, stride 1, symmetric padding."""
        return self.add("Conv", [x, f"{name}.weight"], name, pads=[pads] * 4, group=group)

    def batchnorm(self, x: str, prefix: str) -> str:
        """Per-channel batch normalisation of the NCHW tensor ``x``."""
        self.batchnorm_inputs[prefix] = x
        params = [f"{prefix}.scale", f"{prefix}.bias"]
        if not self.training:
            stats = [f"{prefix}.mean", f"{prefix}.var"]
            return self.add("BatchNormalization", [x, *params, *stats], prefix, epsilon=BN_EPSILON)
        shape = self.constant("bn.broadcast_shape", np.array([1, -1, 1, 1], dtype=np.int64))
        eps = self.constant("bn.epsilon", np.array(BN_EPSILON, dtype=np.float32))
        mean = self.add("ReduceMean", [x], f"{prefix}.batch_mean", axes=[0, 2, 3], keepdims=1)
        centred = self.add("Sub", [x, mean], f"{prefix}.centred")
        squared = self.add("Mul", [centred, centred], f"{prefix}.centred_sq")
        var = self.add("ReduceMean", [squared], f"{prefix}.batch_var", axes=[0, 2, 3], keepdims=1)
        std = self.add("Sqrt", [self.add("Add", [var, eps], f"{prefix}.var_eps")], f"{prefix}.std")
        normed = self.add("Div", [centred, std], f"{prefix}.normed")
        scale = self.add("Reshape", [params[0], shape], f"{prefix}.scale_4d")
        bias = self.add("Reshape", [params[1], shape], f"{prefix}.bias_4d")
        return self.add("Add", [self.add("Mul", [normed, scale], f"{prefix}.scaled"), bias], prefix)

    def relu(self, x: str, name: str) -> str:
        """Elementwise ReLU."""
        return self.add("Relu", [x], name)

    def gemm(self, x: str, name: str, *, bias: bool = True, output: str | None = None) -> str:
        """``x @ W.T (+ b)`` as ``Gemm(transB=1)`` with ``<name>.weight`` of shape [out, in]."""
        inputs = [x, f"{name}.weight"] + ([f"{name}.bias"] if bias else [])
        return self.add("Gemm", inputs, output or name, node_name=name, transB=1)

    def matmul_add(self, x: str, name: str) -> str:
        """``x @ W + b`` as ``MatMul`` + ``Add`` with ``<name>.weight`` of shape [in, out]."""
        product = self.add("MatMul", [x, f"{name}.weight"], f"{name}.matmul")
        return self.add("Add", [product, f"{name}.bias"], name)


@dataclass(frozen=True)
class Network:
    """A trainable classifier: its graph (written by ``forward``) and its initial weights.

    ``forward`` writes the nodes from the graph input :data:`INPUT_NAME` to the output
    :data:`OUTPUT_NAME`.  ``init_weights`` holds every trainable tensor; each BatchNormalization
    prefix in ``batchnorms`` (prefix, channels) also owns the buffers ``<prefix>.mean`` and
    ``<prefix>.var``, which are not trained but estimated after training.
    """

    name: str
    input_shape: tuple[int, ...]
    forward: Callable[[GraphWriter], str]
    init_weights: Weights
    batchnorms: tuple[tuple[str, int], ...] = ()
    doc_string: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def _he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, gain: float = 2.0) -> np.ndarray:
    """Gaussian initialisation with variance ``gain / fan_in`` (He init for ReLU when gain is 2)."""
    return (rng.standard_normal(shape) * math.sqrt(gain / fan_in)).astype(np.float32)


def make_digits_mlp(seed: int = DIGITS_SEED) -> Network:
    """The digits MLP: Flatten, Gemm 64->64, Relu, MatMul+Add 64->32, Relu, Gemm 32->10."""
    rng = np.random.default_rng(seed)
    weights: Weights = {
        "fc1.weight": _he_normal(rng, (64, 64), 64),  # Gemm transB=1: [out, in]
        "fc1.bias": np.zeros(64, np.float32),
        "fc2.weight": _he_normal(rng, (64, 32), 64),  # MatMul: [in, out]
        "fc2.bias": np.zeros(32, np.float32),
        "fc3.weight": _he_normal(rng, (10, 32), 32, gain=1.0),  # Gemm transB=1: [out, in]
        "fc3.bias": np.zeros(10, np.float32),
    }

    def forward(g: GraphWriter) -> str:
        x = g.add("Flatten", [INPUT_NAME], "flatten", axis=1)
        x = g.relu(g.gemm(x, "fc1"), "relu1")
        x = g.relu(g.matmul_add(x, "fc2"), "relu2")
        return g.gemm(x, "fc3", output=OUTPUT_NAME)

    return Network(
        name="digits_mlp",
        input_shape=(1, 8, 8),
        forward=forward,
        init_weights=weights,
        doc_string=(
            "MLP classifier for scikit-learn's 8x8 handwritten digits (UCI optdigits). Input 'image' "
            "float32 [N,1,8,8] = pixel/16 in [0,1]; output 'logits' float32 [N,10] for digits 0-9. "
            "Flatten -> Gemm(64->64, transB=1) -> Relu -> MatMul+Add(64->32) -> Relu -> "
            "Gemm(32->10, transB=1). Built by models/build_models.py of chita-onnx."
        ),
        metadata={"architecture": "Flatten-Gemm(64,64)-Relu-MatMul+Add(64,32)-Relu-Gemm(32,10)"},
    )


def make_digits_cnn(seed: int = DIGITS_SEED) -> Network:
    """The digits CNN.

    Conv 3x3 1->16 + BN + Relu, depthwise Conv 3x3 (group 16) + BN + Relu, Conv 1x1 16->32 + BN + Relu,
    MaxPool 2x2, Conv 3x3 32->32 + BN + Relu, GlobalAveragePool, Flatten, Gemm 32->10.  The
    convolutions have no bias (each is followed by BatchNormalization).
    """
    rng = np.random.default_rng(seed)
    convs = {  # name: (out, in per group, kernel)
        "conv1": (16, 1, 3),
        "conv2": (16, 1, 3),  # depthwise: group = 16
        "conv3": (32, 16, 1),
        "conv4": (32, 32, 3),
    }
    weights: Weights = {}
    batchnorms: list[tuple[str, int]] = []
    for index, (name, (out_ch, in_ch, k)) in enumerate(convs.items(), start=1):
        weights[f"{name}.weight"] = _he_normal(rng, (out_ch, in_ch, k, k), in_ch * k * k)
        weights[f"bn{index}.scale"] = np.ones(out_ch, np.float32)
        weights[f"bn{index}.bias"] = np.zeros(out_ch, np.float32)
        batchnorms.append((f"bn{index}", out_ch))
    weights["fc.weight"] = _he_normal(rng, (10, 32), 32, gain=1.0)
    weights["fc.bias"] = np.zeros(10, np.float32)

    def forward(g: GraphWriter) -> str:
        x = g.relu(g.batchnorm(g.conv(INPUT_NAME, "conv1", pads=1), "bn1"), "relu1")
        x = g.relu(g.batchnorm(g.conv(x, "conv2", pads=1, group=16), "bn2"), "relu2")
        x = g.relu(g.batchnorm(g.conv(x, "conv3"), "bn3"), "relu3")
        x = g.add("MaxPool", [x], "pool1", kernel_shape=[2, 2], strides=[2, 2])
        x = g.relu(g.batchnorm(g.conv(x, "conv4", pads=1), "bn4"), "relu4")
        x = g.add("Flatten", [g.add("GlobalAveragePool", [x], "gap")], "flatten", axis=1)
        return g.gemm(x, "fc", output=OUTPUT_NAME)

    return Network(
        name="digits_cnn",
        input_shape=(1, 8, 8),
        forward=forward,
        init_weights=weights,
        batchnorms=tuple(batchnorms),
        doc_string=(
            "CNN classifier for scikit-learn's 8x8 handwritten digits (UCI optdigits). Input 'image' "
            "float32 [N,1,8,8] = pixel/16 in [0,1]; output 'logits' float32 [N,10] for digits 0-9. "
            "Conv3x3(1->16)-BN-Relu, depthwise Conv3x3(16, group=16)-BN-Relu, Conv1x1(16->32)-BN-Relu, "
            "MaxPool2x2, Conv3x3(32->32)-BN-Relu, GlobalAveragePool, Flatten, Gemm(32->10, transB=1). "
            "BatchNormalization carries running statistics recomputed over the training split. "
            "Built by models/build_models.py of chita-onnx."
        ),
        metadata={
            "architecture": (
                "Conv3x3(1,16)-BN-Relu-DWConv3x3(16,g16)-BN-Relu-Conv1x1(16,32)-BN-Relu-MaxPool2-"
                "Conv3x3(32,32)-BN-Relu-GAP-Gemm(32,10)"
            )
        },
    )


def make_mlpnet(seed: int = MNIST_SEED) -> Network:
    """The CHITA / CBS papers' MLPNet: 784-40-20-10, no biases, ReLU, as ``Gemm(transB=1)``."""
    rng = np.random.default_rng(seed)
    weights: Weights = {
        "fc1.weight": _he_normal(rng, (40, 784), 784),
        "fc2.weight": _he_normal(rng, (20, 40), 40),
        "fc3.weight": _he_normal(rng, (10, 20), 20, gain=1.0),
    }

    def forward(g: GraphWriter) -> str:
        x = g.relu(g.gemm(INPUT_NAME, "fc1", bias=False), "relu1")
        x = g.relu(g.gemm(x, "fc2", bias=False), "relu2")
        return g.gemm(x, "fc3", bias=False, output=OUTPUT_NAME)

    return Network(
        name="mlpnet",
        input_shape=(784,),
        forward=forward,
        init_weights=weights,
        doc_string=(
            "MLPNet (784-40-20-10, no biases, ReLU) of the CHITA and CBS pruning papers, trained on "
            "MNIST. Input 'image' float32 [N,784] = (pixel/255 - 0.1307)/0.3081; output 'logits' "
            "float32 [N,10]. Built by models/build_models.py of chita-onnx."
        ),
        metadata={"architecture": "Gemm(784,40)-Relu-Gemm(40,20)-Relu-Gemm(20,10), no biases"},
    )


# --------------------------------------------------------------------------------------------------
# Graphs
# --------------------------------------------------------------------------------------------------


def _session_options() -> ort.SessionOptions:
    """Single-threaded, sequential, quiet session options (deterministic results)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def _session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, _session_options(), providers=["CPUExecutionProvider"])


def _image_info(network: Network) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", *network.input_shape])


def _make_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def build_training_model(network: Network) -> onnx.ModelProto:
    """The training graph: the forward pass with batch-statistics BN and a mean cross-entropy loss.

    Inputs are ``image``, ``labels`` and every trainable weight (so that the weights can change
    between runs without rebuilding the session); the only output is the scalar ``loss``.
    """
    writer = GraphWriter(training=True)
    logits = network.forward(writer)
    # GradientGraphBuilder crashes unless the optional second output (log_prob) is declared.
    writer.add("SoftmaxCrossEntropyLoss", [logits, LABELS_NAME], [LOSS_NAME, "log_prob"], reduction="mean")
    inputs = [
        _image_info(network),
        helper.make_tensor_value_info(LABELS_NAME, TensorProto.INT64, ["N"]),
        *(helper.make_tensor_value_info(n, TensorProto.FLOAT, w.shape) for n, w in network.init_weights.items()),
    ]
    graph = helper.make_graph(
        writer.nodes,
        f"{network.name}_training",
        inputs,
        [helper.make_tensor_value_info(LOSS_NAME, TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(v, n) for n, v in writer.constants.items()],
    )
    return _make_model(graph)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Redirect file descriptor 2 to /dev/null (the gradient builder logs hundreds of INFO lines there)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def build_gradient_model(training_model: onnx.ModelProto, weight_names: Sequence[str]) -> bytes:
    """Serialized graph with outputs ``loss`` and ``<weight>_grad`` for every name in ``weight_names``."""
    builder = ort_c.GradientGraphBuilder(
        training_model.SerializeToString(), {LOSS_NAME}, set(weight_names), LOSS_NAME, _session_options()
    )
    with _stderr_silenced():
        builder.build()
    model: bytes = builder.get_model()
    return model


def export_inference_model(
    network: Network, weights: Weights, metadata: dict[str, str] | None = None
) -> onnx.ModelProto:
    """The inference graph of ``network`` with ``weights`` (trainable weights and BN buffers) as
    initializers, symbolic batch dimension ``N``, IR version :data:`IR_VERSION`, opset :data:`OPSET`."""
    writer = GraphWriter(training=False)
    network.forward(writer)
    # Initializers in order of first use, so that each layer's tensors are stored together.
    used = list(dict.fromkeys(name for node in writer.nodes for name in node.input if name in weights))
    needed = {name for node in writer.nodes for name in node.input} - {node.output[0] for node in writer.nodes}
    if missing := needed - set(weights) - set(writer.constants) - {INPUT_NAME}:
        raise KeyError(f"{network.name}: no value for {sorted(missing)}")
    if unused := set(weights) - set(used):
        raise KeyError(f"{network.name}: unused weights {sorted(unused)}")
    initializers = [numpy_helper.from_array(np.asarray(weights[n], np.float32), n) for n in used]
    initializers += [numpy_helper.from_array(v, n) for n, v in writer.constants.items()]
    graph = helper.make_graph(
        writer.nodes,
        network.name,
        [_image_info(network)],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 10])],
        initializer=initializers,
        doc_string=network.doc_string,
    )
    model = _make_model(graph)
    model.doc_string = network.doc_string
    props = {"name": network.name, **network.metadata, **(metadata or {})}
    helper.set_model_props(model, props)
    return model


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """AdamW with a cosine learning-rate schedule (no warm-up) over seeded, shuffled mini-batches.

    Weight decay is decoupled (AdamW) and applies to tensors with two or more dimensions only (not to
    biases or BatchNormalization parameters).  The last incomplete mini-batch of each epoch is
    dropped, so that batch-statistics BatchNormalization never sees a tiny batch.
    """

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 0.0
    final_lr_fraction: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    seed: int = 0


@dataclass(frozen=True)
class TrainResult:
    """Trained weights (including BN running statistics) and some bookkeeping."""

    weights: Weights
    epoch_losses: list[float]
    seconds: float


def train_classifier(network: Network, train: Split, config: TrainConfig) -> TrainResult:
    """Train ``network`` on ``train`` with mini-batch AdamW; return the weights for inference.

    Gradients come from onnxruntime-training's ``GradientGraphBuilder`` run by a single-threaded
    ``InferenceSession``; the optimiser runs in NumPy.  Afterwards the running statistics of every
    BatchNormalization layer are set by :func:`estimate_batchnorm_statistics`.  Given the same
    inputs, the result is bitwise reproducible on the same machine and onnxruntime build.
    """
    start = time.perf_counter()
    names = list(network.init_weights)
    session = _session(build_gradient_model(build_training_model(network), names))
    grad_outputs = [LOSS_NAME] + [f"{n}_grad" for n in names]
    available = {o.name for o in session.get_outputs()}
    if missing := set(grad_outputs) - available:
        raise RuntimeError(f"gradient graph lacks outputs {sorted(missing)}")

    params = {n: w.astype(np.float32, copy=True) for n, w in network.init_weights.items()}
    moment1 = {n: np.zeros_like(w) for n, w in params.items()}
    moment2 = {n: np.zeros_like(w) for n, w in params.items()}
    beta1, beta2 = config.betas
    rng = np.random.default_rng(config.seed)
    steps_per_epoch = len(train) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {config.batch_size} exceeds the {len(train)} training samples")
    total_steps = steps_per_epoch * config.epochs
    step = 0
    epoch_losses: list[float] = []
    for epoch in range(config.epochs):
        order = rng.permutation(len(train))
        losses = []
        for batch in range(steps_per_epoch):
            idx = order[batch * config.batch_size : (batch + 1) * config.batch_size]
            feed = {INPUT_NAME: train.image[idx], LABELS_NAME: train.labels[idx], **params}
            loss, *grads = session.run(grad_outputs, feed)
            losses.append(float(loss))
            step += 1
            progress = (step - 1) / total_steps
            cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
            lr = config.learning_rate * (config.final_lr_fraction + (1 - config.final_lr_fraction) * cosine)
            bias1 = 1.0 - beta1**step
            bias2 = 1.0 - beta2**step
            for name, grad in zip(names, grads, strict=True):
                m = moment1[name]
                v = moment2[name]
                m *= beta1
                m += (1.0 - beta1) * grad
                v *= beta2
                v += (1.0 - beta2) * grad * grad
                update = (m / bias1) / (np.sqrt(v / bias2) + config.adam_eps)
                if config.weight_decay and params[name].ndim >= 2:
                    update += config.weight_decay * params[name]
                params[name] -= np.float32(lr) * update.astype(np.float32)
        epoch_losses.append(float(np.mean(losses)))
        LOGGER.debug(
            "%s epoch %d/%d: mean training loss %.4f",
            network.name,
            epoch + 1,
            config.epochs,
            epoch_losses[-1],
        )
    LOGGER.info(
        "%s: %d epochs x %d steps, final mean training loss %.4f",
        network.name,
        config.epochs,
        steps_per_epoch,
        epoch_losses[-1],
    )
    weights: Weights = dict(params)
    if network.batchnorms:
        weights = estimate_batchnorm_statistics(network, weights, train)
    return TrainResult(weights=weights, epoch_losses=epoch_losses, seconds=time.perf_counter() - start)


def estimate_batchnorm_statistics(network: Network, weights: Weights, data: Split, chunk_size: int = 512) -> Weights:
    """Set ``<prefix>.mean`` / ``<prefix>.var`` of every BN layer to the exact statistics of its input.

    Layers are done in graph order; layer *k*'s input is computed by the *inference* graph in which
    layers before *k* already use their final statistics, so each BN layer is calibrated on exactly
    the activations it will see at inference time.  The variance is the biased (population) one,
    consistent with the batch variance used during training.  Sums are accumulated in float64.
    """
    result = dict(weights)
    for prefix, channels in network.batchnorms:  # placeholders until estimated
        result[f"{prefix}.mean"] = np.zeros(channels, np.float32)
        result[f"{prefix}.var"] = np.ones(channels, np.float32)
    writer = GraphWriter(training=False)
    network.forward(writer)
    for prefix, channels in network.batchnorms:
        model = export_inference_model(network, result)
        target = writer.batchnorm_inputs[prefix]
        model.graph.output.append(helper.make_tensor_value_info(target, TensorProto.FLOAT, None))
        session = _session(model.SerializeToString())
        count = 0
        total = np.zeros(channels)
        total_sq = np.zeros(channels)
        for begin in range(0, len(data), chunk_size):
            (act,) = session.run([target], {INPUT_NAME: data.image[begin : begin + chunk_size]})
            act64 = act.astype(np.float64)
            axes = (0, *range(2, act.ndim))  # all but the channel axis
            total += act64.sum(axis=axes)
            total_sq += np.square(act64).sum(axis=axes)
            count += act.size // channels
        mean = total / count
        var = np.maximum(total_sq / count - mean * mean, 0.0)
        result[f"{prefix}.mean"] = mean.astype(np.float32)
        result[f"{prefix}.var"] = var.astype(np.float32)
        LOGGER.debug(
            "%s: %s mean in [%.3f, %.3f], var in [%.3f, %.3f]",
            network.name,
            prefix,
            mean.min(),
            mean.max(),
            var.min(),
            var.max(),
        )
    return result


def predict(model: onnx.ModelProto | bytes, images: np.ndarray, chunk_size: int = 2048) -> np.ndarray:
    """Logits of ``model`` on ``images``, computed with a single-threaded onnxruntime session."""
    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = _session(data)
    chunks = [
        session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + chunk_size]})[0]
        for i in range(0, len(images), chunk_size)
    ]
    return np.concatenate(chunks)


def accuracy(model: onnx.ModelProto | bytes, split: Split) -> float:
    """Top-1 accuracy of ``model`` on ``split`` (onnxruntime, float32)."""
    return float(np.mean(predict(model, split.image).argmax(axis=1) == split.labels))


def prunable_weight_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Number of elements of every weight initializer of a Conv, Gemm or MatMul node (input 1)."""
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    return {
        node.input[1]: sizes[node.input[1]]
        for node in model.graph.node
        if node.op_type in {"Conv", "Gemm", "MatMul"} and node.input[1] in sizes
    }


# --------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------

DIGITS_MLP_CONFIG = TrainConfig(epochs=60, batch_size=32, learning_rate=3e-3, weight_decay=1e-4, seed=DIGITS_SEED)
DIGITS_CNN_CONFIG = TrainConfig(epochs=40, batch_size=32, learning_rate=3e-3, weight_decay=1e-4, seed=DIGITS_SEED)
MLPNET_CONFIG = TrainConfig(epochs=12, batch_size=128, learning_rate=1e-3, seed=MNIST_SEED)


def _describe_config(config: TrainConfig) -> str:
    return (
        f"AdamW lr={config.learning_rate:g} cosine->{config.final_lr_fraction:g}, "
        f"weight_decay={config.weight_decay:g}, batch={config.batch_size}, epochs={config.epochs}, "
        f"seed={config.seed}"
    )


def train_and_export(
    network: Network, train: Split, test: Split, config: TrainConfig, metadata: dict[str, str]
) -> tuple[onnx.ModelProto, float, float]:
    """Train ``network``, export it with ``metadata`` plus the recipe and the test accuracy.

    Returns the model, its onnxruntime test accuracy and the training time in seconds.
    """
    result = train_classifier(network, train, config)
    model = export_inference_model(network, result.weights)
    test_accuracy = accuracy(model, test)
    props = {
        **metadata,
        "training": _describe_config(config),
        "dense_test_accuracy": f"{test_accuracy:.4f}",
        "prunable_weights": str(sum(prunable_weight_counts(model).values())),
    }
    model = export_inference_model(network, result.weights, props)
    LOGGER.info(
        "%s: test accuracy %.2f%% (%d images), trained in %.1f s",
        network.name,
        100 * test_accuracy,
        len(test),
        result.seconds,
    )
    return model, test_accuracy, result.seconds


@dataclass(frozen=True)
class MnistArtifacts:
    """MLPNet trained on MNIST, with its calibration and test splits (normalised, [N, 784])."""

    model: onnx.ModelProto
    calib: Split
    test: Split
    test_accuracy: float
    seconds: float


def load_mnist(path: Path) -> tuple[Split, Split]:
    """Load the ``x_train, y_train, x_test, y_test`` arrays of ``path`` as normalised train/test splits."""
    with np.load(path, allow_pickle=False) as data:
        train = Split(normalise_mnist(data["x_train"]), np.asarray(data["y_train"], dtype=np.int64))
        test = Split(normalise_mnist(data["x_test"]), np.asarray(data["y_test"], dtype=np.int64))
    return train, test


def train_mlpnet_mnist(
    mnist_path: Path,
    config: TrainConfig = MLPNET_CONFIG,
    calib_size: int = MNIST_CALIB_SIZE,
    seed: int = MNIST_SEED,
) -> MnistArtifacts:
    """Train MLPNet on the training images of ``mnist_path`` and evaluate it on its test images.

    The calibration split is a seeded random subset of ``calib_size`` training images; the test split
    is the whole test set.  Input ``image`` float32 [N, 784], output ``logits`` [N, 10].
    """
    train, test = load_mnist(mnist_path)
    rng = np.random.default_rng(seed)
    calib = train.subset(rng.choice(len(train), size=calib_size, replace=False))
    metadata = {
        "dataset": (
            f"MNIST ({len(train)} training images of {mnist_path.name}, full 10k test set); "
            "calibration: seeded subset of the training images"
        ),
        "input": "image float32 [N,784] = (pixel/255 - 0.1307)/0.3081",
        "output": "logits float32 [N,10]; labels 0-9",
    }
    model, test_accuracy, seconds = train_and_export(make_mlpnet(seed), train, test, config, metadata)
    return MnistArtifacts(model=model, calib=calib, test=test, test_accuracy=test_accuracy, seconds=seconds)


DIGITS_METADATA = {
    "dataset": (
        "scikit-learn load_digits (UCI Optical Recognition of Handwritten Digits, CC BY 4.0), "
        f"{DIGITS_TEST_SIZE}-image stratified test split held out, seed {DIGITS_SEED}"
    ),
    "input": "image float32 [N,1,8,8] = pixel/16 in [0,1]",
    "output": "logits float32 [N,10]; labels 0-9",
}


def build_digits_models(out_dir: Path = MODELS_DIR) -> dict[str, float]:
    """Write the digits models and splits into ``out_dir``; return the test accuracy of each model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_digits_splits()
    LOGGER.info(
        "digits: %d train, %d calib (subset of train), %d test images",
        len(data.train),
        len(data.calib),
        len(data.test),
    )
    save_npz(out_dir / "digits_calib.npz", data.calib)
    save_npz(out_dir / "digits_test.npz", data.test)
    accuracies: dict[str, float] = {}
    for network, config in ((make_digits_mlp(), DIGITS_MLP_CONFIG), (make_digits_cnn(), DIGITS_CNN_CONFIG)):
        model, test_accuracy, _ = train_and_export(network, data.train, data.test, config, DIGITS_METADATA)
        path = out_dir / f"{network.name}.onnx"
        onnx.save_model(model, path)
        counts = prunable_weight_counts(model)
        LOGGER.info(
            "wrote %s (%d bytes); prunable weights %s = %d",
            path,
            path.stat().st_size,
            counts,
            sum(counts.values()),
        )
        accuracies[network.name] = test_accuracy
    return accuracies


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: rebuild the digits models and splits."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=MODELS_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    accuracies = build_digits_models(args.out_dir)
    too_low = {name: acc for name, acc in accuracies.items() if acc < 0.95}
    if too_low:
        LOGGER.error("test accuracy below 95%%: %s", too_low)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
