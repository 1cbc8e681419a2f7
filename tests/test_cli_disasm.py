"""`nvcim compile` then `nvcim disasm`, as a firmware developer inspects a program."""

from click.testing import CliRunner

from nvcim.tools.cli import main


def test_compile_then_disasm_lists_layers_tiles_and_instructions(mlp_path, tmp_path):
    runner = CliRunner()
    program = tmp_path / "p.bin"
    result = runner.invoke(main, ["compile", str(mlp_path), "-o", str(program)])
    assert result.exit_code == 0, result.output
    listing = runner.invoke(main, ["disasm", str(program)])
    assert listing.exit_code == 0, listing.output
    assert "0.weight: 64x300" in listing.output and "tile 0: + array" in listing.output
    assert "MATMUL" in listing.output and "RELU" in listing.output


def test_disasm_of_a_damaged_program_says_what_and_where(mlp_path, tmp_path):
    runner = CliRunner()
    program = tmp_path / "p.bin"
    runner.invoke(main, ["compile", str(mlp_path), "-o", str(program)])
    program.write_bytes(program.read_bytes()[:100])
    result = runner.invoke(main, ["disasm", str(program)])
    assert result.exit_code == 1 and "code section truncated" in result.output and "offset 40" in result.output
