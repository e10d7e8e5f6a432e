"""Calibration text -> prefill inputs: windows of the model's tokens, each with its own cache blocks, that the traced
graph runs to the same logits as the eager model."""
from pathlib import Path

import pytest
import torch

import llmc.models
from llmc.compiler.calibration import prefill_inputs, read_calibration
from llmc.compiler.trace import trace
from llmc.models.loader import load_checkpoint

EMBEDDED = Path(llmc.models.__file__).parent / "embedded"


def test_text_becomes_windows_of_prefill_inputs(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("import os\nimport sys\n\ndef main(argv):\n    return 0\n" * 40, encoding="utf-8")
    model = load_checkpoint(EMBEDDED, dtype=torch.float32)
    calib = read_calibration(text, EMBEDDED, model.config, torch.float32, 16, max_seq_len=512, windows=6, seq_len=40)
    assert calib.record["windows"] == 6 and calib.record["tokens_per_window"] == 40 and len(calib.record["sha256"]) == 64
    assert [t[0].shape for t in calib.inputs] == [(4, 40), (2, 40)]  # batches of 4 windows
    ids, positions, k, v, table, past, last, slots = calib.inputs[0]
    assert (past == 0).all() and (last == 39).all() and torch.equal(positions[1], torch.arange(40))
    assert slots.unique().numel() == slots.numel() and (slots >= 0).all()  # every token its own slot
    prefill = trace(model, 16, model.state_dict().items())[0].gm
    with torch.no_grad():
        logits = prefill(*calib.inputs[1])[0]
        eager = model(calib.inputs[1][0])[:, -1]
    torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-4)


def test_short_unreadable_or_tokenizerless_calibration_is_refused(tmp_path):
    config = load_checkpoint(EMBEDDED, dtype=torch.float32).config
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds .* tokens; it needs at least 256"):
        read_calibration(short, EMBEDDED, config, torch.float32, 16, max_seq_len=512)
    with pytest.raises(ValueError, match="cannot read the calibration file"):
        read_calibration(tmp_path / "missing.txt", EMBEDDED, config, torch.float32, 16, max_seq_len=512)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        read_calibration(short, None, config, torch.float32, 16, max_seq_len=512)


def test_prefill_inputs_give_each_row_distinct_blocks():
    config = load_checkpoint(EMBEDDED, dtype=torch.float32).config
    rows = torch.randint(0, config.vocab_size, (3, 20))
    *_, table, past, last, slots = prefill_inputs(rows, config, torch.bfloat16, 16)
    assert table.shape == (3, 2) and table.unique().numel() == 6
    assert torch.equal(slots[2, :3], table[2, 0] * 16 + torch.arange(3))
