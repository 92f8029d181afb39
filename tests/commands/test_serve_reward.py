"""`awm-fast serve-reward`: --help warns that --host 0.0.0.0 without a token serves anyone; the limit flags are
checked (one line, exit 2) and become ServerLimits (the reward's own image size included)."""
import argparse

import pytest

from awm_fast.cli import main
from awm_fast.commands import serve_reward


def test_help_says_every_interface_without_a_token_serves_anyone(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve-reward", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0
    assert "--host 0.0.0.0 WITHOUT a token serves anyone" in text and "127.0.0.1" in text
    assert "--token" in text and "AWM_FAST_REWARD_TOKEN" in text and "--max-concurrent" in text


@pytest.mark.parametrize("flag, value", [("--max-images", "0"), ("--max-side", "-1"), ("--timeout-s", "inf"),
                                         ("--max-concurrent", "0"), ("--max-request-mb", "nan")])
def test_limit_flags_out_of_range_are_one_line(flag, value, capsys):
    assert main(["serve-reward", "jpeg_compressibility", "--port", "0", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err


def test_flags_become_server_limits(monkeypatch):
    class Digits:
        image_size = (8, 8)

    parser = argparse.ArgumentParser()
    serve_reward.add_parser(parser.add_subparsers())
    monkeypatch.setenv("AWM_FAST_REWARD_TOKEN", "from-env")
    args = parser.parse_args(["serve-reward", "x", "--max-side", "1024", "--max-images", "8", "--max-concurrent", "2"])
    limits = serve_reward.limits_from_args(args, Digits())
    assert limits.request.max_images == 8 and limits.request.max_side == 1024 and limits.request.image_size == (8, 8)
    assert limits.token == "from-env" and limits.max_concurrent == 2 and limits.timeout_s == 30.0
    assert limits.body_limit() == 8 * 3 * 8 * 8 + 2**20 + 4096 + 8  # the reward's 8 x 8 bounds the body
    args = parser.parse_args(["serve-reward", "x", "--max-request-mb", "2", "--token", "flag"])
    limits = serve_reward.limits_from_args(args)
    assert limits.body_limit() == 2 * 2**20 and limits.token == "flag" and limits.request.image_size is None
