"""The tokenmill command: subcommands packages add through the ``tokenmill.commands`` entry-point group."""
from __future__ import annotations

import importlib.metadata as md

import pytest

from tokenmill import cli


class FakeEntryPoint:
    def __init__(self, name: str, target) -> None:
        self.name, self.value, self._target = name, f"fake:{name}", target

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


def hello(sub):
    cmd = sub.add_parser("hello")
    cmd.add_argument("--name", default="world")
    cmd.set_defaults(func=lambda args: 7 if args.name == "tokenmill" else 0)


def test_train_medusa_is_a_package_command():
    names = {ep.name: ep.value for ep in md.entry_points(group=cli.COMMANDS_GROUP)}
    assert names["train-medusa"] == "tokenmill.plugins.speculative.medusa_train:register"
    args = cli.build_parser().parse_args(["train-medusa", "p.yaml", "--out", "x", "--draft-vocab", "0"])
    assert args.draft_vocab == 0 and args.func.__module__ == "tokenmill.plugins.speculative.medusa_train"


def test_a_broken_or_clashing_command_is_left_out_and_the_rest_work(monkeypatch):
    eps = [FakeEntryPoint("hello", hello), FakeEntryPoint("broken", ImportError("no module named nowhere")),
           FakeEntryPoint("run", hello)]
    monkeypatch.setattr(md, "entry_points", lambda group: eps if group == cli.COMMANDS_GROUP else [])
    with pytest.warns(RuntimeWarning) as record:
        parser = cli.build_parser()
    messages = " | ".join(str(w.message) for w in record)
    assert "'broken' (fake:broken) failed: ImportError: no module named nowhere" in messages
    assert "'run' (fake:run) is skipped: `tokenmill run` is already a command" in messages
    with pytest.warns(RuntimeWarning):
        assert cli.main(["hello", "--name", "tokenmill"]) == 7
    assert parser.parse_args(["run", "p.yaml", "--prompt", "x"]).func is cli._cmd_run  # the built-in stays
