"""The learning check's module imports and parses its flags without the environment (a missing
name in what it imports fails here, in the quick loop, not only in the slow run)."""
from __future__ import annotations

import pytest

from bench import learning_check


def test_learning_check_imports_and_parses_its_flags():
    args = learning_check.build_parser().parse_args(["--steps", "4", "--eval-every", "2"])
    assert (args.steps, args.eval_every, args.samples) == (4, 2, learning_check.DEFAULT_SAMPLES)
    with pytest.raises(SystemExit):
        learning_check.build_parser().parse_args(["--samples", "1"])


def test_repeated_infos_get_scene_tokens_of_their_own():
    infos = [{"scene_token": "s", "token": "a"}, {"scene_token": "s", "token": "b"}]
    copies = learning_check.repeat_infos(infos, 2)
    assert [i["token"] for i in copies] == ["a", "b", "a", "b"]
    assert [i["scene_token"] for i in copies] == ["s-copy0", "s-copy0", "s-copy1", "s-copy1"]
    assert infos[0]["scene_token"] == "s"
