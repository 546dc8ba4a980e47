"""The runtimes CPU users serve BERT with, as benchmark providers: ONNX Runtime (fp32, and int8 through its own
dynamic quantisation) and OpenVINO on a model exported from transformers' ``BertModel``, and transformers under
``torch.compile``.

Each is optional (``pip install effbert[peers]``): a missing one gives its rows a skip reason, never an error. Each
gets what its users give it: the batch padded to its longest sequence, ``input_ids`` and ``attention_mask``, at
the benchmark's thread count. The cases check their outputs against transformers' eager model (``ATOL``).
"""

import copy
import importlib
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch

ATOL = 1e-3  # largest absolute difference from transformers' eager fp32 output a peer may show
# int8 and bf16 providers against the fp32 output: loose bounds that catch a broken model (a cosine near 0), not
# rounding; each row's note gives its measured max abs difference and smallest per-token cosine. ONNX Runtime's
# default dynamic quantisation of all-MiniLM-L6-v2 reaches a worst per-token cosine of 0.81 (B=8; effbert-int8 0.95).
LOWP_ATOL = 4.0
LOWP_MIN_COSINE = 0.7
# the fused nodes of onnxruntime's BERT optimizer: a graph without them would time the unfused model
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization")
INPUTS = ("input_ids", "attention_mask")


def _missing(modules, what):
    try:
        for name in modules:
            importlib.import_module(name)
    except ImportError as exc:
        return [f"{what} is not installed ({exc}); pip install effbert[peers]"]
    return []


def onnxruntime_reason():
    """Why the ONNX Runtime peer cannot run here ([] when it can)."""
    return _missing(("onnx", "onnxruntime", "onnxruntime.transformers.optimizer"), "onnxruntime")


def onnxruntime_int8_reason():
    """Why the ONNX Runtime int8 peer cannot run here ([] when it can)."""
    return onnxruntime_reason() or _missing(
        ("onnxruntime.quantization",), "onnxruntime.quantization"
    )


def openvino_reason():
    """Why the OpenVINO peer cannot run here ([] when it can). It reads the exported ONNX file, so needs onnx."""
    return _missing(("onnx", "openvino"), "openvino")


def compile_reason():
    """Why transformers under ``torch.compile`` cannot run here: inductor's CPU code needs a C++ compiler."""
    import shutil

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return ["torch.compile on the CPU needs a C++ compiler (g++), none found"]
    return []


class _LastHidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_onnx(hf_model, folder):
    """``hf_model`` (a transformers ``BertModel``) exported to ``folder/model.onnx`` with dynamic batch and length;
    returns the path.

    Exported from a copy with eager attention (the same weights): the SDPA graph exports as a decomposition that
    onnxruntime's optimizer does not fuse into its Attention node. TorchScript exporter (``dynamo=False``): its
    graph is the one the optimizer's BERT patterns match."""
    import transformers

    config = copy.deepcopy(hf_model.config)
    eager = transformers.BertModel._from_config(
        config, attn_implementation="eager", add_pooling_layer=hf_model.pooler is not None
    )
    eager.load_state_dict(hf_model.state_dict())
    # eval on the wrapper too: the exporter restores the wrapper's mode afterwards, recursively
    wrapper = _LastHidden(eager).eval()
    path = Path(folder) / "model.onnx"
    ids = torch.ones(2, 8, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    dynamic = {"batch": 0, "sequence": 1}
    axes = {name: {v: k for k, v in dynamic.items()} for name in (*INPUTS, "last_hidden_state")}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (ids, mask),
            str(path),
            input_names=list(INPUTS),
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return path


def optimize_onnx(path, hf_config):
    """onnxruntime's BERT optimizer on ``path``, written beside it; returns ``(path, fused)``: the optimised file
    and the count of each FUSED_OPS node in it."""
    from onnxruntime.transformers.optimizer import optimize_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize_model(
            str(path),
            model_type="bert",
            num_heads=hf_config.num_attention_heads,
            hidden_size=hf_config.hidden_size,
            opt_level=1,
        )
    out = Path(path).with_name("model.opt.onnx")
    opt.save_model_to_file(str(out))
    counts = Counter(n.op_type for n in opt.model.graph.node)
    return out, {op: counts[op] for op in FUSED_OPS if counts[op]}


def quantize_onnx(path):
    """ONNX Runtime's own dynamic quantisation (``onnxruntime.quantization.quantize_dynamic``, int8 weights, its
    defaults) of the optimised file ``path``, written beside it; returns the quantised file's path. Quantised after
    the BERT optimizer, as onnxruntime's documentation advises: its fused Attention nodes become QAttention."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(path).with_name("model.opt.int8.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the optimiser's com.microsoft nodes defeat ONNX shape inference: the option its error message names
        quantize_dynamic(
            str(path),
            str(out),
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return out


def onnxruntime_runner(path, threads):
    """``fn(input_ids, attention_mask) -> last_hidden_state`` (torch tensors) through an onnxruntime CPU session
    with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def fn(ids, mask):
        return torch.from_numpy(
            session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        )

    return fn


def openvino_runner(path, threads):
    """The same through OpenVINO's CPU plugin: ``threads`` inference threads, one stream, fp32 (the plugin would
    otherwise pick bf16 where the CPU has it)."""
    import openvino as ov

    compiled = ov.Core().compile_model(
        ov.convert_model(str(path)),
        "CPU",
        {
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
        },
    )
    request = compiled.create_infer_request()

    def fn(ids, mask):
        request.infer({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return fn


class Exported:
    """One model's ONNX export, optimised file and runners, made once when first asked for (a BERT-base export and
    optimisation take tens of seconds) and kept in a temporary folder for the process."""

    def __init__(self, hf_model, threads):
        self.hf_model, self.threads = hf_model, threads
        self._dir = None
        self._cache = {}

    def _get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def onnx(self):
        def make():
            self._dir = tempfile.TemporaryDirectory(prefix="effbert-bench-onnx-")
            return export_onnx(self.hf_model, self._dir.name)

        return self._get("onnx", make)

    def optimized(self):
        return self._get("opt", lambda: optimize_onnx(self.onnx(), self.hf_model.config))

    def onnxruntime(self):
        return self._get("ort", lambda: onnxruntime_runner(self.optimized()[0], self.threads))

    def onnxruntime_int8(self):
        return self._get(
            "ort-int8", lambda: onnxruntime_runner(quantize_onnx(self.optimized()[0]), self.threads)
        )

    def openvino(self):
        return self._get("ov", lambda: openvino_runner(self.onnx(), self.threads))

    def fused_note(self):
        fused = self.optimized()[1]
        if not fused:
            return "NO fused attention nodes in the optimised graph"
        return "fused: " + ", ".join(f"{n} {op}" for op, n in fused.items())
