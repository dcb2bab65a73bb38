"""RunPod serverless entry point: ``python handler.py`` takes jobs; the README shows the local modes.

Everything lives in the ``comfy_worker`` package; this file stays the name RunPod and users expect.
"""

from comfy_worker.runtime.app import main

if __name__ == "__main__":
    main()
