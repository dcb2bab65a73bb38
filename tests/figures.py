"""Figures the host tiers measure (the image tier's are in ``docker_image``), printed in the run's summary as
``<tier> tier: <line>`` by conftest: timings of one run, for the record, never asserted."""

from __future__ import annotations

FIGURES: list[tuple[str, str]] = []  # (tier, line)
