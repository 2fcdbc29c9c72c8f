"""hishrst_export — PyTorch → ONNX → TensorRT export of fitted HisHRST runs into model bundles."""
