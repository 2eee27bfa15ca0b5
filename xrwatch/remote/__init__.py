"""Inference on a Triton Inference Server fleet instead of the local ONNX Runtime.

* :mod:`xrwatch.remote.repository` - the model's xrwatch metadata as Triton config
  parameters, and a Python-backend model repository for a server without the
  onnxruntime backend.
* :mod:`xrwatch.remote.triton_model` - the Python-backend model itself (ONNX Runtime, no
  xrwatch import): runs inside the server.
* :mod:`xrwatch.remote.triton` - :class:`~xrwatch.remote.triton.TritonEngine`, the client
  engine behind the daemon's and ``classify``'s engine interface (``xrwatch[triton]``).
* :mod:`xrwatch.remote.localserver` - starts the ``tritonserver`` that the
  ``nvidia-pytriton`` wheel bundles, on loopback (tests, benchmarks, a single node).
"""
