"""The onnx backend's graph: the bundle's exported ONNX (onnx/model.onnx) run by onnxruntime.

OnnxGraph takes and returns torch tensors with the engine's graph signature. Every input is bound by address
(IOBinding.bind_input with the tensor's data_ptr), so onnxruntime reads the torch memory itself: the KV cache is
never copied, on the CPU or on the GPU. Outputs are allocated by onnxruntime on the graph's device and handed to
torch through DLPack (OrtValue.__dlpack__: public since onnxruntime 1.31, on the C binding since 1.21), again
without a copy or a host round trip. The graph never writes the cache: the engine writes new_k / new_v.

On CUDA (onnxruntime-gpu), the session runs on torch's current stream (user_compute_stream), so it sees what torch
wrote before the call and torch sees its outputs after it, without extra synchronization.
"""
from __future__ import annotations

from pathlib import Path

import torch

from llmc.common.contract import EXPORTED_INPUTS, STEP_OUTPUTS
from llmc.runtime.bundle import BundleError

# onnx.TensorProto data types, which IOBinding takes as element types (numpy has no bfloat16 or float8).
ELEMENT_TYPES = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int32: 6, torch.int64: 7, torch.bool: 9,
                 torch.float16: 10, torch.float64: 11, torch.bfloat16: 16, torch.float8_e4m3fn: 17}
ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
             "tensor(float8e4m3fn)": torch.float8_e4m3fn, "tensor(double)": torch.float64}
INSTALL_ORT = "pip install llmc[onnx]"
INSTALL_ORT_GPU = "pip install onnxruntime-gpu"


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BundleError(f"this bundle runs with onnxruntime, which is not installed; {INSTALL_ORT} "
                          f"(on a GPU host: {INSTALL_ORT_GPU})") from None
    return onnxruntime


class OnnxGraph:
    """Callable (input_ids, positions, k_cache, v_cache, block_table, past_lens, last_index, slot_mapping) ->
    (logits [B, V], new_k, new_v [L, B, S, Hkv, D]) on `device`; slot_mapping is ignored (the graph does not write
    the cache)."""

    def __init__(self, model_path: str | Path, device: str | torch.device, dtype: torch.dtype):
        ort = import_onnxruntime()
        model_path = Path(model_path)
        if not model_path.is_file():
            raise BundleError(f"{model_path} is missing; rebuild the bundle with llmc compile --backend onnx")
        self.device = torch.device(device)
        self.dtype = dtype
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(model_path), options, providers=self._providers(ort))
        self._check_signature(model_path)
        if self.device.type == "cuda":
            self._device_type, self._device_id = "cuda", self.device.index or torch.cuda.current_device()
        else:
            self._device_type, self._device_id = "cpu", 0
        self.binding = self.session.io_binding()

    def _providers(self, ort) -> list:
        if self.device.type == "cpu":
            return ["CPUExecutionProvider"]
        if self.device.type != "cuda":
            raise BundleError(f"the onnx backend runs on cpu or cuda, not {self.device.type}")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BundleError(f"this onnxruntime has no CUDA execution provider; {INSTALL_ORT_GPU} (and uninstall "
                              f"the CPU-only onnxruntime) to run on {self.device}")
        stream = torch.cuda.current_stream(self.device).cuda_stream
        options = {"device_id": self.device.index or torch.cuda.current_device(),
                   "user_compute_stream": str(stream)}
        return [("CUDAExecutionProvider", options)]

    def _check_signature(self, model_path: Path) -> None:
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        missing = [n for n in EXPORTED_INPUTS if n not in inputs] + [n for n in STEP_OUTPUTS if n not in outputs]
        if missing:
            raise BundleError(f"{model_path} lacks {missing[0]!r}, which the llmc runtime binds; rebuild the bundle "
                              f"with this llmc (llmc compile --backend onnx)")
        cache_dtype = ORT_TYPES.get(inputs["k_cache"])
        if cache_dtype != self.dtype:
            raise BundleError(f"{model_path} takes a {inputs['k_cache']} KV cache but the bundle's dtype is "
                              f"{self.dtype}; rebuild the bundle")

    def bind(self, *tensors: torch.Tensor) -> None:
        """Binds the seven inputs (EXPORTED_INPUTS order) by address, and fresh outputs on the device."""
        if len(tensors) != len(EXPORTED_INPUTS):
            raise TypeError(f"OnnxGraph takes {len(EXPORTED_INPUTS)} inputs ({', '.join(EXPORTED_INPUTS)}), got "
                            f"{len(tensors)}")
        self._bound = []  # keeps contiguous copies alive until the run; the engine's inputs are contiguous already
        for name, tensor in zip(EXPORTED_INPUTS, tensors):
            if tensor.device != self.device:
                raise ValueError(f"{name} is on {tensor.device} but the ONNX graph runs on {self.device}")
            tensor = tensor.contiguous()
            self._bound.append(tensor)
            self.binding.bind_input(name, self._device_type, self._device_id, ELEMENT_TYPES[tensor.dtype],
                                    list(tensor.shape), tensor.data_ptr())
        # Rebinding each output drops the previous run's buffer (which torch may still hold): onnxruntime would
        # otherwise write the next run into it, or refuse a new shape.
        for name in STEP_OUTPUTS:
            self.binding.bind_output(name, self._device_type, self._device_id)

    def run_bound(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs what bind() bound; outputs as torch tensors sharing onnxruntime's memory."""
        self.session.run_with_iobinding(self.binding)
        # In the order bind_output first named them, whatever the model's own output order.
        return tuple(_to_torch(value) for value in self.binding.get_outputs())

    def __call__(self, input_ids, positions, k_cache, v_cache, block_table, past_lens, last_index,
                 slot_mapping=None):
        self.bind(input_ids, positions, k_cache, v_cache, block_table, past_lens, last_index)
        return self.run_bound()


def _to_torch(value) -> torch.Tensor:
    # The capsule owns a reference to onnxruntime's buffer, so the tensor outlives the OrtValue and the binding.
    return torch.from_dlpack(value if hasattr(value, "__dlpack__") else value._ortvalue)
