"""Linear quantisation for mixed precision (`codesign.compression.quant`).

layers     the quantisable layers of a network (every conv and the classifier), from its blocks
policy     `QuantPolicy`: per-layer weight/activation bits and per-block execution precision
fakequant  PyTorch fake-quant network (per-channel weights, calibrated activations), QAT

The integer lowering of a quantised network to TVM lives in `codesign.tvm_backend.quantize`.
"""
