"""scripts/gpu_check.sh's deadline and skip logic, on CPU: LLMCORE_GPU_CHECK_FAKE=1 replaces every
stage's command by LLMCORE_GPU_CMD_<stage> (sleeps, failing commands); budgets and the deadline
are shortened through the environment. The GPU commands themselves only run on a GPU machine."""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(subprocess.run(["which", "timeout"], capture_output=True).returncode != 0,
                                reason="needs coreutils timeout")


def _plan(env=None):
    out = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}).stdout
    rows = [re.match(r"(\S+)\s+(\d+)s\s", line) for line in out.splitlines()[1:]]
    return {m[1]: int(m[2]) for m in rows if m and m[1] != "total"}


def _run(tmp_path, deadline, cmds, budgets, timeout=30):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "LLMCORE_GPU_LOGS": str(tmp_path / "logs"),
           "LLMCORE_GPU_CHECK_FAKE": "1", "LLMCORE_GPU_DEADLINE_S": str(deadline)}
    env.pop("LLMCORE_GPU_STAGES", None)
    env.update({f"LLMCORE_GPU_CMD_{k}": v for k, v in cmds.items()})
    env.update({f"LLMCORE_GPU_BUDGET_{k}": str(v) for k, v in budgets.items()})
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=timeout)
    return p, time.monotonic() - t0, _summary(tmp_path)


def _summary(tmp_path):
    lines = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    rows = {}
    for line in lines[1:]:
        m = re.match(r"(\S+)\s+(PASS|FAIL|TIMEOUT|SKIP)\s+(\d+)s\s*(.*)", line)
        if m:
            rows[m[1]] = (m[2], int(m[3]), m[4])
    return lines, rows


def test_plan_lists_the_stages_in_priority_order_within_540s():
    plan = _plan()
    names = list(plan)
    assert names[:8] == ["preflight", "build", "test_flash_attn", "test_rms_norm", "test_moe", "test_rope",
                         "test_swiglu", "test_nf4"], names
    assert names[-4:] == ["memcheck", "racecheck", "bench", "rest"], names
    assert sum(plan.values()) <= 540, plan
    assert all(v > 0 for v in plan.values()), plan
    assert _plan({"LLMCORE_GPU_DEADLINE_S": "300"})["rest"] == 0  # fixed budgets no longer fit: rest gets none


def test_deadline_cuts_the_run_short_and_summary_is_complete(tmp_path):
    stages = list(_plan())
    cmds = {s: "sleep 1" for s in stages}
    cmds.update(test_flash_attn="sleep 30", test_rms_norm="echo 'DETAIL: 3 failed, 9 passed'; exit 3",
                test_moe="echo 'DETAIL: all fine'")
    # (generous seconds: a loaded 2-core CI machine adds ~0.5 s of bash + tar per stage)
    p, wall, (lines, rows) = _run(tmp_path, 12, cmds, {s: 3 for s in stages if s != "rest"})
    assert wall < 12 + 4, f"the run took {wall:.1f}s past its 12s deadline"
    assert p.returncode == 1, "a FAIL/TIMEOUT must make the script fail"
    assert list(rows) == stages, f"summary.txt must name every stage in order:\n{chr(10).join(lines)}"
    assert rows["preflight"][0] == rows["build"][0] == "PASS"
    assert rows["test_flash_attn"][0] == "TIMEOUT" and rows["test_flash_attn"][1] <= 4
    assert rows["test_rms_norm"][0] == "FAIL" and "3 failed, 9 passed" in rows["test_rms_norm"][2]
    assert rows["test_moe"] == ("PASS", 0, "all fine")
    skipped = [s for s, r in rows.items() if r[0] == "SKIP"]
    assert skipped and skipped == stages[-len(skipped):], "once the deadline is near, every later stage is skipped"
    assert all("left" in rows[s][2] for s in skipped), rows
    assert lines[-1].startswith("# done after"), lines[-1]
    assert "test_flash_attn: TIMEOUT" in (tmp_path / "out" / "failures.txt").read_text()
    assert (tmp_path / "out" / "logs.tgz").exists()


def test_failed_build_aborts_the_rest(tmp_path):
    stages = list(_plan())
    p, wall, (lines, rows) = _run(tmp_path, 60, {"build": "echo 'ninja: build stopped'; exit 2"}, {s: 1 for s in stages})
    assert p.returncode == 1 and wall < 10
    assert rows["preflight"][0] == "PASS" and rows["build"][0] == "FAIL" and "rc=2" in rows["build"][2]
    after = stages[stages.index("build") + 1:]
    assert all(rows[s][0] == "SKIP" and "build FAIL" in rows[s][2] for s in after), lines


def test_build_that_no_longer_fits_aborts_the_rest(tmp_path):
    p, _, (lines, rows) = _run(tmp_path, 30, {}, {"preflight": 1})  # build's 200s budget > 30s deadline
    assert rows["build"][0] == "SKIP" and "left" in rows["build"][2]
    assert all(r[0] == "SKIP" and "build SKIP" in r[2] for s, r in rows.items() if s not in ("preflight", "build")), lines


def test_run_killed_from_outside_keeps_what_finished(tmp_path):
    """The device kills the whole command at its limit: the stages that ended are in summary.txt."""
    stages = list(_plan())
    env = {**os.environ, "OUT": str(tmp_path / "out"), "LLMCORE_GPU_LOGS": str(tmp_path / "logs"),
           "LLMCORE_GPU_CHECK_FAKE": "1", "LLMCORE_GPU_CMD_test_flash_attn": "sleep 60"}
    p = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    time.sleep(2.5)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    lines, rows = _summary(tmp_path)
    assert lines[0].startswith("# llmcore gpu_check")
    assert list(rows) == stages[:2] and all(r[0] == "PASS" for r in rows.values()), lines


def test_stage_selection(tmp_path):
    env_stages = "test_rope,bench"
    os.environ["LLMCORE_GPU_STAGES"] = env_stages
    try:
        env = {**os.environ, "OUT": str(tmp_path / "out"), "LLMCORE_GPU_LOGS": str(tmp_path / "logs"),
               "LLMCORE_GPU_CHECK_FAKE": "1"}
        subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, timeout=30)
    finally:
        del os.environ["LLMCORE_GPU_STAGES"]
    _, rows = _summary(tmp_path)
    ran = {s for s, r in rows.items() if r[0] == "PASS"}
    assert ran == {"preflight", "test_rope", "bench"}, rows
    assert rows["build"] == ("SKIP", 0, "not in LLMCORE_GPU_STAGES")
