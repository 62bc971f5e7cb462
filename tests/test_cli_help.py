"""Every verb's ``--help`` carries one runnable example, and that example parses with the real parser;
``eval --help`` names the benchmarks; a user's mistake is one line on stderr, no traceback."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from phantom_ray.cli import SUBCOMMANDS, build_parser

# verbs with sub-actions: each action's help has its own example
NESTED = {"model": ["info", "list"], "data": ["synth", "pack", "info"]}


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        build_parser(argv).parse_args(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def _examples(text: str) -> list[str]:
    out, lines = [], text.splitlines()
    for i, ln in enumerate(lines):
        if ln.strip().startswith("phantom-ray "):
            cmd, j = ln.strip(), i
            while cmd.endswith("\\") and j + 1 < len(lines):  # a command continued on the next line
                j += 1
                cmd = cmd[:-1] + " " + lines[j].strip()
            out.append(cmd)
    return out


@pytest.mark.parametrize("argv", [[v, "--help"] for v in SUBCOMMANDS]
                         + [[v, a, "--help"] for v, acts in NESTED.items() for a in acts], ids=" ".join)
def test_help_has_a_runnable_example(argv, capsys):
    out = _help(argv, capsys)
    assert "example" in out and "-v, --verbose" in out or argv[0] in NESTED and len(argv) == 2, out
    examples = _examples(out)
    assert examples, f"no 'phantom-ray ...' example in `phantom-ray {' '.join(argv)}`:\n{out}"
    for cmd in examples:
        words = shlex.split(cmd)[1:]
        args = build_parser(words).parse_args(words)  # exits (fails the test) on a wrong flag
        assert args.command == argv[0] and callable(args.func)


def test_eval_help_lists_every_benchmark(capsys):
    from phantom_ray.eval.items import BENCHMARKS

    out = _help(["eval", "--help"], capsys)
    assert all(name in out for name in BENCHMARKS)


@pytest.mark.parametrize("argv", [
    ["model", "info", "/no/such/checkpoint"],
    ["train", "--config", "/no/such/train.yaml"],
    ["ask", "--model", "/no/such/export", "hello"],
], ids=lambda a: a[0])
def test_missing_path_is_one_clear_line(argv):
    res = subprocess.run([sys.executable, "-m", "phantom_ray.cli", *argv], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "/no/such" in lines[0] and lines[0].startswith(f"phantom-ray {argv[0]}"), res.stderr
