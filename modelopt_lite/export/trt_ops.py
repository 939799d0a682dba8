"""What TensorRT 10's ONNX parser accepts, as data for :mod:`.trt_check`.

The operator set is the default ONNX domain's operators in onnx-tensorrt's support matrix
for TensorRT 10 (``docs/operators.md``); any operator of another domain (``com.microsoft``
and other runtime-specific ops) needs a plugin and is reported. Edit these tables when a
TensorRT release adds an operator; the rules in trt_check read nothing else.
"""

from __future__ import annotations

from onnx import TensorProto

MIN_OPSET = 13          # per-axis Q/DQ (the axis attribute) arrives in opset 13
BLOCKED_DQ_OPSET = 21   # DequantizeLinear(block_size) and INT4 arrive in opset 21

# block sizes of TensorRT's INT4 weight-only (block) quantization that the TensorRT / TensorRT-LLM
# INT4 kernels are built for; ModelOpt and this library export 64 and 128
BLOCK_SIZES = (32, 64, 128, 256)

# quantized types TensorRT's Q/DQ layers take, and which of them are 4-bit
QUANT_TYPES = {TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN}
INT4_TYPES = {TensorProto.INT4, TensorProto.UINT4}
BLOCKED_TYPES = {TensorProto.INT4}

# ops an INT4 weight DequantizeLinear may feed (the weight-only GEMM path)
INT4_CONSUMERS = {"MatMul", "Gemm"}

SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool
BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant
ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear
Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU
Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GridSample GroupNormalization HammingWindow HannWindow HardSigmoid HardSwish
Hardmax Identity If InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad
ParametricSoftplus Pow QuantizeLinear RNN RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Sigmoid
Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# known-unsupported ops, with the fix to suggest
UNSUPPORTED_HINTS = {
    "QLinearMatMul": "export Q/DQ + MatMul instead of integer-operator (QOperator) format",
    "QLinearConv": "export Q/DQ + Conv instead of integer-operator (QOperator) format",
    "MatMulInteger": "export Q/DQ + MatMul instead of integer-operator format",
    "ConvInteger": "export Q/DQ + Conv instead of integer-operator format",
    "MatMulNBits": "an onnxruntime contrib op; export DequantizeLinear(block_size) + MatMul",
}
