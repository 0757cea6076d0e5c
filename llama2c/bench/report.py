"""Reporting a benchmark run: the Markdown table (`markdown`) with, under it,
why any cell reads n/a (`na_reasons`), the line that describes the machine
(`machine_line`) and rewriting the table between the `<!-- bench:begin -->`
and `<!-- bench:end -->` markers of a document (`update_doc`, e.g.
docs/BENCHMARKS.md)."""
from __future__ import annotations

from pathlib import Path

from .results import Row

DOC_BEGIN, DOC_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def fmt(x, digits=None) -> str:
    """A tokens/s figure with 3 significant digits or so; "n/a" for None."""
    if x is None:
        return "n/a"
    if digits is None:
        digits = 0 if x >= 100 else 1 if x >= 10 else 2
    return f"{x:.{digits}f}"


def fmt_ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


TYPE_NAMES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}  # GGUF types as the table names them


def markdown(rows: list[Row], meta: dict) -> str:
    """The Markdown table of rows (medians and ratios) with its footnotes."""
    lines = [
        "| model | weights (ours / llama.cpp) | threads | N / P | decode ours tok/s | decode llama.cpp tok/s | "
        "decode ratio | prefill ours tok/s | prefill llama.cpp tok/s | prefill ratio | load |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        s = r.summary()
        ref = TYPE_NAMES.get(r.ref_type, "-") if r.ref_type else "-"
        lines.append(
            f"| {r.model} | {r.weights} / {ref} | {r.threads} | {r.decode_tokens} / {r.prompt_tokens} | "
            f"{fmt(s['ours_decode'])} | {fmt(s['ref_decode'])} | "
            f"{fmt_ratio(s['ratio_decode'])} | {fmt(s['ours_prefill'])} | {fmt(s['ref_prefill'])} | "
            f"{fmt_ratio(s['ratio_prefill'])} | {'?' if r.load is None else f'{r.load:.1f}'} |")
    explained = {id(r) for r in rows if _ref_failure(r)}
    notes = [f"- {_label(r)}: {r.note}" for r in rows if r.note and id(r) not in explained]
    first = rows[0] if rows else None
    foot = [
        "",
        "Decode: greedy, N tokens after BOS, timed from the end of the first step like `run`. "
        "Prefill: a P-token prompt at position 0"
        + (" through `llama2_forward_batch`." if first and first.prefill_batched else ", one token at a time.")
        + f" Medians of {meta['reps']} interleaved pairs; ratio = ours / llama.cpp. "
        "load: the 1-minute load average when the row finished (this benchmark's own threads included).",
    ]
    why = na_reasons(rows, meta)
    if why:
        foot += ["", "Why n/a:"] + [f"- {line}" for line in why]
    return "\n".join(lines + foot + ([""] + notes if notes else [])) + "\n"


def _label(r: Row) -> str:
    return f"{r.model} {r.weights} {r.threads}t"


def _ref_failure(r: Row) -> str:
    """What went wrong when llama.cpp could not run this row's model ("" if nothing did)."""
    prefix = "llama.cpp: "
    return r.note[len(prefix):] if r.note.startswith(prefix) and not r.ref_decode and not r.ref_prefill else ""


def reference_missing(meta: dict) -> str:
    """Why the run had no llama.cpp at all, in words (meta: the run's meta)."""
    info = str(meta.get("llama_cpp") or "")
    if meta.get("no_reference") or info.startswith("disabled"):
        return "not run (--no-reference)"
    if "No module named" in info:
        return "llama-cpp-python is not installed (pip install llama-cpp-python; docs/BENCHMARKS.md)"
    return f"llama-cpp-python does not load here ({info or 'unknown reason'})"


def na_reasons(rows: list[Row], meta: dict) -> list[str]:
    """One line per reason some cells of the table read n/a (none: [])."""
    out: list[str] = []
    summaries = [(r, r.summary()) for r in rows]
    no_ref = [r for r, s in summaries if s["ref_decode"] is None and s["ref_prefill"] is None]
    failed = [r for r in no_ref if _ref_failure(r)]
    rest = [r for r in no_ref if not _ref_failure(r)]
    if rest:
        if not meta.get("llama_cpp_ok"):
            why = reference_missing(meta)
        else:
            why = "not measured in the earlier run these rows were merged from (--merge)"
        scope = "" if len(rest) == len(rows) else " of " + ", ".join(_label(r) for r in rest)
        out.append(f"llama.cpp columns{scope}: {why}.")
    for r in failed:
        out.append(f"llama.cpp columns of {_label(r)}: llama.cpp could not run this model ({_ref_failure(r)}).")
    no_prefill = [r for r, s in summaries if s["ours_prefill"] is None]
    if no_prefill:
        if meta.get("no_prefill") or len(no_prefill) == len(rows):
            out.append("prefill columns: not measured (--no-prefill).")
        else:
            out.append("prefill columns of " + ", ".join(_label(r) for r in no_prefill) + ": not measured.")
    no_decode = [r for r, s in summaries if s["ours_decode"] is None]
    if no_decode:
        out.append("decode ours of " + ", ".join(_label(r) for r in no_decode) + ": no token was timed "
                   "(the model produced BOS right away, where `run`'s generation loop stops).")
    if out:
        out.append("ratio columns: n/a wherever either engine's figure is.")
    return out


def machine_line(meta: dict) -> str:
    """One line: date, CPU, versions and load, printed above the table."""
    c = meta["cpu"]
    load = ""
    if meta.get("load_before") and meta.get("load_after"):
        load = (f" Load average (1/5/15 min) {'/'.join(map(str, meta['load_before']))} at the start, "
                f"{'/'.join(map(str, meta['load_after']))} at the end.")
    partial = "" if meta.get("complete", True) else " (run in progress: rows so far)"
    return (f"{meta['date']}{partial}, {c['model']}, {c['cores']} cores, SIMD: {' '.join(c['simd']) or 'none'}"
            f"{'' if c['avx512'] else ' (no AVX-512)'}; llama2c {meta['llama2c']}"
            f"{' @ ' + meta['commit'] if meta.get('commit') else ''}; llama-cpp-python "
            f"{meta['llama_cpp'] if meta.get('llama_cpp_ok') else 'not available'}.{load}")


def update_doc(path: Path, table: str, meta: dict, command: str) -> None:
    """Replaces what lies between DOC_BEGIN and DOC_END in path (appends the
    block when the markers are missing; creates the file when it is)."""
    block = (f"{DOC_BEGIN}\nMeasured {machine_line(meta)}\n\nCommand: `{command}`\n\n{table}{DOC_END}")
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{DOC_BEGIN}\n{DOC_END}\n"
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        _, tail = rest.split(DOC_END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
