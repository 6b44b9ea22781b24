"""`aqlm-lora merge` is reachable from the main command line, and merge_and_quantize from the package."""

from aqlm_lora.app import cli


def test_merge_is_a_command(capsys, tmp_path):
    code = cli.main(["merge", str(tmp_path / "missing"), "--adapter", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("aqlm-lora: error:") and "missing" in err
    assert not (tmp_path / "o").exists()  # nothing written for a refused call


def test_merge_and_quantize_is_exported():
    import aqlm_lora
    from aqlm_lora.lora.requantize import merge_and_quantize

    assert aqlm_lora.merge_and_quantize is merge_and_quantize
    assert "merge_and_quantize" in dir(aqlm_lora)
