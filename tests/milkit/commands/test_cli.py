"""The CLI dispatcher: user errors and out-of-memory end in one line with a hint."""

from __future__ import annotations

import argparse

import pytest

from milkit import cli
from milkit.errors import MilkitError


def _patched_parser(monkeypatch, exc: BaseException) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise exc

    parser = argparse.ArgumentParser(prog="milkit")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("boom").set_defaults(func=fail)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)


def test_out_of_memory_gets_a_hint(monkeypatch, capsys):
    _patched_parser(monkeypatch, RuntimeError("CUDA out of memory. Tried to allocate 20 GiB"))
    assert cli.main(["boom"]) == 3
    err = capsys.readouterr().err
    assert "out of memory" in err and "--max-instances" in err and "resume" in err


def test_milkit_error_is_one_line_exit_2(monkeypatch, capsys):
    _patched_parser(monkeypatch, MilkitError("bad thing", path="/x/y.csv", hint="Fix it"))
    assert cli.main(["boom"]) == 2
    assert (
        capsys.readouterr().err.strip() == "milkit boom: error: bad thing (file: /x/y.csv). Fix it"
    )


def test_other_runtime_errors_propagate(monkeypatch):
    _patched_parser(monkeypatch, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main(["boom"])
