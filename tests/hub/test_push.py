"""Push → download → reload through the real huggingface_hub client against a Hub-compatible server on
127.0.0.1. The client reads HF_ENDPOINT at import, so every push and download runs in a subprocess whose
environment points at the server (as a user's shell would)."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

import hfquant
from hfquant.pipeline.card import validate_metadata
from tests.conftest import tiny_overrides
from tests.hub.server import serve

TOKEN = "hf_testTOKEN_do_not_leak_7f3a9"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    url, state, shutdown = serve(TOKEN)
    home = tmp_path_factory.mktemp("hf-home")
    env = dict(os.environ, HF_ENDPOINT=url, HF_TOKEN=TOKEN, HF_HOME=str(home), HF_HUB_DISABLE_XET="1",
               HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1")
    yield url, state, env
    shutdown()


def hfquant_cli(env, *args, ok=True):
    result = subprocess.run([sys.executable, "-m", "hfquant", *args], capture_output=True, text=True, env=env, timeout=600)
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def all_text_under(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                yield os.path.join(root, name), f.read()


def test_push_download_and_reload_with_the_same_logits(hub, tiny_llm_dir, tmp_path):
    url, state, env = hub
    run_dir = tmp_path / "hydra"
    out = tmp_path / "out"
    result = hfquant_cli(env, *tiny_overrides(tiny_llm_dir, out, "scheme=w8a16", "backend=fake"), "hub.push=true",
                         "hub.repo_id=org/tiny-w8a16", f"hydra.run.dir={run_dir}")
    assert "pushed to" in result.stdout
    repo = state.repos["org/tiny-w8a16"]
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(repo.files)
    assert repo.files["model.safetensors"]["lfs"]  # went through the LFS batch API + PUT
    report = json.loads((out / "report.json").read_text())
    assert report["push"]["repo_id"] == "org/tiny-w8a16" and report["push"]["commit"] == repo.sha

    # Download through the same endpoint with plain transformers (after import hfquant) and compare logits.
    code = ("import sys, torch, hfquant\nfrom transformers import AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained('org/tiny-w8a16')\n"
            "with torch.no_grad(): torch.save(m(torch.arange(1, 30)[None]).logits, sys.argv[1])")
    dl = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hub_logits.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert dl.returncode == 0, dl.stderr[-3000:]
    with torch.no_grad():
        local = hfquant.load_quantized(str(out / "model"))(torch.arange(1, 30)[None]).logits
    assert torch.equal(torch.load(tmp_path / "hub_logits.pt"), local)

    # The card: valid Hub metadata and the numbers from report.json.
    card = repo.files["README.md"]["data"].decode()
    meta = validate_metadata(card)
    assert meta["library_name"] == "transformers" and "hfquant" in meta["tags"] and "w8a16" in meta["tags"]
    assert f"{report['quantized']['perplexity']['perplexity']:.4f}" in card
    assert 'from_pretrained("org/tiny-w8a16")' in card  # the load snippet names the repo
    reproduce = card.split("## Reproduce", 1)[1]
    assert "hfquant model=hub" in reproduce and "scheme=w8a16" in reproduce and "hub." not in reproduce
    assert "base_model_relation" not in meta or meta["base_model_relation"] == "quantized"

    # The token appears nowhere: output, report, saved Hydra config, card, uploaded files.
    assert TOKEN not in result.stdout + result.stderr
    for path, data in list(all_text_under(out)) + list(all_text_under(run_dir)):
        assert TOKEN.encode() not in data, path
    assert all(TOKEN.encode() not in (f["data"] or b"") for f in repo.files.values())


def test_repeat_create_is_409_with_the_url(hub):
    url, state, env = hub
    body = json.dumps({"name": "twice", "organization": "org"}).encode()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    urllib.request.urlopen(urllib.request.Request(f"{url}/api/repos/create", body, headers))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(f"{url}/api/repos/create", body, headers))
    assert err.value.code == 409 and json.loads(err.value.read())["url"] == f"{url}/org/twice"


def test_dry_run_lists_files_and_uploads_nothing(hub, tiny_llm_dir, tmp_path):
    url, state, env = hub
    result = hfquant_cli(env, *tiny_overrides(tiny_llm_dir, tmp_path / "out", "scheme=w8a16"), "hub.push=true",
                         "hub.repo_id=org/dry", "hub.dry_run=true", f"hydra.run.dir={tmp_path / 'h'}")
    assert "dry run: would upload to org/dry@main" in result.stdout and "model.safetensors" in result.stdout
    assert "org/dry" not in state.repos


def test_network_failure_keeps_the_folder_and_a_retry_succeeds(hub, tiny_llm_dir, tmp_path):
    url, state, env = hub
    out = tmp_path / "out"
    state.fail_next_lfs_puts = 1000
    failed = hfquant_cli(env, *tiny_overrides(tiny_llm_dir, out, "scheme=w8a16"), "hub.push=true",
                         "hub.repo_id=org/flaky", f"hydra.run.dir={tmp_path / 'h1'}", ok=False)
    assert failed.returncode == 2 and "The local folder is intact" in failed.stderr
    assert "resume=true hub.push=true" in failed.stderr and TOKEN not in failed.stderr
    assert (out / "report.json").exists() and (out / "model" / "model.safetensors").exists()
    assert not state.repos["org/flaky"].files.get("model.safetensors")
    state.fail_next_lfs_puts = 0
    retry = hfquant_cli(env, *tiny_overrides(tiny_llm_dir, out, "scheme=w8a16"), "hub.push=true", "resume=true",
                        "hub.repo_id=org/flaky", f"hydra.run.dir={tmp_path / 'h2'}")
    assert "pushed to" in retry.stdout
    assert state.repos["org/flaky"].files["model.safetensors"]["lfs"]
    report = json.loads((out / "report.json").read_text())
    assert report["reload_check"]["ok"] and "recorded" in report["reload_check"]["against"]


def test_token_in_the_config_is_refused(hub, tiny_llm_dir, tmp_path):
    url, state, env = hub
    result = hfquant_cli(env, *tiny_overrides(tiny_llm_dir, tmp_path / "o"), f"+hub.token={TOKEN}", ok=False)
    assert result.returncode == 2 and "never pass a token" in result.stderr
    assert TOKEN not in result.stderr + result.stdout and not (tmp_path / "o").exists()


def test_streaming_reads_a_hub_model_through_the_client(hub, tiny_llm_dir, tmp_path):
    """`model.path=<org/name>` + streaming: the checkpoint is fetched with snapshot_download (weights and configs
    only) and quantized tensor by tensor; the folder equals the one streamed from the local copy."""
    url, state, env = hub
    upload = ("import sys\nfrom huggingface_hub import HfApi\napi = HfApi()\n"
              "api.create_repo('org/tiny-base', exist_ok=True)\napi.upload_folder(folder_path=sys.argv[1], repo_id='org/tiny-base')")
    done = subprocess.run([sys.executable, "-c", upload, tiny_llm_dir], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    common = ["scheme=w8a16", "calibration=none", "algorithm=rtn", "evaluation=none", f"hydra.run.dir={tmp_path / 'hydra'}"]
    hfquant_cli(env, "model=hub", "model.path=org/tiny-base", f"output_dir={tmp_path / 'hub'}", *common)
    hfquant_cli(env, "model=hub", f"model.path={tiny_llm_dir}", f"output_dir={tmp_path / 'local'}", *common)
    report = json.loads((tmp_path / "hub" / "report.json").read_text())
    assert report["run"]["pipeline"] == "streaming" and report["run"]["model_source"] == "org/tiny-base"
    for name in os.listdir(tmp_path / "local" / "model"):
        if name != "README.md":
            assert (tmp_path / "hub" / "model" / name).read_bytes() == (tmp_path / "local" / "model" / name).read_bytes(), name


def test_a_gguf_repo_holds_the_file_and_the_card_and_loads_without_hfquant(hub, tiny_llm_dir, tmp_path):
    url, state, env = hub
    out = tmp_path / "out"
    hfquant_cli(env, *tiny_overrides(tiny_llm_dir, out, "scheme=w4a16", "scheme.weights.group_size=32", "format=gguf"),
                "hub.push=true", "hub.repo_id=org/tiny-gguf")
    repo = state.repos["org/tiny-gguf"]
    assert set(repo.files) == {"README.md", "model-Q4_0.gguf"}
    meta = validate_metadata(repo.files["README.md"]["data"].decode())
    assert meta["library_name"] == "gguf" and "gguf" in meta["tags"]
    code = ("import sys, torch\nsys.modules['hfquant'] = None\nfrom transformers import AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained('org/tiny-gguf', gguf_file='model-Q4_0.gguf')\n"
            "print(m(torch.arange(1, 30)[None]).logits.shape[-1])")
    dl = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    vocab = json.loads(open(os.path.join(tiny_llm_dir, "config.json")).read())["vocab_size"]
    assert dl.returncode == 0 and dl.stdout.split()[-1] == str(vocab), dl.stderr[-3000:]
