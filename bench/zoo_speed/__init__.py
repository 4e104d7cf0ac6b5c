"""The zoo's full-size models in the speed bench: gradients against Captum, Grad-CAM and ONNX
Runtime against an eager forward, and the forward-only methods in forwards and seconds.

Run ``python -m bench.zoo_speed`` (``make bench`` runs it too). It writes the section
``## Zoo models at 224 px`` of ``bench/results/speed.md`` (the rest of the file is
``bench.speed``'s and is kept). Per full-size zoo model (random weights from seed 0: speed
depends on the architecture, not the weights), in one process, every measurement of a
group interleaved repeat by repeat (so load from other processes hits all of them alike),
each ratio taken within a repeat and the median over repeats reported:

* **gradients** (batch 8, the predicted class): our ``vanilla_gradient``, ``smoothgrad``
  and ``integrated_gradients`` (the served engine, ``load_bundle`` of a real archive)
  against Captum's ``Saliency``, ``NoiseTunnel(Saliency)`` and ``IntegratedGradients`` (with
  convergence delta, as ours checks completeness) on the model as given, with the same
  number of samples and the same rows per pass (the engine's chunk size); ``grad_cam``
  against one plain eager forward; the ONNX Runtime forward of the archived ``model.onnx``
  against the plain eager forward.
* **perturbation** (one image, each forward-only method at the registry's current
  defaults, read at run time, never written here): forwards per image (the registry's
  count and the rows the ONNX forward actually received), seconds per image, and seconds
  over one batched ONNX Runtime forward of the same chunk (``forward_chunk_size`` rows), timed
  just before the method in the same run; the floor is ``ceil(forwards / chunk)`` such
  forwards. Quality is not reported: with random weights the class evidence is noise, so
  pointing game or deletion AUC would measure nothing.
"""

from __future__ import annotations

MODULE = "bench.zoo_speed"
MODELS = ("resnet50", "efficientnet_b0", "convnext_tiny", "vit_s16")
# (label, numerator, denominator): ratios of times taken within a repeat.
RATIOS = (
    ("vanilla gradient / Captum Saliency", "vanilla_gradient", "captum_saliency"),
    ("SmoothGrad / Captum NoiseTunnel (same n, rows)", "smoothgrad", "captum_smoothgrad"),
    ("Integrated Gradients / Captum IG with delta (same n, rows)", "ig", "captum_ig_delta"),
    ("Grad-CAM / plain eager forward", "grad_cam", "forward_eager"),
    ("vanilla gradient / plain eager forward", "vanilla_gradient", "forward_eager"),
    ("ONNX Runtime forward / plain eager forward", "forward_onnx", "forward_eager"),
)
