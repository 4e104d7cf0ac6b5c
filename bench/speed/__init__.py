"""Speed of the gradient methods and the forwards, side by side with eager torch and Captum.

Run ``python -m bench.speed`` (``make bench`` runs it too). Two models: a ResNet-18 layout
at 224x224 (random weights: speed depends on the architecture, not the weights) and the
default model (trained weights when its cache exists, else its architecture untrained).
On each, in one process, batch 8, every measurement interleaved repeat by repeat so that
load from other processes hits all of them alike, each ratio taken within a repeat and
the median over repeats reported:

* plain eager forward of the model as given (``inference_mode``), of our optimised copy
  (:func:`service.runtime.optimize.optimize_for_inference`), and ONNX Runtime (the
  artifact the archive ships, through :class:`service.runtime.onnx_forward.OnnxForward`)
  at batch 1 and 8;
* our ``vanilla_gradient`` (the engine on the optimised model) against Captum's
  ``Saliency`` on the model as given, and against the plain forward;
* our ``smoothgrad`` (16 samples) and ``integrated_gradients`` (16 steps) against Captum's
  ``NoiseTunnel(Saliency)`` and ``IntegratedGradients`` at the best of several batch
  settings, found first on the same run;
* ``grad_cam`` against the plain forward;
* activation memory per image (bytes autograd keeps for one input gradient) and the rows
  per pass (chunk size) chosen on this device.

Writes ``bench/results/speed.md``; exits 1 on a missed bar only with ``--strict`` (so that
``bench.run`` goes on to the next suite).
"""

from __future__ import annotations

from pathlib import Path

MODULE = "bench.speed"
RESULTS = Path(__file__).resolve().parent.parent / "results" / "speed.md"
BATCH = 8
SAMPLES = 16  # SmoothGrad samples and Integrated Gradients steps
NOISE = 0.15
CAPTUM_ROWS = (8, 32, 128)  # rows per pass Captum is tried with (its batch settings)
MEMORY_BUDGET = 1 << 30  # activations of one pass, ours (chunk size) and Captum's alike
