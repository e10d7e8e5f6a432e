"""Writes models/embedded/calibration.txt: random chunks of the embedded model's *training* files (never its
held-out ones), the text `llmc compile --calibration` measures activations on for SmoothQuant, AWQ and Wanda.

Calibrating on the held-out text would let the quantized model see what it is judged on; this sample comes from
the training split train_embedded.py defines (CPython's standard library, one file in twenty held out), chosen
the way its held-out sample is: whole lines, chunks of ~1200 characters, shuffled with a fixed seed.

    python scripts/calibration_sample.py [--tokens 8192] [--seed 1]
"""
from __future__ import annotations

import argparse
import importlib.util
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "models" / "embedded"


def train_script():
    spec = importlib.util.spec_from_file_location("train_embedded", ROOT / "scripts" / "train_embedded.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="at least this many tokens")
    p.add_argument("--seed", type=int, default=1, help="differs from the held-out sample's seed")
    p.add_argument("--out", type=Path, default=EMBEDDED / "calibration.txt")
    args = p.parse_args(argv)
    script = train_script()
    train_texts, _ = script.read_corpus(Path(sysconfig.get_paths()["stdlib"]))
    tok = Tokenizer.from_file(str(EMBEDDED / "tokenizer.json"))
    text = script.heldout_sample(train_texts, tok, args.tokens, args.seed)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(tok.encode(text).ids)} tokens from the training split")


if __name__ == "__main__":
    main()
