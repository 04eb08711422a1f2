import pytest

from evaluation import cli
from tests.helpers import tiny_hf_checkpoint


@pytest.mark.parametrize("command", ["generate", "eval", "quantize", "accuracy", "zeroshot", "run"])
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


def test_quantize_then_eval_and_generate_from_the_checkpoint(tmp_path, capsys):
  from flexq_jax import checkpoint
  model = tmp_path / "tiny"
  config = tiny_hf_checkpoint(model)
  out = tmp_path / "q"
  assert cli.main(["quantize", "--model", str(model), "--calib-batch", "2", "--calib-len", "32", "--rotation", "none",
                   "--weight-method", "rtn", "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "quantized 14 linear layers: 12 x W6A6, 2 x W6A8" in printed
  for name in ("model.safetensors", "report.json", "sensitivity.png"):
    assert (out / name).stat().st_size > 0
  _, loaded_config, meta = checkpoint.load(out)
  assert loaded_config == config and len(meta["report"]["layers"]) == 14
  assert cli.main(["eval", "--model", str(model), "--quantized", str(out), "--windows", "1", "--seq-len", "64"]) == 0
  ppl = float(capsys.readouterr().out.split()[1])
  assert 1000 < ppl < 200000  # a random model: about the vocabulary size, finite
  assert cli.main(["generate", "--model", str(model), "--quantized", str(out), "--max-new-tokens", "4", "hello"]) == 0
  assert ">>> hello" in capsys.readouterr().out


def test_rotated_quantize_and_eval_from_the_checkpoint(tmp_path, capsys):
  from flexq_jax import checkpoint
  model = tmp_path / "tiny"
  config = tiny_hf_checkpoint(model)
  out = tmp_path / "q"
  assert cli.main(["quantize", "--model", str(model), "--calib-batch", "2", "--calib-len", "32",  # rotation: default
                   "--weight-method", "rtn", "--a8-selection", "down_proj", "--out", str(out)]) == 0
  _, loaded_config, meta = checkpoint.load(out)
  assert loaded_config.down_proj_hadamard and not loaded_config.tie_word_embeddings
  assert loaded_config.hidden_size == config.hidden_size
  assert meta["report"]["config"]["smooth_alpha"] is None  # 'auto' smoothing: none on a rotated model
  capsys.readouterr()
  assert cli.main(["eval", "--model", str(model), "--quantized", str(out), "--windows", "1", "--seq-len", "64"]) == 0
  assert 1000 < float(capsys.readouterr().out.split()[1]) < 200000
  # An evaluation-only corpus cannot calibrate; the error names the option.
  assert cli.main(["quantize", "--model", str(model), "--corpus", "lee-news", "--out", str(out)]) == 2
  assert "--corpus lee-news has no calibration text" in capsys.readouterr().err


def test_weight_clipping_and_measured_selection_options():
  parse = lambda *a: cli._quant_config(cli.build_parser().parse_args(["quantize", *a]))
  cfg = parse("--weight-clipping", "learned", "--clipping-steps", "7", "--a8-selection", "measured")
  assert (cfg.weight_clipping, cfg.clipping_steps, cfg.a8_selection) == ("learned", 7, "measured")
  assert parse().weight_clipping == "none"
  with pytest.raises(ValueError, match="--clipping-steps 0 must be >= 1"):
    parse("--clipping-steps", "0")
  with pytest.raises(SystemExit):
    cli.build_parser().parse_args(["quantize", "--weight-clipping", "magic"])
  assert (parse().gptq_damp, parse().gptq_sequential) == (0.1, False)
  cfg = parse("--gptq-damp", "0.03", "--gptq-calibration", "sequential")
  assert (cfg.gptq_damp, cfg.gptq_sequential) == (0.03, True)
  for bad in ("0", "nan", "-1"):
    with pytest.raises(ValueError, match=f"--gptq-damp {float(bad)} must be a positive finite number"):
      parse("--gptq-damp", bad)


def test_screen_rows_are_checked_before_any_loading():
  from evaluation import screen
  label, cfg = screen.parse_row('damp={"a_bits": 16, "gptq_damp": 0.3}')
  assert (label, cfg.a_bits, cfg.gptq_damp, cfg.smooth_alpha) == ("damp", 16, 0.3, None)
  for bad, msg in (("nolabel", "LABEL=JSON"), ("x={1", "not JSON"), ("x=[1]", "object of QuantConfig"),
                   ('x={"bogus": 1}', "bogus"), ('x={"gptq_damp": -1}', "gptq_damp must be a positive")):
    with pytest.raises(ValueError, match=msg):
      screen.parse_row(bad)
