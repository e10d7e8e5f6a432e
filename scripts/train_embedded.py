"""Trains llmc's embedded default model: a tiny Qwen3 on the Python standard library's own sources.

The model ships in models/embedded so llmc works on a fresh machine without downloads, and later work judges
quantization and sparsity by its held-out perplexity (`heldout_perplexity`, reusable by `llmc eval`).

Corpus: the *.py files of this interpreter's standard library (PSF-2.0), minus site-packages, test suites,
idlelib, lib2to3 and two data folders. Files are split by a hash of their relative path, so a held-out file is
never trained on whatever the file order or count. Every file is followed by the end-of-text token.

    python scripts/train_embedded.py --minutes 25 --threads 1         # the shipped model
    python scripts/train_embedded.py --minutes 3 --out /tmp/probe     # a probe: step time, nothing shipped
    python scripts/train_embedded.py --report-only                    # re-measure models/embedded, rewrite README

Training stops on the wall-clock budget, so the step count depends on the machine; pass --steps to fix it
(metrics.json records the steps taken) and the run is deterministic on a given machine and torch version.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmc.models import ModelConfig, Transformer
from llmc.models.loader import load_checkpoint, save_checkpoint

EOS = "<|endoftext|>"
# encodings/ (generated charmap tables) and pydoc_data/ (the docs as one string) are data, not Python to learn.
SKIPPED_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "encodings", "pydoc_data", "__pycache__"}
HELDOUT_MODULUS = 20  # one file in twenty is held out
CORPUS = ("CPython {version} standard library sources (*.py; without site-packages, test/, tests/, idlelib, "
          "lib2to3, encodings, pydoc_data)")
LICENSE = "PSF-2.0 (Python Software Foundation License)"
PROMPTS = ["import os\n", "def main("]  # no trailing space: see the README's limits


def stdlib_files(root: Path) -> list[Path]:
    """Relative paths of the corpus files, sorted so every run sees the same order."""
    files = [p.relative_to(root) for p in root.rglob("*.py")]
    return sorted(p for p in files if not SKIPPED_DIRS.intersection(p.parts[:-1]))


def is_heldout(relative: Path) -> bool:
    return int(hashlib.sha1(relative.as_posix().encode()).hexdigest(), 16) % HELDOUT_MODULUS == 0


def read_corpus(root: Path) -> tuple[list[str], dict[str, str]]:
    """(train texts, {held-out relative path: text}); undecodable bytes are replaced (the stdlib is UTF-8)."""
    train, heldout = [], {}
    for rel in stdlib_files(root):
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
        if is_heldout(rel):
            heldout[rel.as_posix()] = text
        else:
            train.append(text)
    return train, heldout


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): any text encodes, no unknown token, decode(encode(x)) == x."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out: Path, max_length: int) -> None:
    """tokenizer.json plus the config that lets transformers' AutoTokenizer find the end-of-text token."""
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": None,
              "pad_token": EOS, "unk_token": None, "model_max_length": max_length,
              "clean_up_tokenization_spaces": False}  # cleaning would eat spaces before punctuation in code
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encode_documents(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """One token stream, each document followed by the end-of-text id."""
    eos = tok.token_to_id(EOS)
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def heldout_sample(texts: list[str], tok: Tokenizer, min_tokens: int, seed: int, chunk_chars: int = 1200) -> str:
    """Random chunks of whole lines from the held-out files, joined by end-of-text, at least `min_tokens` long.

    Chunks never overlap, so no token is scored twice; whole lines keep the text as a reader would see it.
    """
    chunks = []
    for text in texts:
        current = ""
        for line in text.splitlines(keepends=True):
            current += line
            if len(current) >= chunk_chars:
                chunks.append(current)
                current = ""
    random.Random(seed).shuffle(chunks)
    picked, tokens = [], -1  # n chunks need n - 1 separators
    for chunk in chunks:
        picked.append(chunk)
        tokens += len(tok.encode(chunk).ids) + 1  # the special token splits the text: counts just add up
        if tokens >= min_tokens:
            return EOS.join(picked)
    raise ValueError(f"held-out files hold fewer than {min_tokens} tokens; lower --eval-windows or --eval-seq")


class Perplexity(NamedTuple):
    perplexity: float
    tokens: int  # tokens scored
    windows: int


@torch.no_grad()
def heldout_perplexity(model: Callable[[torch.Tensor], torch.Tensor], token_ids: torch.Tensor, seq_len: int = 256, max_windows: int | None = None,
                       batch_size: int = 8) -> Perplexity:
    """Per-token perplexity of `model` on consecutive windows of `token_ids`.

    `model(input_ids [B, S]) -> logits [B, S, V]`. Window i covers tokens [i*S, (i+1)*S] and scores the S
    predictions inside it, each from at most S tokens of context starting at the window's beginning, so the
    result depends only on the ids, S and the window count, not on the batch size.
    """
    windows = (len(token_ids) - 1) // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise ValueError(f"need more than {seq_len} tokens to score one window, got {len(token_ids)}")
    starts = torch.arange(windows) * seq_len
    total_nll = 0.0
    for first in range(0, windows, batch_size):
        rows = torch.stack([token_ids[s:s + seq_len + 1] for s in starts[first:first + batch_size].tolist()])
        logits = model(rows[:, :-1]).float()
        total_nll += F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").item()
    tokens = windows * seq_len
    return Perplexity(math.exp(total_nll / tokens), tokens, windows)


@torch.no_grad()
def greedy_generate(model, tok: Tokenizer, prompt: str, new_tokens: int) -> str:
    """Greedy continuation recomputing the whole prefix each step: slow, but only the plain forward is needed."""
    ids = torch.tensor([tok.encode(prompt).ids])
    for _ in range(new_tokens):
        next_id = model(ids)[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], 1)
    return tok.decode(ids[0].tolist(), skip_special_tokens=False)


def init_weights(model: Transformer, std: float = 0.02) -> None:
    """GPT-2 init: residual output projections shrunk by sqrt(2 * layers) so the residual stream starts O(1)."""
    residual_std = std / math.sqrt(2 * model.config.num_layers)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            continue  # norm weights stay at one
        torch.nn.init.normal_(p, 0.0, residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std)


def make_optimizer(model: Transformer, lr: float, weight_decay: float) -> torch.optim.AdamW:
    matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n]
    others = [p for n, p in model.named_parameters() if p.ndim != 2 or "embed_tokens" in n]
    groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def learning_rate(peak: float, step: int, warmup: int, progress: float) -> float:
    """Linear warm-up, then cosine from `peak` to peak / 10 over the run's progress in [0, 1]."""
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return peak * min(1.0, (step + 1) / warmup) * cosine


def batch_loss(model: Transformer, rows: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Mean next-token cross entropy of rows [B, S + 1]."""
    # bf16 matmuls run ~3x faster than fp32 on AVX512-BF16 CPUs; weights and optimizer stay fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(rows[:, :-1])  # [B, S, V]
    return F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())


def train(model: Transformer, stream: torch.Tensor, args) -> dict:
    """AdamW on random windows of the training stream until the step count or the time budget is spent."""
    gen = torch.Generator().manual_seed(args.seed)
    # Compiling fuses the elementwise work that dominates eager CPU steps (about 10x faster at this size);
    # the first step pays for the compilation out of the time budget.
    loss_fn = torch.compile(batch_loss) if args.compile else batch_loss
    opt = make_optimizer(model, args.lr, args.weight_decay)
    budget = args.minutes * 60
    begin = time.perf_counter()
    step, smoothed, last_log = 0, None, begin
    model.train()
    while True:
        elapsed = time.perf_counter() - begin
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1:
            break
        lr = learning_rate(args.lr, step, args.warmup, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(stream) - args.seq - 1, (args.batch,), generator=gen).tolist()
        rows = torch.stack([stream[s:s + args.seq + 1] for s in starts])  # [B, S + 1]
        loss = loss_fn(model, rows, args.bf16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        step += 1
        if step % args.log_every == 0:
            now = time.perf_counter()
            seconds_per_step, last_log = (now - last_log) / args.log_every, now
            print(f"step {step:5d}  loss {smoothed:.3f}  lr {lr:.2e}  {seconds_per_step:.2f} s/step", flush=True)
    model.eval()
    return {"steps": step, "minutes": round((time.perf_counter() - begin) / 60, 2), "final_train_loss": smoothed,
            "train_tokens_seen": step * args.batch * args.seq}


def write_metadata(out: Path, eos_id: int) -> None:
    """The end-of-text id in config.json and generation_config.json, where transformers and our runtime look."""
    config = json.loads((out / "config.json").read_text())
    config.update(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def write_readme(out: Path, metrics: dict) -> None:
    cfg = metrics["config"]
    samples = "\n\n".join(f"Prompt `{json.dumps(s['prompt'])}`:\n\n```python\n{s['text']}\n```" for s in metrics["samples"])
    text = f"""# embedded: llmc's built-in default model

A tiny Qwen3 trained from scratch on Python source code, so llmc compiles and serves a real model with no
download. It writes Python-looking text and nothing more: a test subject for the compiler, not an assistant.

- Architecture: `Qwen3ForCausalLM` (transformers loads it as is), defined and trained with `llmc.models.Transformer`:
  {metrics['params'] / 1e6:.2f} M parameters, {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, \
{cfg['num_heads']} heads and {cfg['num_kv_heads']} KV heads of {cfg['head_dim']},
  MLP {cfg['intermediate_size']}, qk-norm, tied embeddings, context {cfg['max_position_embeddings']}, stored in bfloat16.
- Tokenizer: byte-level BPE, vocabulary {metrics['tokenizer_vocab']}, end-of-text `{EOS}` = id {metrics['eos_token_id']}
  (`tokenizer.json`; loads with `tokenizers.Tokenizer.from_file` and `transformers.AutoTokenizer`).
- Corpus: {metrics['corpus']}.
  {metrics['train_files']} files trained on, {metrics['heldout_files']} held out \
(sha1 of the relative path mod {HELDOUT_MODULUS} == 0, listed in metrics.json).
  License of the corpus: {metrics['corpus_license']}.
- Training: {metrics['steps']} AdamW steps in {metrics['minutes']} minutes, {metrics['threads']} CPU thread(s), \
bf16 autocast, torch {metrics['torch']};
  batch {metrics['batch']} x {metrics['seq_len']} tokens, {metrics['train_tokens_seen'] / 1e6:.1f} M tokens seen \
of a {metrics['train_tokens'] / 1e6:.1f} M-token stream; peak lr {metrics['lr']}, cosine schedule.

## Held-out perplexity

**{metrics['perplexity']:.3f}** per BPE token on {metrics['eval_windows']} windows of {metrics['eval_seq_len']} tokens
({metrics['eval_tokens']} tokens) of `heldout.txt`, computed on the saved checkpoint reloaded in float32 by
`heldout_perplexity` in `scripts/train_embedded.py`. `heldout.txt` holds random chunks of the held-out files
(joined by `{EOS}`), so the number can be recomputed without the standard library; the first
{metrics['subset']['windows']} windows alone give {metrics['subset']['perplexity']:.3f} (the test's check).

## Greedy samples ({metrics['sample_tokens']} new tokens)

{samples}

## Retrain

```
python scripts/train_embedded.py --minutes {metrics['budget_minutes']:g} --threads {metrics['threads']}
```

Writes this directory (config.json, model.safetensors, tokenizer files, heldout.txt, metrics.json, README.md).
The run stops on wall-clock time, so its step count depends on the machine's load; `--steps {metrics['steps']}` gives a
run of the same length that is deterministic on a given machine and torch version.

## Limits

A few million parameters trained for minutes on a CPU: it has learnt the look of Python (indentation,
docstrings, `self.`, imports), not what code means, and greedy decoding soon repeats itself. Prompts that end in
a space (`"def "`) leave it off its training distribution, since byte-level BPE keeps a word's leading space
inside the word's token: end a prompt before the space, or after a newline or an opening bracket.
"""
    (out / "README.md").write_text(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "embedded")
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock training budget")
    p.add_argument("--steps", type=int, default=0, help="fixed step count instead of the time budget")
    p.add_argument("--seed", type=int, default=0)
    # On a CPU shared with other jobs one thread ran 3x faster than two (the threads wait on each other at every
    # op while the other core is busy); use two on an idle machine.
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--seq", type=int, default=512, help="training window length")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32 instead of bf16 autocast")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="train eagerly (slow, no C++ compiler)")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--eval-seq", type=int, default=256)
    p.add_argument("--subset-windows", type=int, default=16, help="windows of the quick check the test repeats")
    p.add_argument("--sample-tokens", type=int, default=64)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--report-only", action="store_true",
                   help="skip training: re-measure the checkpoint in --out, keep the training facts of metrics.json")
    return p.parse_args(argv)


def train_and_save(args) -> dict:
    """Builds corpus, tokenizer and model, trains, writes the checkpoint; returns the run's facts for metrics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train_texts, heldout_texts = read_corpus(root)
    print(f"corpus: {len(train_texts)} train files, {len(heldout_texts)} held-out files from {root}", flush=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(train_texts, args.vocab)  # held-out files never shape the vocabulary either
    save_tokenizer(tok, out, args.seq)
    stream = encode_documents(tok, train_texts)
    print(f"tokenizer: {tok.get_vocab_size()} tokens; train stream {len(stream)} tokens", flush=True)

    cfg = ModelConfig(family="qwen3", vocab_size=tok.get_vocab_size(), hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_layers=args.layers, num_heads=args.heads,
                      num_kv_heads=args.kv_heads, head_dim=args.head_dim, rope_theta=10000.0,
                      max_position_embeddings=args.seq, tie_word_embeddings=True, qk_norm=True, dtype="bfloat16")
    model = Transformer(cfg)
    init_weights(model)
    print(f"model: {cfg.num_params / 1e6:.2f} M parameters", flush=True)
    run = train(model, stream, args)

    save_checkpoint(model, out, dtype=torch.bfloat16)
    write_metadata(out, tok.token_to_id(EOS))
    sample = heldout_sample(list(heldout_texts.values()), tok, args.eval_windows * args.eval_seq + 1, args.seed)
    (out / "heldout.txt").write_text(sample, encoding="utf-8")
    return {
        **run, "budget_minutes": args.minutes, "batch": args.batch, "seq_len": args.seq, "lr": args.lr,
        "seed": args.seed, "threads": args.threads, "bf16_autocast": args.bf16, "compiled": args.compile,
        "train_files": len(train_texts), "heldout_files": len(heldout_texts),
        "heldout_file_names": sorted(heldout_texts), "train_tokens": len(stream),
        "corpus": CORPUS.format(version=platform.python_version()), "corpus_license": LICENSE,
        "torch": torch.__version__, "python": platform.python_version(),
    }


def evaluate_and_report(out: Path, facts: dict, args) -> dict:
    """Perplexity and samples of the files in `out`, read back, so the numbers describe what ships."""
    saved = load_checkpoint(out, dtype=torch.float32)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    heldout_ids = torch.tensor(tok.encode((out / "heldout.txt").read_text(encoding="utf-8")).ids)
    full = heldout_perplexity(saved, heldout_ids, args.eval_seq, args.eval_windows)
    subset = heldout_perplexity(saved, heldout_ids, args.eval_seq, args.subset_windows)
    samples = [{"prompt": p, "text": greedy_generate(saved, tok, p, args.sample_tokens)} for p in PROMPTS]
    metrics = {
        "perplexity": full.perplexity, "eval_tokens": full.tokens, "eval_windows": full.windows,
        "eval_seq_len": args.eval_seq, "subset": subset._asdict(), "params": saved.config.num_params,
        "config": saved.config.to_dict(), "eos_token_id": tok.token_to_id(EOS),
        "tokenizer_vocab": tok.get_vocab_size(), **facts, "sample_tokens": args.sample_tokens, "samples": samples,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_readme(out, metrics)
    return metrics


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.report_only:
        measured = {"perplexity", "eval_tokens", "eval_windows", "eval_seq_len", "subset", "params", "config",
                    "eos_token_id", "tokenizer_vocab", "sample_tokens", "samples"}
        if not (args.out / "metrics.json").is_file():
            raise SystemExit(f"{args.out} holds no trained model (no metrics.json): run without --report-only first")
        recorded = json.loads((args.out / "metrics.json").read_text())
        facts = {k: v for k, v in recorded.items() if k not in measured}
    else:
        facts = train_and_save(args)
    metrics = evaluate_and_report(args.out, facts, args)
    print(f"held-out perplexity {metrics['perplexity']:.3f} over {metrics['eval_tokens']} tokens; wrote {args.out}")
    for sample in metrics["samples"]:
        print(f"--- {sample['prompt']!r}\n{sample['text']}")


if __name__ == "__main__":
    main()
