"""The user's side, run on a laptop: ``client`` (send a workflow, save the outputs) and ``model_sync`` (upload
a models folder to a network volume). They never import the worker's runtime or provisioning."""
