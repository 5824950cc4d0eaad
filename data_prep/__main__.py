"""python -m data_prep FORMAT IN OUT: convert preference data to TRL's prompt/chosen/rejected form.

FORMAT is alpaca, ultrafeedback, sharegpt or trl; thumbs reads thumbs-up/down rows (prompt, completion,
label) into TRL's unpaired form, which --unpaired writes from pairs (for KTO); instruction reads
one-answer instruction data (for SFT) into that form, every answer rated up. IN is a .json array, .jsonl, .parquet, a folder saved
by `datasets`, or a hub dataset id (with --split). OUT is .jsonl, .parquet or (no suffix) a folder.
Invalid rows are skipped and counted by rule in a report written next to OUT; --strict fails instead.
"""

import argparse
import json
import sys
from pathlib import Path

from datasets.exceptions import DatasetGenerationError
from pyarrow import ArrowException

from data_prep import io
from data_prep.convert import ANSWERS, FORMATS, RULES, STYLES, Messages
from data_prep.pipeline import Options, convert, describe, summary_line
from data_prep.reading import read
from data_prep.tokens import token_lengths, tokenizer_id
from data_prep.unpaired import unpair, weights


def mapping(text: str) -> dict[str, str]:
    """`ours=theirs,...`: read our field `ours` from the input's column `theirs`."""
    items = [item for item in text.split(",") if item]
    if not all("=" in item for item in items):
        raise argparse.ArgumentTypeError(f"expected field=column[,field=column...], got {text!r}")
    return dict(item.split("=", 1) for item in items)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description=__doc__.split("\n\n")[0],
        epilog="Rules: " + "; ".join(f"{name}: {text}" for name, text in RULES.items()),
    )
    p.add_argument("format", choices=FORMATS)
    p.add_argument("input", help="file, dataset folder or hub id")
    p.add_argument("output", type=Path, help=".jsonl, .parquet or a folder")
    p.add_argument("--split", default="train", help="split of a hub id or saved DatasetDict (default: train)")
    p.add_argument("--style", choices=STYLES, default="conversational", help="auto: as the rows are")
    p.add_argument(
        "--columns", type=mapping, default={}, help="remap: chosen=chosen_messages,rejected=rejected_messages"
    )
    p.add_argument("--keep-columns", type=lambda t: [c for c in t.split(",") if c], default=[])
    p.add_argument("--role-key", help="a message's role key (default: role; from in sharegpt)")
    p.add_argument("--content-key", help="a message's content key (default: content; value in sharegpt)")
    p.add_argument("--roles", type=mapping, default={}, help="role names: human=user,gpt=assistant,...")
    p.add_argument("--text-key", help="the text key of typed content parts (default: text, else value)")
    p.add_argument("--min-score-margin", type=float, help="drop rows whose score margin is below this")
    p.add_argument("--drop-ties", action="store_true", help="drop rows whose scores are equal")
    p.add_argument(
        "--unpaired",
        action="store_true",
        help="write each pair as a desirable and an undesirable row (prompt, completion, label) for KTO",
    )
    p.add_argument("--seed", type=int, default=42, help="with --unpaired: the seed of the rows' order")
    p.add_argument("--strict", action="store_true", help="fail on any invalid row; write nothing")
    p.add_argument("--report", type=Path, help="report path (default: OUT.report.json)")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT and its report")
    p.add_argument("--num-proc", type=int, help="processes for the conversion")
    p.add_argument("--tokenizer", help="add token-length statistics with this tokenizer")
    p.add_argument("--max-length", type=int, help="with --tokenizer: count rows TRL would drop")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report_to = args.report or args.output.with_name(args.output.name + ".report.json")
    for path in (args.output, report_to):
        if path.exists() and not args.force:
            print(f"error: {path} exists; pass --force to overwrite it", file=sys.stderr)
            return 2
    if args.unpaired and args.format in ANSWERS:
        print(f"error: {args.format} rows are unpaired already; drop --unpaired", file=sys.stderr)
        return 2
    if args.output.suffix not in ("", ".jsonl", ".parquet"):
        print(f"error: OUT must end in .jsonl or .parquet, or be a folder: {args.output}", file=sys.stderr)
        return 2
    options = Options(
        format=args.format,
        style=args.style,
        columns=args.columns,
        keep_columns=args.keep_columns,
        messages=Messages(args.role_key, args.content_key, args.roles, args.text_key),
        min_score_margin=args.min_score_margin,
        drop_ties=args.drop_ties,
        num_proc=args.num_proc,
    )
    try:
        kept, report = convert(read(args.input, args.split), options)
    except (OSError, KeyError, ValueError, ArrowException, DatasetGenerationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {"input": args.input, "output": str(args.output), **report}
    if args.unpaired:
        kept, repeats = unpair(kept, args.seed)
        report["unpaired"] = {"rows": len(kept), "repeats_dropped": repeats, "seed": args.seed}
        print(f"unpaired: {report['rows_out']} pairs into {len(kept)} rows ({repeats} repeated rows dropped)")
    if "label" in kept.column_names:  # what a KTO run on these rows sets its loss weights to
        report["kto_balance"] = weights(kept["label"])
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        report.update(token_lengths(kept, tokenizer, args.max_length, args.num_proc))
        # what counted them, so that a run with another tokenizer or template does not plan with them
        report["counted_with"] = {"tokenizer": tokenizer_id(args.tokenizer), "chat_template": "its own"}
        lengths = ", ".join(
            f"{k} {v['median']:g} (max {v['max']})" for k, v in report["token_lengths"].items()
        )
        print(f"median tokens: {lengths}")
        if args.max_length:
            print(
                f"TRL would drop {report['trl_would_drop']} of {report['rows_out']} rows: their prompt alone "
                f"reaches --max-length {args.max_length}"
            )
    if args.strict and report["dropped"]:
        print("error: --strict and some rows are invalid; nothing was written", file=sys.stderr)
        for rule, examples in report["examples"].items():
            more = report["dropped"][rule] - len(examples)
            for e in examples:
                print(f"  row {e['row']}: {rule}: {e['detail']}", file=sys.stderr)
            if more:
                print(f"  ... and {more} more {rule}", file=sys.stderr)
        print(summary_line(report), file=sys.stderr)
        return 1
    if report["rows_out"]:
        io.write(kept, args.output)
    io.write_text(report_to, json.dumps(report, indent=2, ensure_ascii=False))
    print(summary_line(report))
    if report["diagnosis"]:
        print(describe(report["diagnosis"]), file=sys.stderr)
    return 0 if report["rows_out"] else 1


if __name__ == "__main__":
    sys.exit(main())
