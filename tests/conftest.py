"""Test set-up: no network, caches in a temporary folder, one torch thread (tiny tensors are 5-20x faster
with 1 thread on the 2-core machines), and the path of the shared offline data."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="nef-hf-home-"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared offline data folder {SHARED_DATA} is absent")
    return SHARED_DATA


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmark_script():
    """``load(name)``: the module of ``benchmarks/<name>.py`` (the scripts are not a package)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def accelerate_launch():
    """Run ``accelerate launch --multi_gpu --num_processes 2 ... <args>`` on CPU: each launch on a free port of its
    own (no clash with a previous launch's socket), so that a launch that hangs past ``timeout`` is killed with all
    its ranks (none left running) and the test fails with what it printed."""

    def launch(args, env, timeout=240) -> subprocess.CompletedProcess:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
                   "--dynamo_backend", "no", *args]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            import psutil  # an accelerate dependency

            # the ranks may run in sessions of their own (torch elastic): kill the launcher's whole tree
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"a 2-process launch hung for {timeout} s and was killed with its ranks: {args[:4]} ...\n"
                        f"stdout ended with:\n{stdout[-1500:]}\nstderr ended with:\n{stderr[-3000:]}")
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

    return launch
