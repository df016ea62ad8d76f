"""Inference engines from a trained model: quantize (FP16/INT8 ONNX) and the parity gate it shares with
check_parity, build_engine (TensorRT, also the cart's boot-time build), export_triton, latency. A CLI's
parts sit beside it, named after it (parity_*, quantize_* with qdq_graph and onnx_runs, triton_*)."""
