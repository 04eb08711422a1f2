import pytest

from evaluation import cli


@pytest.mark.parametrize("command", ["generate", "eval", "quantize", "accuracy", "run"])
def test_every_subcommand_explains_its_options(command, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([command, "--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  parser = cli.build_parser()
  sub = parser._subparsers._group_actions[0].choices[command]
  for action in sub._actions:
    if action.option_strings and action.dest != "help":
      assert action.help, f"{command} {action.option_strings} has no help"
      assert action.option_strings[-1] in text


def test_bad_rule_and_missing_model_are_clear_errors(capsys, tmp_path):
  assert cli.main(["eval", "--model", str(tmp_path / "nope.gguf")]) == 2
  assert "model path not found" in capsys.readouterr().err
  args = cli.build_parser().parse_args(["quantize", "--rule", "no-equals-sign"])
  with pytest.raises(ValueError, match="REGEX=BITS"):
    cli._quant_config(args)
