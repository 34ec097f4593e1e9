"""`RefusalNamer` (stepwise_lit.errors): which setting a refused class build is reported under (the
commands' runs with a PRM stand-in without its head: tests/e2e/test_prm_verifiers.py)."""

from __future__ import annotations

import pytest
from jsonargparse import Namespace

from stepwise_lit.errors import RefusalNamer, SettingError, setting_of


class Scorer:
    refusal: Exception | None = None

    def __init__(self, path: str) -> None:
        if self.refusal is not None:
            raise self.refusal


def section(path: str, **init_args) -> dict:
    return {"class_path": "some.module.Scorer", "init_args": {"path": path, **init_args}}


CONFIG = {
    "model": {"reward_model": {"class_path": "x.Combined", "init_args": {"first": section("a"), "second": section("b")}}},
    "trainer": {"callbacks": [{"class_path": "x.Callback"}, section("c")]},
    "online": {"verifier": section("b")},
}


def test_setting_of_finds_the_first_section_with_that_class_and_those_settings():
    assert setting_of(CONFIG, Scorer, {"path": "b"}) == "model.reward_model.init_args.second"
    assert setting_of(CONFIG, Scorer, {"path": "c"}) == "trainer.callbacks.1"
    assert setting_of(CONFIG, Scorer, {"path": "d"}) is None
    assert setting_of(CONFIG, SettingError, {"path": "a"}) is None  # another class name


@pytest.mark.parametrize("refusal, message", [
    (SettingError("path: no head"), "model.reward_model.init_args.first.init_args.path: no head"),
    (FileNotFoundError("path 'a': no such directory"), "model.reward_model.init_args.first: path 'a': no such directory"),
])
def test_a_refused_build_is_named_by_its_section(monkeypatch, refusal, message):
    monkeypatch.setattr(Scorer, "refusal", refusal)
    namer = RefusalNamer()

    def build():
        try:
            namer(Scorer, path="a")
        except (ValueError, OSError) as error:  # as jsonargparse wraps it
            raise ValueError("Does not validate against any of the Union subtypes") from error

    with pytest.raises(SettingError) as raised:
        namer.instantiate(build, Namespace(CONFIG))
    assert str(raised.value) == message


def test_other_errors_go_on_unchanged():
    def build():
        raise ValueError("not a scorer's")

    with pytest.raises(ValueError, match="not a scorer's") as raised:
        RefusalNamer().instantiate(build, Namespace(CONFIG))
    assert not isinstance(raised.value, SettingError)
