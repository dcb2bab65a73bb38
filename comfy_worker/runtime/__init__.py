"""The worker: ``app`` wires the runpod SDK to ``job`` (one job from input to result, in flight with others),
which takes it through its stages: ``intake`` (the input read with ``schema`` and ``workflow``),
``preparation`` (models, and inputs by URL with ``fetch``), ``execution`` (the prompt on ComfyUI, followed by
``follow``) and ``results`` (``outputs`` and ``delivery``), with ``attempt`` (one job's ids and clock),
``cleanup`` (a job's files removed) and ``diagnostics`` (what a failed job reports)."""
