"""Running networks: torch, torch.compile, ONNX Runtime and TensorRT behind one backend
interface; ONNX export and its cache; TensorRT engines; the parity check."""
