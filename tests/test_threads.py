"""The thread policy (runtime.threads): pure decisions from affinity, quota, environment and load, and the real
probes it reads them with."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from fluxlab.errors import UserError
from fluxlab.runtime.threads import cgroup_quota, child_env, decide, others_running, usable_cpus


def test_usable_cpus_is_the_affinity_mask_capped_by_the_quota():
    assert usable_cpus(affinity=8, quota=None) == 8
    assert usable_cpus(affinity=8, quota=2.0) == 2
    assert usable_cpus(affinity=8, quota=1.5) == 2  # a fractional quota rounds up: 1.5 CPUs can feed 2 threads
    assert usable_cpus(affinity=2, quota=16.0) == 2
    assert usable_cpus(affinity=4, quota=0.2) == 1


def test_cgroup_v2_and_v1_quotas_are_read(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "unlimited"
    assert cgroup_quota(v1) is None
    assert cgroup_quota(tmp_path / "absent") is None


def test_explicit_counts_win_in_order():
    env = {"FLUXLAB_THREADS": "3", "OMP_NUM_THREADS": "5"}
    assert decide(2, env=env, cpus=8, busy=0).count == 2
    assert decide(None, env=env, cpus=8, busy=0).count == 3
    assert decide(None, env={"OMP_NUM_THREADS": "5"}, cpus=8, busy=6).count == 5  # a fixed count is not second-guessed
    t = decide(None, env={}, cpus=8, busy=0)
    assert (t.count, t.reason) == (8, "8 usable CPU(s)")


@pytest.mark.parametrize("name", ["FLUXLAB_THREADS", "OMP_NUM_THREADS", "FLUXLAB_SHARE", "LOCAL_WORLD_SIZE"])
@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_environment_counts_are_named(name, value):
    with pytest.raises(UserError, match=f"{name}={value!r}"):
        decide(None, env={name: value}, cpus=4, busy=0)


def test_processes_started_together_split_the_cpus():
    assert decide(None, env={"FLUXLAB_SHARE": "2"}, cpus=8, busy=0).count == 4
    assert decide(None, env={"FLUXLAB_SHARE": "3"}, cpus=2, busy=0).count == 1
    # accelerate launch / torchrun say how many processes share this machine
    assert decide(None, env={"LOCAL_WORLD_SIZE": "4"}, cpus=8, busy=0).count == 2
    assert decide(None, env={"FLUXLAB_SHARE": "2", "LOCAL_WORLD_SIZE": "4"}, cpus=8, busy=0).count == 4


def test_a_busy_machine_leaves_the_neighbours_cores_alone():
    t = decide(None, env={}, cpus=2, busy=1)
    assert t.count == 1 and t.reason.startswith("busy machine")
    assert decide(None, env={}, cpus=8, busy=3).count == 5
    assert decide(None, env={}, cpus=2, busy=7).count == 1  # never below one
    assert decide(None, env={}, cpus=8, busy=1).count == 7
    assert decide(None, env={"FLUXLAB_SHARE": "4"}, cpus=8, busy=2).count == 2  # the share already fits


def test_others_running_reads_loadavg_less_our_own():
    assert others_running("0.50 0.40 0.30 3/120 999", own=1) == 2
    assert others_running("0.50 0.40 0.30 1/120 999", own=2) == 0
    assert others_running("garbage", own=1) == 0


def test_child_env_gives_each_process_its_share():
    env = child_env(2, env={"PATH": "/bin"})
    assert env["FLUXLAB_SHARE"] == "2"
    assert int(env["OMP_NUM_THREADS"]) == max(1, usable_cpus() // 2)
    fixed = child_env(2, env={"FLUXLAB_THREADS": "1"})
    assert "FLUXLAB_SHARE" not in fixed and fixed["FLUXLAB_THREADS"] == "1"


def _decide_in_child(prelude: str, env: dict | None = None) -> int:
    code = textwrap.dedent(prelude) + "\nfrom fluxlab.runtime.threads import decide\nprint(decide().count)\n"
    child = {k: v for k, v in os.environ.items()
             if k not in ("FLUXLAB_THREADS", "OMP_NUM_THREADS", "FLUXLAB_SHARE", "LOCAL_WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", code], env={**child, **(env or {})}, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip())


def test_a_real_affinity_mask_limits_the_count():
    # The probe, not a parameter: a process pinned to one CPU decides one thread whatever the machine has.
    assert _decide_in_child("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})") == 1


def test_a_real_neighbour_computing_is_noticed():
    cpus = usable_cpus()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus - 1)]
    try:
        import time

        time.sleep(0.5)  # let the spinners reach the run queue
        assert _decide_in_child("") == 1
    finally:
        for p in spinners:
            p.kill()
            p.wait()
