"""Token grammar and structure files: text -> TokenSpec, and the errors a person sees."""

import json
import subprocess
import sys

import pytest

from flexvae.dsl import INFER, load_structure, parse_structure, parse_token
from flexvae.errors import StructureError


# ------------------------------------------------------------------- errors
def _error(text, source="enc.json", position=4) -> str:
    with pytest.raises(StructureError) as info:
        parse_token(text, source=source, position=position)
    message = str(info.value)
    # Every grammar error names the file, the position and the token as written.
    assert "enc.json" in message, message
    assert "position 4" in message, message
    assert repr(text) in message, message
    assert info.value.source == source and info.value.position == position and info.value.token == text
    return message


# ------------------------------------------------------------ the original's tokens
@pytest.mark.parametrize(
    "text, name, args, repeat",
    [
        ("C2d_3_128_3_1_1", "C2d", (3, 128, 3, 1, 1), 1),  # in, out, kernel, stride, padding
        ("2*VAERB_256_256", "VAERB", (256, 256), 2),
        ("VAEA_512", "VAEA", (512,), 1),
        ("MaxP_2", "MaxP", (2,), 1),
        ("MaxP_3_2", "MaxP", (3, 2), 1),
        ("UpS_4", "UpS", (4,), 1),
        ("GN_32_256", "GN", (32, 256), 1),
        ("SiLU", "SiLU", (), 1),
        ("12*SiLU", "SiLU", (), 12),
    ],
)
def test_original_tokens_keep_their_meaning(text, name, args, repeat):
    spec = parse_token(text)
    assert spec.name == name
    assert spec.args == args
    assert all(type(a) is int for a in spec.args)
    assert spec.repeat == repeat
    assert spec.kwargs == {}
    assert spec.text == text


def test_numbers_floats_negative_and_placeholder():
    spec = parse_token("X_1e-6_0.5_-1_?_+2_.25_3E2")
    assert spec.args == (1e-6, 0.5, -1, INFER, 2, 0.25, 300.0)
    assert type(spec.args[2]) is int and type(spec.args[4]) is int
    assert type(spec.args[0]) is float and type(spec.args[6]) is float
    assert spec.args[3] is INFER
    assert repr(INFER) == "?"


def test_keyword_arguments_with_underscore_names_bools_and_words():
    spec = parse_token("C2d_3_8_3_padding_mode=reflect_bias=false")
    assert spec.args == (3, 8, 3)
    assert spec.kwargs == {"padding_mode": "reflect", "bias": False}

    spec = parse_token("GN_32_?_eps=1e-6_affine=True")
    assert spec.args == (32, INFER)
    assert spec.kwargs == {"eps": 1e-6, "affine": True}

    spec = parse_token("UpS_2_mode=nearest-exact")
    assert spec.kwargs == {"mode": "nearest-exact"}

    spec = parse_token("X_a_long_name=?_k=-3")
    assert spec.kwargs == {"a_long_name": INFER, "k": -3}


def test_specs_keep_source_and_one_based_position():
    specs = parse_structure(["C2d_3_8_3_1_1", "2*VAERB_8_8", "SiLU"], source="enc.json")
    assert [s.position for s in specs] == [1, 2, 3]
    assert {s.source for s in specs} == {"enc.json"}
    assert specs[1].repeat == 2 and specs[1].text == "2*VAERB_8_8"


def test_load_structure_reads_json_file(tmp_path):
    path = tmp_path / "enc.json"
    path.write_text(json.dumps(["C2d_3_8_3_1_1", "SiLU"]))
    specs = load_structure(path)
    assert [s.name for s in specs] == ["C2d", "SiLU"]
    assert specs[0].source == str(path) and specs[1].position == 2


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "empty token"),
        ("   ", "empty token"),
        ("x*A", "N*TOKEN"),
        ("2x*A", "N*TOKEN"),
        ("0*A", "at least 1"),
        ("2*3C_1", "must start with a letter"),
        ("C-2d_1", "must start with a letter"),
        ("C2d_3__4", "argument 2 is empty"),
        ("C2d_3_", "argument 2 is empty"),
        ("C2d_3_1x", "'1x' is not a number"),
        ("C2d_3_8_k=3_1", "positional argument '1' comes after a keyword"),
        ("C2d_3_pad=1_pad=2", "'pad' is given twice"),
        ("C2d_3_padding_mode=a_padding_mode=b", "'padding_mode' is given twice"),
        ("C2d_3_8_reflect", "'reflect' is not a number"),
        ("C2d_3_mode_8", "'mode' is not a number"),
        ("C2d_3_=4", "must look like name=value"),
        ("C2d_3_k=", "must look like name=value"),
        ("C2d_3_k=a=b", "is not a number, '?', true/false or a word"),
    ],
)
def test_grammar_errors_name_file_position_and_token(text, expected):
    message = _error(text)
    assert expected in message, message


def test_bare_word_at_the_end_suggests_keyword_form():
    message = _error("UpS_2_bilinear")
    assert "keyword" in message and "mode=bilinear" in message, message


def test_non_string_token_and_bad_structure():
    with pytest.raises(StructureError, match="found int"):
        parse_token(3, source="enc.json", position=1)
    with pytest.raises(StructureError, match="JSON list"):
        parse_structure({"a": 1}, source="enc.json")
    with pytest.raises(StructureError, match="empty"):
        parse_structure([], source="enc.json")
    with pytest.raises(StructureError) as info:
        parse_structure(["SiLU", "C2d_3__4"], source="dec.json")
    assert "dec.json, position 2, token 'C2d_3__4'" in str(info.value)


def test_load_structure_errors(tmp_path):
    with pytest.raises(StructureError, match="not found"):
        load_structure(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  "SiLU",\n  "C2d_3_8_3"\n')
    with pytest.raises(StructureError) as info:
        load_structure(bad)
    assert "bad.json" in str(info.value) and "line" in str(info.value)


def test_parsing_does_not_import_torch():
    code = "import sys; import flexvae.dsl; flexvae.dsl.parse_token('C2d_3_8_3'); assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
