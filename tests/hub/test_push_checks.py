"""A push that cannot succeed fails at config time (bad repo id, no token, nothing to check the folder with),
and a push the Hub refuses for good (bad token, no permission) does not advise a retry."""

import importlib
import os
import subprocess
import sys
import time

import pytest
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, Response, RevisionNotFoundError

from hfquant.config import ConfigError, validate
from hfquant.pipeline.push import lasting_cause
from hfquant.pipeline.run import run
from tests.conftest import compose, tiny_overrides
from tests.hub.server import serve

TOKEN = "hf_pushCHECKS_token_do_not_leak_42"
WRONG = "hf_" + "Wr0ngW r0ngWr0ngWr0ngWr0ngWr0ng".replace(" ", "x")
http = importlib.import_module(Response.__module__.split(".")[0])  # the HTTP client huggingface_hub is built on
QUIET = ["scheme=w8a16", "backend=cpu"]


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No HF_TOKEN and no stored login (the token file is looked up under HF_HOME, read when the client loads)."""
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))


def push_config(tmp_path, *extra):
    return compose(["model=hub", "model.path=/nonexistent/model", f"output_dir={tmp_path / 'out'}", "hub.push=true",
                    *extra])


@pytest.mark.parametrize("repo_id, reason", [
    ("me//model", "must be in the form 'repo_name' or 'namespace/repo_name'"),
    ("me/-model-", "must use alphanumeric chars"),
    ("me/model.git", "cannot end by '.git'"),
    ("me/a--b", "Cannot have -- or .."),
])
def test_an_invalid_repo_id_fails_at_config_time(tmp_path, monkeypatch, repo_id, reason):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"hub.repo_id='{repo_id}' is not a Hub repo id: .*{reason}"):
        validate(push_config(tmp_path, f"hub.repo_id={repo_id}"))
    assert time.perf_counter() - start < 5


def test_a_push_without_a_token_fails_at_config_time(tmp_path, no_token):
    with pytest.raises(ConfigError, match=r"hub.push=true needs a Hub token with write access: set HF_TOKEN or run "
                                          r"`hf auth login` \(hub.dry_run=true lists"):
        validate(push_config(tmp_path, "hub.repo_id=me/model"))
    spec = validate(push_config(tmp_path, "hub.repo_id=me/model", "hub.dry_run=true"))  # a dry run needs none
    assert spec.hub["dry_run"] is True


def test_a_token_from_the_environment_is_enough(tmp_path, no_token, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert validate(push_config(tmp_path, "hub.repo_id=me/model")).hub["repo_id"] == "me/model"


def test_push_with_evaluation_none_fails_at_config_time(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(ConfigError, match=r"hub.push=true with evaluation=none: the saved folder is reloaded and "
                                          r"checked on evaluation windows"):
        validate(push_config(tmp_path, "hub.repo_id=me/model", "evaluation=none"))


def test_a_resumed_push_with_evaluation_none_needs_a_run_that_recorded_its_check(tiny_llm_dir, tmp_path, monkeypatch):
    """resume=true checks the folder against the logits its first run recorded: no evaluation is needed then."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    checked, unchecked = tmp_path / "checked", tmp_path / "unchecked"
    run(compose(tiny_overrides(tiny_llm_dir, checked, *QUIET)))  # evaluated: its reload check is recorded
    unevaluated = ["model=hub", f"model.path={tiny_llm_dir}", "calibration=none", "algorithm=rtn", "evaluation=none", *QUIET]
    run(compose([*unevaluated, f"output_dir={unchecked}"]))  # streamed, never checked
    resume_push = ["resume=true", "hub.push=true", "hub.repo_id=me/model"]
    assert validate(compose([*unevaluated, f"output_dir={checked}", *resume_push])).resume
    with pytest.raises(ConfigError, match="hub.push=true with evaluation=none"):
        validate(compose([*unevaluated, f"output_dir={unchecked}", *resume_push]))


def test_the_cli_refuses_a_push_without_a_token_before_writing_anything(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "hfquant", "hub.push=true", "hub.repo_id=me/model",
                             f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "hfquant: error: hub.push=true needs a Hub token with write access: set HF_TOKEN or run `hf auth login` "
        "(hub.dry_run=true lists what would be uploaded without one)"]
    assert os.listdir(tmp_path) == []


def _http_error(status: int, cls=HfHubHTTPError):
    """The error huggingface_hub raises for an HTTP status (a real response object, no server needed)."""
    response = http.Response(status, request=http.Request("POST", "https://hub.example/api/repos/create"))
    return cls(f"{status} Client Error", response=response)


@pytest.mark.parametrize("error, fix", [
    (_http_error(401), "the token is valid"),
    (_http_error(403), "the token may write to 'me/model'"),
    (_http_error(404, RepositoryNotFoundError), "'me/model' exists and the token can write to it"),
    (_http_error(404, RevisionNotFoundError), "branch 'dev' exists in 'me/model'"),
    (_http_error(400), "the request is fixed"),
    (_http_error(500), None),
    (_http_error(429), None),
    (http.ConnectError("connection refused"), None),
])
def test_only_transient_failures_are_worth_a_retry(error, fix):
    cause = lasting_cause(error, "me/model", "dev")
    assert cause == fix if fix is None else fix in cause


def test_a_rejected_token_says_what_to_fix_and_not_to_retry(tiny_llm_dir, tmp_path):
    url, state, shutdown = serve(TOKEN)
    try:
        env = dict(os.environ, HF_ENDPOINT=url, HF_TOKEN=WRONG, HF_HOME=str(tmp_path / "hf-home"),
                   HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1")
        out = tmp_path / "out"
        result = subprocess.run([sys.executable, "-m", "hfquant", *tiny_overrides(tiny_llm_dir, out, *QUIET),
                                 "hub.push=true", "hub.repo_id=org/denied", f"hydra.run.dir={tmp_path / 'h'}"],
                                capture_output=True, text=True, env=env, timeout=600)
    finally:
        shutdown()
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("hfquant: error: pushing ") and "The local folder is intact" in line
    assert "a retry cannot succeed until the token is valid: set HF_TOKEN to a current token" in line
    assert "resume=true" not in line and "retry with" not in line
    assert WRONG not in result.stdout + result.stderr
    assert "org/denied" not in state.repos and (out / "model" / "config.json").exists()
