"""The wire contract shared by client, CLI, gateway, handler and pipeline.

Two layers, so that every host can use what it needs and nothing more:

* ``errors``, ``params``, ``limits``, ``families``: the standard library only. The engine
  imports these (its error classes, its typed parameters) and so stays free of protobuf.
* ``names``, ``request``, ``events``: bind the rules to the generated ``saliency.v1``
  messages (protobuf, nothing heavier).

No module here imports torch, numpy, OpenCV, ONNX Runtime or TorchServe, and this
``__init__`` imports nothing: ``tests/client`` checks both in a subprocess that blocks them.
"""
