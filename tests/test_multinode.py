"""msrun's multi-node form (one launch per node, --node_rank / --master_addr), simulated on one machine by
tools/simulate_two_nodes.sh: two network namespaces with their own addresses stand for two nodes of one worker
each. Both launches must exit 0, and the two ranks must train exactly what one process trains on the whole batch
(the same check as the single-launch msrun test in test_train.py). Needs root and `ip netns`; skipped otherwise.
"""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.test_train import (ROOT, check_data_parallel, environment, msrun_common_args,
                              setup)  # noqa: F401 (a fixture)

pytestmark = pytest.mark.e2e

SCRIPT = ROOT / "tools" / "simulate_two_nodes.sh"
# a namespace prefix and subnet of this test's own, so a manual simulation running beside it is not disturbed
NETNS = {"PIXART_NETNS_PREFIX": f"pxt{os.getpid() % 100000}-n", "PIXART_NETNS_SUBNET": "10.78.0"}


def _simulate(*args, timeout):
    """Run the script in its own process group; on timeout stop it with SIGTERM so its trap removes the namespaces
    and whatever runs in them. msrun's scheduler runs the training script itself, which imports pixart (quiet by
    default): GLOG_v=2 keeps MindSpore's default level there, whose registration lines the test reads."""
    p = subprocess.Popen(["bash", str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT, env=environment({**NETNS, "GLOG_v": "2"}), start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=60)
        pytest.fail(f"simulation timed out after {timeout} s:\n{out[-2000:]}\n{err[-2000:]}")
    return p.returncode, out, err


@pytest.fixture(scope="module")
def namespaces():
    if os.geteuid() != 0:
        pytest.skip("simulating two nodes needs root (network namespaces)")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2)")
    rc, out, err = _simulate("--check", timeout=60)
    if rc != 0:
        pytest.skip(f"cannot create network namespaces here: {err.strip() or out.strip()}")


def _netns_left() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.slow
def test_two_simulated_nodes_train_like_one_process_on_the_concatenated_batch(namespaces, setup, tmp_path):
    single = tmp_path / "single"  # the reference runs beside the launches (they mostly wait on each other)
    reference = subprocess.Popen([sys.executable, "train.py", *msrun_common_args(setup), "--batch_size", "4",
                                  "--output_dir", str(single)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, cwd=ROOT, env=environment())
    dp, logs = tmp_path / "dp", tmp_path / "logs"
    try:
        rc, out, err = _simulate(f"--log_dir={logs}", "--master_port=8118", "--cluster_time_out=120", "train.py",
                                 *msrun_common_args(setup), "--batch_size", 2, "--output_dir", dp,
                                 "--use_parallel", "True", timeout=300)
    finally:
        single_out, single_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, single_err[-3000:]
    consoles = "\n".join(f"--- node{k}.out\n" + (logs / f"node{k}.out").read_text()[-3000:]
                         for k in range(2) if (logs / f"node{k}.out").is_file())
    assert rc == 0 and "node 0 exit code 0, node 1 exit code 0" in out, f"{out}\n{err}\n{consoles}"
    assert NETNS["PIXART_NETNS_PREFIX"] not in _netns_left()  # the namespaces are gone again

    # node 0 alone ran the scheduler; each node ran one worker, rank = node
    assert (logs / "node0" / "scheduler.log").is_file() and not (logs / "node1" / "scheduler.log").exists()
    scheduler = (logs / "node0" / "scheduler.log").read_text()
    subnet = NETNS["PIXART_NETNS_SUBNET"]
    assert f"ip: {subnet}.2 is registered" in scheduler and f"ip: {subnet}.1 is registered" in scheduler  # 2 hosts
    worker = [(logs / f"node{k}" / f"worker_{k}.log").read_text() for k in range(2)]
    assert not (logs / "node0" / "worker_1.log").exists() and not (logs / "node1" / "worker_0.log").exists()
    diff = check_data_parallel(single, single_out, dp, worker)
    print(f"two simulated nodes vs one process: max |weight difference| {diff:.2e}")


def test_check_mode_leaves_no_namespace_behind(namespaces):
    rc, out, err = _simulate("--check", timeout=60)
    assert rc == 0 and out.startswith("ok: "), err
    assert NETNS["PIXART_NETNS_PREFIX"] not in _netns_left()
