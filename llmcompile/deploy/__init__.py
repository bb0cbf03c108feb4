"""Deployment: ONNX export of a causal LM (``export``) and a small runner of such files
(``runner.OnnxCausalLM``)."""
