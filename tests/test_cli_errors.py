"""User errors end a CLI run with one line and exit status 2, not a traceback, also when Ray wraps
them (a caption actor that cannot load ``--model s3://missing``); bugs keep their traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from phantom_ray import cli
from phantom_ray.ingest import ImageError


def test_missing_input_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "phantom_ray.cli", "data", "pack", "--input",
                           str(tmp_path / "nope.json"), "--layout", "llava", "--output", str(tmp_path / "out"),
                           "--executor", "local"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("phantom-ray data: error:") and "nope.json" in lines[0]
    assert "Traceback" not in proc.stderr


def test_user_errors_behind_ray_wrappers_are_found():
    from ray.exceptions import RayTaskError

    from phantom_ray.loader import ModelNotFoundError

    cause = ModelNotFoundError("model 's3://bucket/missing' not found: no config.json under it")
    wrapped = RayTaskError("CaptionActor.__init__", "Traceback ...", cause)
    assert cli._user_error(wrapped) is cause
    try:
        raise RuntimeError("stage failed") from ImageError("too_many_pixels", "x")
    except RuntimeError as exc:
        assert isinstance(cli._user_error(exc), ImageError)
    assert cli._user_error(KeyError("bug")) is None


def test_bugs_keep_their_traceback(monkeypatch):
    def boom(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "build_parser", lambda argv: _Parser(boom))
    with pytest.raises(KeyError):
        cli.main(["x"])

    def user(args):
        raise FileNotFoundError("s3://bucket/missing does not exist")

    monkeypatch.setattr(cli, "build_parser", lambda argv: _Parser(user))
    assert cli.main(["x"]) == 2


class _Parser:
    def __init__(self, func):
        self.func = func

    def parse_args(self, argv):
        import argparse

        return argparse.Namespace(func=self.func, command="caption")
