"""``python -m comfy_worker.provision``: what start.sh runs before the worker (see ``run``)."""

import sys

from comfy_worker.provision.run import main

sys.exit(main())
