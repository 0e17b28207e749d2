"""``python -m prepo.score``: PREPO's prompt perplexity for trainers that have no curriculum of their own.

  python -m prepo.score --model smollm2-135m-instruct --data prompts.jsonl --output scored.parquet \\
      --chat-template --instruction-suffix "Answer with the number only."

Reads a data file as ``prepo.train`` does (``.jsonl``, ``.json``, ``.parquet`` or a ``save_to_disk``
directory; prompts as text or chats, the same skipped-row rules) and writes every usable row with
all its columns plus ``ppl`` (the prompt perplexity under the model, of the span ``--ppl-scope``
names) and ``ppl_rank`` (0 = lowest; ties keep file order), as ``.jsonl`` or ``.parquet``. The
prompts are formatted with the trainer's options (chat template, system prompt, instruction
suffix), sorted by length and scored with the fused kernels in micro-batches of at most
``--batch-tokens`` padded tokens. The output is written to a temporary file beside it and renamed
into place, so a failed run leaves no half-written file. A missing or unreadable file, an unknown
column, a model that cannot load and an unknown output format are each one error line (exit 2).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .cli import _quiet_libraries as quiet_libraries
from .config import DTYPES, PPL_SCOPES
from .data import check_columns, read_rows, usable_row
from .errors import ConfigError, DataError, UserError
from .hub import resolve_model
from .microbatch import length_batches
from .policy import Precision, load_policy
from .preflight import resolve_device
from .prompts import PromptEncoder, PromptFormat
from .signals.scoring import prompt_perplexity

log = logging.getLogger("prepo")
OUTPUT_FORMATS = (".jsonl", ".parquet")


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m prepo.score", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a local HF directory, hub id (local cache), .gguf or named model")
    ap.add_argument("--data", required=True, help="prompts: .jsonl, .json, .parquet or a save_to_disk directory")
    ap.add_argument("--output", required=True, help="scored rows: .jsonl or .parquet")
    ap.add_argument("--chat-template", action="store_true", help="apply the chat template to text prompts too")
    ap.add_argument("--system-prompt", default="", help="a system message (with a chat template)")
    ap.add_argument("--instruction-suffix", default="", help="appended to the (last user message of the) prompt")
    ap.add_argument("--ppl-scope", default="problem", choices=PPL_SCOPES,
                    help="what the perplexity averages: the problem's text, the user message, the whole prompt")
    ap.add_argument("--prompt-column", default="prompt")
    ap.add_argument("--answer-column", default="answer", help="rows without a usable answer are skipped, as in training")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward pass")
    ap.add_argument("--dtype", default="fp32", choices=DTYPES)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--cache-dir", default=None, help="where GGUF / named models are converted (default ~/.cache/prepo)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.batch_tokens < 1:
        ap.error("--batch-tokens must be >= 1")
    return args


def load_rows(args) -> tuple[list[dict], list, Counter]:
    """(usable rows, their prompts, skipped rows by reason), as the trainer reads the file."""
    path = Path(args.data)
    rows = read_rows(path)
    answer_column = check_columns(path, rows, args.prompt_column, args.answer_column)
    kept, prompts, skipped = [], [], Counter()
    for row in rows:
        prompt, _, why_not = usable_row(row, args.prompt_column, answer_column)
        if why_not is None:
            kept.append(row)
            prompts.append(prompt)
        else:
            skipped[why_not] += 1
    if not kept:
        raise DataError(f"{path}: no usable row among {len(rows)} (skipped: {dict(skipped)})")
    return kept, prompts, skipped


def score(model, encoder: PromptEncoder, prompts: list, *, batch_tokens: int, autocast, progress: bool) -> np.ndarray:
    """[len(prompts)] float32 perplexities, scored in :func:`length_batches` order."""
    from tqdm import tqdm

    ppl = np.empty(len(prompts), dtype=np.float32)
    with tqdm(total=len(prompts), unit="prompt", disable=not progress, file=sys.stderr) as bar:
        for rows in length_batches([len(encoder.ids(p)) for p in prompts], batch_tokens):
            ppl[rows] = prompt_perplexity(model, encoder, [prompts[i] for i in rows], max_tokens=batch_tokens,
                                          autocast=autocast).numpy()
            bar.update(len(rows))
    return ppl


def write_rows(path: Path, rows: list[dict]) -> None:
    """``rows`` as JSON lines or parquet (by the suffix), through a temporary file renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix.lower() == ".jsonl":
            with open(tmp, "w") as f:
                for row in rows:
                    f.write(json.dumps(row, default=str) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run(args) -> dict:
    """Score ``args.data`` into ``args.output``; a summary dict."""
    out = Path(args.output)
    if out.suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(f"--output {str(out)!r}: unknown format {out.suffix!r}; use {' or '.join(OUTPUT_FORMATS)}")
    if not out.parent.is_dir():
        raise ConfigError(f"--output {str(out)!r}: directory {str(out.parent)!r} does not exist")
    rows, prompts, skipped = load_rows(args)
    device = resolve_device(args.device)
    model, tokenizer = load_policy(resolve_model(args.model, args.cache_dir), device)
    encoder = PromptEncoder(tokenizer, PromptFormat(args.chat_template, args.system_prompt, args.instruction_suffix,
                                                    args.ppl_scope))
    t0 = time.perf_counter()
    ppl = score(model, encoder, prompts, batch_tokens=args.batch_tokens, autocast=Precision(args.dtype, device).autocast,
                progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    ranks = np.argsort(np.argsort(ppl, kind="stable"), kind="stable")
    write_rows(out, [{**row, "ppl": float(p), "ppl_rank": int(r)} for row, p, r in zip(rows, ppl, ranks)])
    return {"scored": len(rows), "skipped": dict(skipped), "seconds": seconds, "prompts_per_s": len(rows) / seconds,
            "output": str(out)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The exit status: 0, or 2 with one error line for bad input."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    quiet_libraries()
    args = parse(argv)
    try:
        summary = run(args)
    except UserError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)   # one line, whatever the library wrote
        return 2
    skipped = sum(summary["skipped"].values())
    print(f"scored {summary['scored']} prompts ({skipped} rows skipped{': ' + str(summary['skipped']) if skipped else ''}) "
          f"in {summary['seconds']:.1f}s ({summary['prompts_per_s']:.1f} prompts/s) -> {summary['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
