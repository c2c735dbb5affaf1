"""`minaf3 eval`: a model's answers to a dataset's questions, scored, as a table per task and a JSON report.

    minaf3 eval --model DIR --data questions.json --out report.json [--metric exact|contains|choice|wer]
    torchrun --nproc-per-node 8 -m minaf3.evaluate --model DIR --data questions.json --out report.json

The flow: read and check the dataset (datasets.py: NVIDIA's JSON, or a batch manifest with answers) ->
generate through the batch machinery (batch.answer_items: the same shares over torchrun ranks, the same
packing by audio length, the same resumable record files) into OUT.predictions.jsonl -> rank 0 scores every
answered item (metrics.py), writes OUT and prints the table. Decoding is greedy unless --sample (a JSONL
line's own do_sample or seed still wins).

An item whose audio cannot be read, or that fails otherwise, is counted in the "errors" column and kept out
of the score: it is neither a wrong answer nor dropped. Answers stay in OUT.predictions.jsonl, so the same
command again generates only what is missing (a killed run loses at most its batches in flight), and another
--metric re-scores without generating. The settings that made the answers are kept beside them
(records.check_settings): another model, adapter, dtype, quantization, max_new_tokens or sampling with the
same --out is refused rather than mixed with them.

OUT (report.json):

    {"metric", "model", "adapter", "data", "settings",
     "tasks": {task: row}, "overall": row,      row: items, errors, score, low, high (95% interval),
                                                     and correct (proportions) or edits and words (wer)
     "items": [{"id", "task", "question", "answer", "prediction", "score"} or {..., "error"}, ...]}
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from minaf3 import command
from minaf3.batch import add_run_options, answer_items, run_options
from minaf3.datasets import EvalItem, read_dataset
from minaf3.errors import InputError
from minaf3.metrics import METRICS, check_metric, score_item, summarize
from minaf3.records import check_settings, read_records
from minaf3.weights.loader import check_model_folder

PREDICTIONS_SUFFIX = ".predictions.jsonl"
OVERALL = "overall"
DESCRIPTIONS = {
    "exact": "normalised exact match",
    "contains": "normalised reference contained in the answer",
    "choice": "multiple-choice option picked",
    "wer": "word error rate, lower is better",
}
INTERVALS = {"wer": "95% percentile bootstrap over items"}  # the others: Wilson


def predictions_path(out: Path) -> Path:
    """Where the answers behind report `out` are recorded: OUT.predictions.jsonl."""
    return out.with_name(out.name + PREDICTIONS_SUFFIX)


def evaluate(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    metric: str = "exact",
    sample: bool = False,
    **run: Any,
) -> dict | None:
    """Answer and score every item of `data`, write the report to `out`; call it on every rank.

    metric: one of METRICS. sample: the checkpoint's sampling instead of greedy decoding. run: batch's
    answer_items options (device, dtype, quantize, adapter, merge_adapter, max_new_tokens, token_budget,
    max_batch_size, threads, retry_errors, progress). Everything that can be checked without the model
    (metric, dataset, paths, recorded settings) is checked first. Returns the report on rank 0, else None.
    """
    check_metric(metric)
    items = read_dataset(data)
    out = Path(out)
    if out.is_dir() or out.resolve() == Path(data).resolve():
        raise InputError(f"--out {out}: expected a new or earlier report file, not the dataset or a folder")
    folder = check_model_folder(model)
    predictions = predictions_path(out)
    adapter = run.get("adapter")
    settings = {
        "model": str(Path(folder).resolve()),
        "adapter": str(Path(adapter).resolve()) if adapter is not None else None,
        "merge_adapter": run.get("merge_adapter", True),
        "sample": sample,
        **{name: run.get(name) for name in ("dtype", "quantize", "max_new_tokens")},
    }
    check_settings(predictions, settings, rank=int(os.environ.get("RANK", "0")))
    done = answer_items(folder, [entry.item for entry in items], predictions, greedy=not sample, **run)
    if not done:
        return None  # another rank: rank 0 scores once every answer is on disk
    report = {"metric": metric, "model": str(model), "adapter": None if adapter is None else str(adapter)}
    report |= {"data": str(data), "settings": settings}
    report |= build_report(items, read_records(predictions), metric)
    write_json(out, report)
    return report


def build_report(items: list[EvalItem], records: dict, metric: str) -> dict:
    """The scored part of a report: a row per task (in order of first appearance), the overall row, and
    every item with its prediction and score, or its error."""
    entries, results = [], []
    for entry in items:
        record = records[entry.id]
        base = {"id": entry.id, "task": entry.task, "question": entry.question, "answer": entry.answer}
        if "error" in record:
            entries.append(base | {"error": record["error"]})
            results.append(None)
            continue
        scored = score_item(metric, record["text"], entry.answer, entry.question)
        entries.append(base | {"prediction": record["text"], **scored})
        results.append(scored)
    tasks = list(dict.fromkeys(entry.task for entry in items))
    rows = {
        task: summarize(metric, [r for r, e in zip(results, items, strict=True) if e.task == task])
        for task in tasks
    }
    return {"tasks": rows, OVERALL: summarize(metric, results), "items": entries}


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON, atomically: a reader sees the old file or the new one."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(staging, path)


# ---- the table ---------------------------------------------------------------------------------------------
def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_table(report: dict) -> str:
    """The report's rows as a Markdown table, under a line that says what the score and interval are."""
    metric = report["metric"]
    interval = INTERVALS.get(metric, "95% Wilson interval")
    lines = [
        f"metric: {metric} ({DESCRIPTIONS[metric]}); {interval}; errors are items without an answer, "
        "outside the score",
        "",
        f"| task | items | errors | {metric} | 95% interval |",
        "|---|---:|---:|---:|---|",
    ]
    for task, row in [*report["tasks"].items(), (OVERALL, report[OVERALL])]:
        span = "-" if row["score"] is None else f"[{_percent(row['low'])}, {_percent(row['high'])}]"
        cells = [task, str(row["items"]), str(row["errors"]), _percent(row["score"]), span]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval` on the `minaf3` command's subparsers."""
    p = subparsers.add_parser("eval", help="answer a dataset's questions and score them (torchrun too)")
    p.add_argument("--data", required=True, metavar="FILE", help="NVIDIA's JSON, or JSON lines with answers")
    p.add_argument("--out", required=True, metavar="FILE", help="the report (JSON); answers beside it")
    p.add_argument(
        "--metric", default="exact", choices=METRICS, help="how an answer is scored (default exact)"
    )
    p.add_argument(
        "--sample", action="store_true", help="the checkpoint's sampling instead of greedy decoding"
    )
    add_run_options(p)
    p.set_defaults(run=main_eval)
    return p


def main_eval(args: argparse.Namespace) -> int:
    """Run `minaf3 eval` with parsed arguments; rank 0 prints the table to stdout, a summary to stderr."""
    report = evaluate(
        args.model, args.data, args.out, metric=args.metric, sample=args.sample, **run_options(args)
    )
    if report:
        print(format_table(report))
        overall = report[OVERALL]
        print(
            f"minaf3 eval: {overall['items']} items ({overall['errors']} without an answer); "
            f"report in {args.out}, answers in {predictions_path(Path(args.out))}",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m minaf3.evaluate ...` (what torchrun runs with -m): the `minaf3 eval` command on its own."""
    parser = argparse.ArgumentParser(prog="minaf3")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return command.run(parser, ["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
