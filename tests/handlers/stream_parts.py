"""A generator handler: yields ``input["parts"]`` items, which the SDK streams and also aggregates."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import runpod


def handler(job: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for index in range(int(job["input"]["parts"])):
        yield {"part": index}


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler, "return_aggregate_stream": True})
