"""Export a trained student for use outside distill: `distill export RUN_DIR [--out OUT] [--format hf|gguf]`."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from distill.errors import DistillError
from distill.export.executorch import EXECUTORCH_QUANTS, export_executorch, require_executorch, verify_executorch
from distill.export.gguf import (
    DEFAULT_TEXTS,
    GREEDY_PROMPTS,
    export_gguf,
    is_k_quant,
    llama_arch,
    parse_qtype,
    verify_gguf,
)
from distill.export.hf import export_hf, model_card, model_dir_of
from distill.export.imatrix import Imatrix, collect_imatrix, read_imatrix, write_imatrix
from distill.export.modelfile import write_modelfile
from distill.export.quantize import quantize_model
from distill.runtime import atomic_write_json

log = logging.getLogger("distill")

FORMATS = ("hf", "gguf", "executorch")
DEFAULT_QUANT = {"hf": None, "gguf": "f16", "executorch": "fp32"}
HF_QUANTS = {"int8": 8, "int4": 4}  # weight-only, optimum-quanto (pip install distill[quantize])
EXPORTS_DIR = "exports"  # a run's exports live in <run>/exports/, where `distill eval` finds and measures them


def default_export_dir(run_dir: Path, fmt: str = "hf", quant: str | None = None) -> Path:
    """Where `distill export RUN` writes without --out: <run>/exports/<format>[-<quant>], e.g. exports/hf-int8."""
    quant = quant or DEFAULT_QUANT.get(fmt)
    return Path(run_dir) / EXPORTS_DIR / (fmt if quant is None else f"{fmt}-{quant.lower()}")


def older_than(export: Path, student_dir: Path) -> bool:
    """Was the export (a file or folder) written before the student was last saved?"""
    return _newest_mtime(export) < _newest_mtime(student_dir)


def _newest_mtime(path: Path) -> float:
    """When a file, or the newest file in a folder, was last written."""
    files = [path] if path.is_file() else [path, *(f for f in path.iterdir() if f.is_file())]
    return max(f.stat().st_mtime for f in files)


def parse_target(target: str) -> tuple[str, str | None]:
    """'gguf:q8_0' -> ('gguf', 'q8_0'), 'hf' -> ('hf', None): checked before anything is trained or written."""
    fmt, _, quant = target.partition(":")
    if fmt not in FORMATS:
        raise DistillError(f"{target}: unknown format {fmt!r} (supported: {', '.join(FORMATS)})")
    quant = quant or DEFAULT_QUANT[fmt]
    if fmt == "gguf":
        parse_qtype(quant)
    elif fmt == "executorch":
        if quant not in EXECUTORCH_QUANTS:
            raise DistillError(f"{target}: unknown quantization {quant!r} for executorch (supported: "
                               f"{', '.join(EXECUTORCH_QUANTS)})")
        require_executorch()
    elif quant is not None and quant not in HF_QUANTS:
        raise DistillError(f"{target}: unknown quantization {quant!r} for hf (supported: {', '.join(HF_QUANTS)})")
    return fmt, quant


def export_model(source: Path, out: Path | None = None, fmt: str = "hf", quant: str | None = None, *,
                 verify: bool = True, imatrix: Imatrix | None = None) -> Path:
    """Export source (a run directory or an HF model directory) to out in the given format and quantization.

    Without `out`, a run directory's export goes to `default_export_dir`; a model directory needs `out`.
    `imatrix` (gguf only) weights the quantization error per input column; see distill.export.imatrix.
    """
    if fmt not in FORMATS:
        raise DistillError(f"--format {fmt}: not supported (supported: {', '.join(FORMATS)})")
    quant = quant or DEFAULT_QUANT[fmt]
    out = Path(out) if out is not None else _default_out(Path(source), fmt, quant)
    if fmt == "gguf":
        return _export_gguf(Path(source), Path(out), quant, verify, imatrix)
    if imatrix is not None:
        raise DistillError("--imatrix: only for --format gguf")
    if fmt == "executorch":
        return _export_executorch(Path(source), Path(out), quant, verify)
    if quant is None:
        return export_hf(Path(source), Path(out))
    if quant not in HF_QUANTS:
        raise DistillError(f"--quant {quant}: unknown for --format hf (supported: {', '.join(HF_QUANTS)})")
    return _export_quantized(Path(source), Path(out), HF_QUANTS[quant])


def _default_out(source: Path, fmt: str, quant: str | None) -> Path:
    """<run>/exports/... for a run directory; a model directory has no run to keep its exports in."""
    if model_dir_of(source) == source:  # model_dir_of also rejects a missing or unrecognised source
        raise DistillError(f"{source}: a model directory has no default export place; give --out DIR")
    return default_export_dir(source, fmt, quant)


def _export_quantized(source: Path, out: Path, bits: int) -> Path:
    report = quantize_model(model_dir_of(source), out, bits)
    log.info("int%d: %.1f MB (%.2fx of fp32), decode %.2fx the fp32 speed, perplexity %.3f vs %.3f, top-1 "
             "agreement with fp32 %.3f; load it with distill.export.quantize.load_quantized", bits,
             report.quantized_bytes / 1e6, report.size_ratio, report.speedup or float("nan"),
             report.quantized_perplexity, report.source_perplexity, report.top1_agreement)
    return out


def imatrix_from_tokens(source: Path, sequences: list[list[int]], max_tokens: int, dataset: str = "") -> Imatrix:
    """The importance matrix of source's model (fp32, CPU) over up to max_tokens of the token sequences."""
    from transformers import AutoModelForCausalLM

    model_dir = model_dir_of(Path(source))
    arch = llama_arch(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    result = collect_imatrix(model, arch, sequences, max_tokens, dataset)
    log.info("imatrix: %d calibration tokens in %d chunks over %d weight matrices", result.tokens, result.chunks,
             len(result.sums))
    return result


def load_imatrix(path: Path) -> Imatrix:
    """An imatrix GGUF file (written by distill or llama-imatrix)."""
    if not Path(path).is_file():
        raise DistillError(f"--imatrix {path}: no such file")
    return read_imatrix(Path(path))


def verify_file(export_file: Path) -> Path:
    """Where `distill export` keeps its check of an exported file (beside it: <file>.verify.json)."""
    return export_file.with_name(export_file.name + ".verify.json")


def _export_executorch(source: Path, out: Path, quant: str, verify: bool) -> Path:
    parse_target(f"executorch:{quant}")  # unknown quantization or executorch missing: before any work
    model_dir = model_dir_of(source)
    written = export_executorch(model_dir, out, quant)
    if verify:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        sequences = [tokenizer(text)["input_ids"][:128] for text in DEFAULT_TEXTS]
        prompts = [tokenizer(text)["input_ids"] for text in GREEDY_PROMPTS]
        check = verify_executorch(model_dir, written, sequences, prompts)
        atomic_write_json(verify_file(written), check)
        log.info("verified %s in the ExecuTorch runtime: mean KL %.3g nats/token, top-1 agreement %.3f; greedy "
                 "answers identical on %d of %d prompts", written.name, check["mean_kl"], check["top1_agreement"],
                 check["greedy"]["same"], check["greedy"]["prompts"])
    return written


def _export_gguf(source: Path, out: Path, quant: str, verify: bool, imatrix: Imatrix | None = None) -> Path:
    parse_qtype(quant)  # an unknown type fails before anything is read
    if imatrix is not None and quant.lower() in ("f32", "f16", "bf16"):
        log.info("imatrix: not used for %s (nothing is quantized)", quant)
        imatrix = None
    written = export_gguf(model_dir_of(source), out, quant, None if imatrix is None else imatrix.weights())
    if imatrix is not None:
        saved = write_imatrix(imatrix, written.with_name(written.stem + ".imatrix"))
        log.info("imatrix of %d calibration tokens used and saved to %s (llama-quantize --imatrix reads it)",
                 imatrix.tokens, saved.name)
    write_modelfile(model_dir_of(source), written)
    if verify:
        check = verify_gguf(model_dir_of(source), written)
        atomic_write_json(verify_file(written), check)
        log.info("verified %s by loading it back: max |logit diff| %.3g, mean KL %.3g nats/token, top-1 agreement "
                 "%.3f, perplexity %.3f vs %.3f (source), tokenizer %s", written.name, check["max_abs_logit_diff"],
                 check["mean_kl"], check["top1_agreement"], check["ppl_gguf"], check["ppl_source"],
                 "identical" if check["tokenizer_match"] else "DIFFERS")
        greedy = check["greedy"]
        log.info("greedy answers identical to the source's on %d of %d prompts (%d new tokens each)%s",
                 greedy["same"], greedy["prompts"], greedy["new_tokens"],
                 "" if greedy["same"] == greedy["prompts"] else "; see the .verify.json for where they part")
    return written


__all__ = ["EXPORTS_DIR", "FORMATS", "Imatrix", "default_export_dir", "export_hf", "export_model", "imatrix_from_tokens",
           "is_k_quant", "load_imatrix", "model_card", "older_than", "parse_target",
           "verify_file"]
