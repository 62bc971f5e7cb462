"""Storage settings reach Ray tasks and actors through ``runtime_env``, not by writing os.environ."""

from __future__ import annotations

from phantom_ray import storage


def test_storage_runtime_env_carries_the_aws_settings(monkeypatch):
    from ray.runtime_env import RuntimeEnv

    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    assert storage.storage_runtime_env() == {}  # nothing to hand on (e.g. nodes with an IAM role)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    env = storage.storage_runtime_env()
    assert env == {"env_vars": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1"}}
    assert RuntimeEnv(**env)["env_vars"] == env["env_vars"]  # a runtime_env Ray accepts as is
