"""The user's side, run on a laptop: ``client`` (send a workflow, save the outputs), ``jobapi`` (RunPod's job
API over the standard library, shared with the ComfyUI bridge as a byte-identical copy) and ``model_sync``
(upload a models folder to a network volume). They never import the worker's runtime or provisioning."""
