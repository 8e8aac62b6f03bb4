"""benchmarks/generation_quality.py and tune_decoder.py: the decoder-tuning options (`Run.tune_decoders` is tested
end to end in test_quickstart.py)."""

import pytest


def test_the_tuning_takes_the_first_sampling_setting_and_the_realism_term_by_default(benchmark_script):
    gq = benchmark_script("generation_quality")
    args = gq.build_parser().parse_args(["--strategies", "code", "--tune-decoders", "--top-k", "64", "8",
                                         "--temperature", "1.3", "1.0"])
    tuning, top_k, temperature = gq.decoder_tuning(args)
    assert (top_k, temperature) == (64, 1.3)
    assert (tuning.mmd_weight, tuning.cycle_weight, tuning.prior_codes, tuning.epochs) == (1.0, 0.1, 10_000, 20)
    args = gq.build_parser().parse_args(["--tune-decoders", "--top-k", "64", "--prior-temperature", "1.0",
                                         "--mmd-weight", "3", "--tune-seed", "1"])
    tuning, _, temperature = gq.decoder_tuning(args)
    assert temperature == 1.0 and tuning.mmd_weight == 3.0 and tuning.seed == 1
    assert gq.tuned_row_name("tuned") == "code-tuned" and gq.tuned_row_name("tuned_mmd3") == "code-tuned_mmd3"
    # tune_decoder.py keeps session 16's default, the cycle term alone, so its recorded commands reproduce
    args = benchmark_script("tune_decoder").build_parser().parse_args(["--top-k", "64"])
    assert gq.decoder_tuning(args)[0].mmd_weight == 0.0


@pytest.mark.parametrize("options, message", [
    (["--prior-codes", "0"], "--prior-codes must be >= 1, got 0"),
    (["--tune-epochs", "0"], "--tune-epochs and --tune-batch-size must be >= 1 and --tune-lr > 0, got 0"),
    (["--tune-lr", "0"], "--tune-lr > 0, got 20, 16 and 0.0"),
    (["--mmd-weight", "-1"], "--cycle-weight and --mmd-weight must be >= 0, got 0.1 and -1.0"),
])
def test_bad_tuning_options_are_refused_before_any_stage(options, message, capsys, benchmark_script):
    gq = benchmark_script("generation_quality")
    with pytest.raises(SystemExit):
        gq.main(["--out", "/nonexistent/never-written", "--strategies", "code", "--tune-decoders", *options])
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark_script("tune_decoder").main(["--out", "/nonexistent/never-written", *options])
    assert message in capsys.readouterr().err


def test_tuning_without_the_code_strategy_is_refused(benchmark_script, capsys):
    with pytest.raises(SystemExit):
        benchmark_script("generation_quality").main(["--out", "/nonexistent/never-written", "--strategies", "learned",
                                                     "--tune-decoders"])
    assert "--tune-decoders tunes the code strategy's decoders: add code to --strategies (got learned)" in \
        capsys.readouterr().err
