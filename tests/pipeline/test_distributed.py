"""Evaluation split across processes by `accelerate launch` reports exactly what one process reports."""

import json
import os
import socket
import subprocess
import sys

import pytest

from hfquant.pipeline.distributed import Ranks

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hfquant(prefix, model_dir, out, cwd, cache):
    exe = os.path.join(os.path.dirname(sys.executable), "hfquant")
    args = ["model=hub", f"model.path={model_dir}", f"output_dir={out}", "scheme=w8a16", "calibration=none", "algorithm=rtn",
            "evaluation.seq_len=64", "evaluation.max_windows=7"]
    env = dict(os.environ, HFQUANT_CACHE=str(cache), OMP_NUM_THREADS="1")
    done = subprocess.run([*prefix, exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def test_two_processes_give_the_perplexity_of_one(tiny_llm_dir, tmp_path):
    one = _hfquant([], tiny_llm_dir, tmp_path / "one", tmp_path, tmp_path / "cache1")
    accelerate = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu",
                  "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(_free_port())]
    two = _hfquant(accelerate, tiny_llm_dir, tmp_path / "two", tmp_path, tmp_path / "cache2")
    assert two["run"]["processes"] == 2 and "processes" not in one["run"]
    for part in ("baseline", "quantized"):
        assert two[part]["perplexity"] == one[part]["perplexity"]  # exactly, not approximately
    assert one["baseline"]["perplexity"]["scored_tokens"] == two["baseline"]["perplexity"]["scored_tokens"]
    assert (tmp_path / "one" / "model" / "model.safetensors").read_bytes() == \
        (tmp_path / "two" / "model" / "model.safetensors").read_bytes()


def test_windows_are_split_round_robin_and_cover_everything():
    shards = [Ranks(rank=r, world=3).shard(10) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(i for s in shards for i in s) == list(range(10))
