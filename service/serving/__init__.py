"""Request-level serving logic shared by every host (TorchServe handler, in-process, bench).

It converts the public protos to engine calls and back; the engine itself knows nothing
of protos, and the hosts know nothing of explanations.
"""
