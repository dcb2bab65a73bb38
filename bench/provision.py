"""Provisioning figures: a warm start's time to the ComfyUI launch, and node installs in parallel vs in turn.

Warm start: a volume provisioned once, then ``start.sh`` again with the same config; we time from starting
``start.sh`` to the worker's "Starting ComfyUI" log line, which it writes right before it starts the process.
The same run also times a bare ``python -c pass`` and the provisioning gate alone, to show where the time goes.

Node installs: 5 custom nodes from local git repositories, each with one requirement (a local wheel), into a
fresh environment: ``install_nodes`` (checkouts in parallel, one installer run for all requirements) vs one
node after another (checkout, then its own installer run), the way a simple script would do it.

    python -m bench.provision [--rounds 10]   # from the repository root

Target (issue "provisioning"): warm start -> ComfyUI launch <= 0.3 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from comfy_worker.provision import gitrepo, nodes, pyenv
from comfy_worker.provision.config import NodeConfig
from tests.git_repos import make_wheel, node_repo, standin_comfyui_repo
from tests.worker_process import free_port

REPO = Path(__file__).resolve().parents[1]


def new_venv(path: Path) -> str:
    subprocess.run(["uv", "venv", "--quiet", "--python", sys.executable, str(path)], check=True)
    return str(path / "bin" / "python")


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def warm_start(root: Path, rounds: int) -> None:
    comfy = standin_comfyui_repo(root / "src").url
    node = node_repo(root / "src", "bench-node").url
    config = root / "config.yml"
    config.write_text(f"comfyui:\n  version: latest\nnodes:\n  - url: {node}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMFY", "RUNPOD_", "WORKSPACE", "CONFIG_YML"))}
    env |= {
        "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        "RUNPOD_SKIP_GPU_CHECK": "true",
        "WORKER_PYTHON": sys.executable,  # ComfyUI runs with the worker's Python, as in the image
        "WORKSPACE": str(root / "volume"),
        "COMFYUI_REPO": comfy,
        "BAKED_CONFIG": str(config),
        "WORKER_PID_FILE": str(root / "worker.pid"),
    }
    subprocess.run([str(REPO / "start.sh"), "provision"], env=env, check=True, capture_output=True)

    launches = []
    for _ in range(rounds):
        run_env = env | {"RP_API_PORT": str(free_port()), "COMFY_API_URL": f"http://127.0.0.1:{free_port()}"}
        started = time.perf_counter()
        process = subprocess.Popen(
            [str(REPO / "start.sh")], env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        assert process.stderr is not None
        for line in process.stderr:  # the supervisor logs this line right before it starts the process
            if "Starting ComfyUI:" in line:
                launches.append(time.perf_counter() - started)
                break
        else:
            raise SystemExit("start.sh did not launch ComfyUI; run it by hand to see why")
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    python_alone = [timed([sys.executable, "-c", "pass"], env) for _ in range(rounds)]
    gate_alone = [timed([sys.executable, "-m", "comfy_worker.provision"], env) for _ in range(rounds)]
    print(f"warm start, {rounds} rounds (unchanged config, ComfyUI + 1 node provisioned):")
    print(
        f"  start.sh -> ComfyUI launch: median {statistics.median(launches):.3f} s, "
        f"max {max(launches):.3f} s (target <= 0.300 s)"
    )
    print(f"  of which the provisioning gate process: median {statistics.median(gate_alone):.3f} s")
    print(f"  baseline, python -c pass: median {statistics.median(python_alone):.3f} s")


def node_installs(root: Path, rounds: int) -> None:
    wheels = root / "wheels"
    repos = [
        node_repo(root / "src", f"node{i}", extra={"requirements.txt": f"{make_wheel(wheels, f'benchdep{i}')}\n"}).url
        for i in range(5)
    ]
    config = [NodeConfig(url=url) for url in repos]
    parallel, serial = [], []
    for round_ in range(rounds):
        python = new_venv(root / f"venv-p{round_}")
        started = time.perf_counter()
        results = nodes.install_nodes(config, root / f"p{round_}" / "custom_nodes", python, concurrency=5)
        parallel.append(time.perf_counter() - started)
        assert all(r.status == "installed" for r in results), results

        python = new_venv(root / f"venv-s{round_}")
        started = time.perf_counter()
        for url in repos:
            path = root / f"s{round_}" / "custom_nodes" / Path(url).name
            gitrepo.checkout(url, gitrepo.resolve_version(url, "latest"), path)
            pyenv.pip_install(python, [path / "requirements.txt"])
        serial.append(time.perf_counter() - started)
    p, s = statistics.median(parallel), statistics.median(serial)
    print(f"node installs, 5 nodes with one requirement each, {rounds} rounds:")
    print(f"  install_nodes (parallel checkouts, one installer run): median {p:.2f} s")
    print(f"  one after another (checkout + installer run per node):  median {s:.2f} s")
    print(f"  = {s / p:.2f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if shutil.which("uv") is None:
        raise SystemExit("uv is needed (start.sh installs it)")
    with tempfile.TemporaryDirectory(prefix="bench-provision-") as tmp:
        warm_start(Path(tmp) / "warm", args.rounds)
        node_installs(Path(tmp) / "nodes", max(3, args.rounds // 3))


if __name__ == "__main__":
    main()
