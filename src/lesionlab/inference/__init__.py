"""Inference: the Predictor contract (PyTorch, ONNX Runtime, ensembles), ONNX export, Grad-CAM."""
