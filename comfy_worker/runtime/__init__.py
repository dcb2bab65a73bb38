"""The worker: ``app`` wires the runpod SDK to ``job`` (one job from input to result), which uses ``schema``
(the job input), ``workflow`` (overrides, convenience fields), ``fetch`` (inputs by URL), ``outputs`` and
``delivery`` (the result's files), ``cleanup`` (a job's files removed) and ``diagnostics`` (what a failed
job reports)."""
