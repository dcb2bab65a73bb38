"""Does a stream of jobs keep ComfyUI busy? Prints figures; exits 1 only when a job fails (issue #20 item 3).

A worker runs as in production: ``python handler.py`` under ``runpod.serverless.start``, taking jobs from the
loopback RunPod job API of the tests (``tests/runpod_platform.py``). For each ``JOB_CONCURRENCY`` (1, 2, 3) a
fresh worker is deployed, and it is sent two streams of ``--jobs`` jobs, all queued at once: one with its
outputs delivered to S3 (s3rver, ``tests/s3_server.py``), one as base64. Each stream is preceded by one
uncounted warm-up job of the same kind. Every job has:

- an input image by URL (a noisy PNG served by ``tests/file_server.py``; ``INPUT_URL_ALLOWLIST`` lets the
  worker reach loopback), fetched and uploaded into the job's input folder;
- a ComfyUI step of known length: ``StandinSleep`` of ``--seconds`` on the stand-in; on a real ComfyUI,
  ``--blurs`` ``ImageBlur`` nodes (radius 4) in a row on the image, CPU-bound and steady;
- ``--outputs`` large outputs (``RepeatImageBatch`` into ``SaveImage``: PNGs of ``--side`` x ``--side``).

Figures, per setting, from that one stream:

- ``wall``: from queueing the first job to the platform receiving the last result;
- ``sum exec``: ComfyUI's own execution time of the stream's prompts, summed; a prompt's is its ``/history``
  status messages' ``execution_success`` timestamp less its ``execution_start`` one (ComfyUI's ms clock);
- ``io``: one job's input and output time, the same figure for the three settings of a delivery mode, taken
  from its serial run (JOB_CONCURRENCY=1): the median over that stream's jobs of (its result reaching the
  platform - the platform handing it out) - its prompt's execution time. That is input (the SDK's start of
  the handler, validation, URL fetch, upload, queueing the prompt, ComfyUI's start of it) plus output
  (ComfyUI's end to the worker's notice, ``/history``, reading, encoding, uploading, the result post). The
  hand-out time is the job's queueing time plus the platform's ``delayTime`` (ms); ``in``/``out`` split it
  at the prompt's start and end (ComfyUI's epoch clock read against the bench's: one machine);
- ``ratio``: wall / (sum exec + io); the goal is <= 1.05 (a stream that hides every job's input and output
  behind another job's prompt, but the first job's input and the last one's output);
- ``serial``: wall / (the serial run's sum exec + io): on a CPU-only ComfyUI the worker's work for the jobs
  around a prompt takes cores from it, so its prompts run longer as jobs overlap (``sum exec`` grows);
  this ratio counts that slowdown against the setting, ``ratio`` does not;
- ``idle``: ComfyUI's idle time between the stream's prompts (next start - previous end, summed; ``max
  gap`` the longest), ``lead``: queueing the first job to ComfyUI starting its prompt, ``tail``: the last
  prompt's end to its result at the platform.

Missing the goal is reported, not an error. How to run (from the repository root; ``./test.sh`` makes
``.venv`` and installs s3rver into ``.tools``, else ``npm install --prefix .tools s3rver@3.7.1``):

    .venv/bin/python -m bench.stream [--jobs 20] [--seconds 1.5]        # the stand-in ComfyUI
    eval "$(.venv/bin/python -m tests.real_comfyui | sed 's/^/export /')"   # a real ComfyUI on the CPU
    .venv/bin/python -m bench.stream [--blurs 6] [--side 1536]          # COMFYUI_DIR set: that ComfyUI

Everything listens on 127.0.0.1; workers, ComfyUI and s3rver are stopped by process group, temporary
folders removed.
"""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from PIL import Image

from tests.file_server import FileServer
from tests.runpod_platform import RunpodPlatform, SpawnedWorker
from tests.s3_server import S3RVER, S3Server, run_s3rver
from tests.worker_process import ComfyBackend, free_port, worker_env

REPO = Path(__file__).resolve().parents[1]
GOAL = 1.05
INPUT_NAME = "stream_in.png"
BLUR_RADIUS = 4  # radius 8 and more takes torch's slow path on the CPU: seconds per 1024x1024 image
log = logging.getLogger("bench.stream")


class JobFailed(RuntimeError):
    """A job of the stream did not succeed: the run is broken, its figures meaningless."""


@dataclass(frozen=True)
class Shape:
    """What every job does (from the command line)."""

    backend: ComfyBackend
    seconds: float
    blurs: int
    side: int
    outputs: int

    def workflow(self, prefix: str) -> dict[str, Any]:
        """LoadImage -> the step of known length -> ``outputs`` copies -> SaveImage."""
        graph: dict[str, Any] = {"1": {"class_type": "LoadImage", "inputs": {"image": INPUT_NAME}}}
        last = "1"
        if self.backend.name == "standin":
            graph["2"] = {"class_type": "StandinSleep", "inputs": {"image": ["1", 0], "seconds": self.seconds}}
            last = "2"
        else:
            for index in range(self.blurs):
                node = f"b{index}"
                inputs = {"image": [last, 0], "blur_radius": BLUR_RADIUS, "sigma": 1.0}
                graph[node] = {"class_type": "ImageBlur", "inputs": inputs}
                last = node
        graph["8"] = {"class_type": "RepeatImageBatch", "inputs": {"image": [last, 0], "amount": self.outputs}}
        graph["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}}
        return graph

    def describe(self) -> str:
        step = f"StandinSleep {self.seconds:g} s" if self.backend.name == "standin" else f"{self.blurs} x ImageBlur"
        image = f"{self.side}x{self.side}"
        return f"{self.backend.name} ComfyUI; each job: a {image} input by URL, {step}, {self.outputs} outputs"


@dataclass
class JobRecord:
    """One job of a stream, on the bench's monotonic clock (``queued``, ``taken``, ``done``) and ComfyUI's
    epoch clock in seconds (``start``, ``end``)."""

    job_id: str
    queued: float
    taken: float = 0.0
    done: float = 0.0
    start: float = 0.0
    end: float = 0.0
    output_bytes: int = 0

    @property
    def exec_s(self) -> float:
        return self.end - self.start


@dataclass
class Stream:
    """The figures of one stream (one setting)."""

    concurrency: int
    delivery: str
    jobs: list[JobRecord]
    epoch_offset: float  # time.time() - time.monotonic(): ComfyUI's clock against the bench's

    def epoch(self, monotonic: float) -> float:
        return monotonic + self.epoch_offset

    @property
    def wall_s(self) -> float:
        return max(job.done for job in self.jobs) - min(job.queued for job in self.jobs)

    @property
    def exec_sum_s(self) -> float:
        return sum(job.exec_s for job in self.jobs)

    def gaps(self) -> list[float]:
        spans = sorted((job.start, job.end) for job in self.jobs)
        return [later[0] - earlier[1] for earlier, later in itertools.pairwise(spans)]

    @property
    def lead_s(self) -> float:
        first = min(self.jobs, key=lambda job: job.queued)
        return min(job.start for job in self.jobs) - self.epoch(first.queued)

    @property
    def tail_s(self) -> float:
        last = max(self.jobs, key=lambda job: job.end)
        return self.epoch(last.done) - last.end

    def io_s(self) -> tuple[float, float, float]:
        """Median (input + output), median input, median output of this stream's jobs, in seconds."""
        ins = [job.start - self.epoch(job.taken) for job in self.jobs]
        outs = [self.epoch(job.done) - job.end for job in self.jobs]
        both = [a + b for a, b in zip(ins, outs, strict=True)]
        return statistics.median(both), statistics.median(ins), statistics.median(outs)


def noisy_png(side: int) -> bytes:
    """Random pixels: PNG cannot shrink them, so each output is about side * side * 3 bytes."""
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def deploy(
    platform: RunpodPlatform, shape: Shape, root: Path, concurrency: int, s3: S3Server
) -> tuple[str, SpawnedWorker]:
    """``python handler.py`` in the production loop against ``platform``; ComfyUI's URL and the worker."""
    root.mkdir(parents=True)
    env = worker_env(
        shape.backend,
        root,
        free_port(),
        JOB_CONCURRENCY=str(concurrency),
        INPUT_URL_ALLOWLIST="127.0.0.1/32",
        MAX_RESULT_MB="200",  # base64 results of several large outputs; the loopback platform takes 256 MB
        LOG_LEVEL="WARNING",
        **s3.env(),
    )
    worker = platform.spawn(
        [sys.executable, str(REPO / "handler.py")],
        pod_id=f"bench-{concurrency}",
        extra_env=env,
        cwd=root,
        log_path=root / "worker.log",
    )
    return env["COMFY_API_URL"], worker


def job_input(shape: Shape, files: FileServer, delivery: str, name: str) -> dict[str, Any]:
    return {
        "workflow": shape.workflow(name),
        "images": [{"name": INPUT_NAME, "url": files.url(f"/inputs/{name}.png")}],
        "output": {"delivery": delivery},
        "timeout": 3600,
    }


def check(platform: RunpodPlatform, job_id: str, timeout_s: float) -> dict[str, Any]:
    """The job's successful output, or JobFailed with what came back."""
    body = platform.wait_result(job_id, timeout=timeout_s)
    output = body.get("output")
    if "error" in body or not isinstance(output, dict) or output.get("status") != "success":
        raise JobFailed(f"job {job_id} failed: {str(body)[:2000]}")
    return output


def prompt_span(comfy_url: str, prompt_id: str) -> tuple[float, float]:
    """ComfyUI's own start and end of a prompt (epoch seconds), from its /history status messages."""
    entry = requests.get(f"{comfy_url}/history/{prompt_id}", timeout=30).json()[prompt_id]
    stamps = {name: data["timestamp"] for name, data in entry["status"]["messages"] if "timestamp" in data}
    return stamps["execution_start"] / 1000, stamps["execution_success"] / 1000


def run_stream(
    platform: RunpodPlatform,
    comfy_url: str,
    shape: Shape,
    files: FileServer,
    concurrency: int,
    delivery: str,
    count: int,
) -> Stream:
    """One warm-up job, then ``count`` jobs queued at once; their records once every result is in."""
    tag = f"c{concurrency}_{delivery}"
    check(
        platform, platform.submit(job_input(shape, files, delivery, f"{tag}_warm")), shape.backend.boot_timeout_s + 600
    )
    records = []
    epoch_offset = time.time() - time.monotonic()
    for index in range(count):
        queued = time.monotonic()
        job_id = platform.submit(job_input(shape, files, delivery, f"{tag}_{index:03d}"))
        records.append(JobRecord(job_id, queued))
    per_job_s = 60 + shape.seconds + 5 * shape.blurs
    for record in records:
        output = check(platform, record.job_id, count * per_job_s)
        record.start, record.end = prompt_span(comfy_url, output["prompt_id"])
        record.output_bytes = sum(image["size_bytes"] for image in output["images"])
        if len(output["images"]) != shape.outputs:
            raise JobFailed(f"job {record.job_id}: {len(output['images'])} outputs, not {shape.outputs}")
        if any(image["type"] != ("s3_url" if delivery == "s3" else "base64") for image in output["images"]):
            raise JobFailed(f"job {record.job_id}: outputs not delivered as {delivery}")
        record.taken = record.queued + platform.status_of(record.job_id)["delayTime"] / 1000
        done = [r for r in platform.requests("job-done", record.job_id) if r.body.get("status") != "IN_PROGRESS"]
        record.done = done[0].at
    return Stream(concurrency, delivery, records, epoch_offset)


def report(shape: Shape, streams: list[Stream]) -> None:
    print(f"\n{shape.describe()}; {len(streams[0].jobs)} jobs per stream, queued at once")
    header = (
        f"{'delivery':>8} {'conc':>4} {'wall s':>8} {'sum exec':>8} {'io s':>6} {'in s':>6} {'out s':>6} "
        f"{'ratio':>6} {'serial':>6} {'idle s':>7} {'max gap':>7} {'lead s':>6} {'tail s':>6}  goal <= {GOAL}"
    )
    print(header)
    print("-" * len(header))
    for delivery in ("s3", "base64"):
        serial = next(s for s in streams if s.delivery == delivery and s.concurrency == 1)
        io_s, in_s, out_s = serial.io_s()
        for stream in (s for s in streams if s.delivery == delivery):
            ratio = stream.wall_s / (stream.exec_sum_s + io_s)
            against_serial = stream.wall_s / (serial.exec_sum_s + io_s)
            gaps = stream.gaps()
            print(
                f"{delivery:>8} {stream.concurrency:>4} {stream.wall_s:8.2f} {stream.exec_sum_s:8.2f} {io_s:6.2f} "
                f"{in_s:6.2f} {out_s:6.2f} {ratio:6.3f} {against_serial:6.3f} {sum(gaps):7.2f} {max(gaps):7.2f} "
                f"{stream.lead_s:6.2f} {stream.tail_s:6.2f}  {'met' if ratio <= GOAL else 'missed'}"
            )
    mb = statistics.mean(job.output_bytes for job in streams[0].jobs) / 1e6
    execs = [job.exec_s for stream in streams for job in stream.jobs]
    print(
        f"outputs per job: {mb:.1f} MB; one prompt's execution: median {statistics.median(execs):.2f} s, "
        f"min {min(execs):.2f}, max {max(execs):.2f}"
    )
    print("io, in, out: from each delivery's serial run (JOB_CONCURRENCY=1), medians over its jobs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20, help="jobs per stream (default 20)")
    parser.add_argument("--seconds", type=float, default=1.5, help="the stand-in's StandinSleep (default 1.5)")
    parser.add_argument("--blurs", type=int, default=6, help="ImageBlur nodes on a real ComfyUI (default 6)")
    parser.add_argument("--side", type=int, help="input and output images' side (default 1024; real: 1536)")
    parser.add_argument("--outputs", type=int, default=3, help="outputs per job (default 3)")
    parser.add_argument("--concurrency", default="1,2,3", help="JOB_CONCURRENCY settings, 1 first (default 1,2,3)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = [int(value) for value in args.concurrency.split(",")]
    if settings[0] != 1 or args.jobs < 2:
        parser.error("the serial setting (1) must come first: it gives each delivery's io; --jobs at least 2")
    if not S3RVER.exists():
        parser.error(f"{S3RVER} is missing: ./test.sh installs it, or npm install --prefix .tools s3rver@3.7.1")
    backend = ComfyBackend.real() or ComfyBackend.standin()
    shape = Shape(
        backend, args.seconds, args.blurs, args.side or (1024 if backend.name == "standin" else 1536), args.outputs
    )
    print(shape.describe())
    root = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    streams: list[Stream] = []
    try:
        with ExitStack() as stack:
            files = FileServer(root / "files")
            stack.callback(files.close)
            image = files.root / "input.png"
            image.write_bytes(noisy_png(shape.side))
            for name in ("warm", *(f"{index:03d}" for index in range(args.jobs))):
                for concurrency in settings:
                    for delivery in ("s3", "base64"):
                        files.add_file(f"/inputs/c{concurrency}_{delivery}_{name}.png", image)
            s3 = stack.enter_context(run_s3rver(root / "s3"))
            for concurrency in settings:
                with RunpodPlatform() as platform:
                    comfy_url, worker = deploy(platform, shape, root / f"worker-{concurrency}", concurrency, s3)
                    try:
                        for delivery in ("s3", "base64"):
                            stream = run_stream(platform, comfy_url, shape, files, concurrency, delivery, args.jobs)
                            streams.append(stream)
                            print(f"JOB_CONCURRENCY={concurrency} {delivery}: {stream.wall_s:.2f} s", flush=True)
                    except (JobFailed, TimeoutError, AssertionError) as exc:
                        print(f"\nbroken run: {exc}\nworker log tail:\n{worker.log()[-3000:]}", file=sys.stderr)
                        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(shape, streams)
    return 0


if __name__ == "__main__":
    sys.exit(main())
