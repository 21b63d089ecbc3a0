"""Two "nodes" on one machine: test/train_performance_8p.sh with NNODES=2, NODE_RANK, MASTER_ADDR
and MASTER_PORT, one CPU process per node, DDP over gloo.

Checks the documented multi-node flow: both nodes train together (global batch and learning rate
of two processes, one step log from global rank 0, the summary on node 0), and nodes that
disagree about the checkpoint to resume from stop with an error instead of training apart.

Run: python -m pytest tests/integration/test_ddp_multinode.py -q   (in the bevdepth-npu env; ~2 min)
"""
from __future__ import annotations

import subprocess

import pytest

from tests.integration import _scripts_helpers as helpers

ARGS = ["--", *helpers.EXP_ARGS, "--limit_train_batches", "2"]


def _start(node_rank, out, data, port, *extra):
    env = helpers.script_env(out / f"node{node_rank}", data, CARDS=1, EPOCHS=1, NNODES=2,
                             NODE_RANK=node_rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                             OMP_NUM_THREADS=1)
    return subprocess.Popen(["bash", str(helpers.TEST_DIR / "train_performance_8p.sh"),
                             *extra, *ARGS], env=env, cwd=str(helpers.REPO_ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True)


def _finish(procs):
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=helpers.RUN_TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    return [(proc.returncode, text) for proc, text in zip(procs, outputs)]


def test_two_nodes_train_as_one_job(tmp_path_factory):
    helpers.require_stack()
    from bevdepth_npu.steplog import read_steps
    data = helpers.tiny_dataset(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("multinode")
    port = helpers.free_port()
    results = _finish([_start(0, out, data, port), _start(1, out, data, port)])
    for rank, (code, text) in enumerate(results):
        assert code == 0, f"node {rank} exited {code}:\n{text[-5000:]}"

    (run0,) = helpers.run_dirs(out / "node0")
    (run1,) = helpers.run_dirs(out / "node1")
    case = "BEVDepth_for_PyTorch_bs1_2p_perf"
    assert run0.name.startswith(f"{case}_node0_") and run1.name.startswith(f"{case}_node1_")
    log = read_steps(run0 / "steps.jsonl")
    assert [r.step for r in log.records] == [1, 2]
    # Two processes: twice the batch and, per the recipe, twice the learning rate.
    assert all(r.global_batch == 2 for r in log.records)
    assert all(r.lr == pytest.approx(2 * 3.125e-06) for r in log.records)
    assert not (run1 / "steps.jsonl").exists()   # global rank 0 logs alone
    values = helpers.read_case_log(run0 / f"{case}.log")
    assert values["RankSize"] == "2" and values["CaseName"] == case
    assert not (run1 / f"{case}.log").exists()
    assert "node 0 writes the summary" in results[1][1]
    assert (run0 / "checkpoints" / "last.ckpt").is_file()
    assert not (run1 / "checkpoints" / "last.ckpt").exists()   # only global rank 0 writes
    for run_dir in (run0, run1):
        assert helpers.read_json(run_dir / "run.json")["status"] == "completed"

    # Node 0 resumes from its checkpoint, node 1 (which has none) starts afresh: refused.
    port = helpers.free_port()
    ckpt = run0 / "checkpoints" / "last.ckpt"
    results = _finish([_start(0, out, data, port, f"--resume={ckpt}"),
                       _start(1, out, data, port, "--fresh")])
    for code, text in results:
        assert code != 0
        assert "the processes disagree about the checkpoint to resume from" in text
