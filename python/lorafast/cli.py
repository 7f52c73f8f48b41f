"""The `lorafast` command line. Errors are one line on stderr and a non-zero exit, never a traceback
(set LORAFAST_DEBUG=1 to see one)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from lorafast import __version__
from lorafast._deps import INFERENCE, TRAINING, require
from lorafast.arith import METHODS
from lorafast.errors import LorafastError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights must be comma-separated numbers, got {text!r}") from None


def _cmd_merge(args: argparse.Namespace) -> int:
    from lorafast.merge import merge

    r = merge(
        args.base,
        args.adapters,
        args.out,
        weights=args.weights,
        dtype=args.dtype,
        threads=args.threads,
        progress=not args.quiet,
        safe_merge=args.safe_merge,
        overwrite=args.overwrite,
        requantize=args.requantize,
        quantize=args.quantize,
        blocksize=args.blocksize,
        double_quant=not args.no_double_quant,
        compute_dtype=args.compute_dtype,
        report=not args.quiet or args.report is not None,
    )
    for w in r.warnings:
        print(f"lorafast: warning: {w}", file=sys.stderr)
    if args.report is not None:
        _write_merge_report(r, args.report)
    if not args.quiet:
        quantized = f", {r.tensors_quantized} quantized" if r.tensors_quantized else ""
        print(
            f"merged {len(args.adapters)} adapter(s) into {r.output}: {r.tensors_merged} tensors merged, "
            f"{r.tensors_replaced + r.tensors_added} from the adapter, {r.tensors_copied} copied{quantized}; "
            f"{r.bytes_written / 1e9:.3f} GB in {r.seconds:.2f} s"
        )
        if r.tensors:
            kept = sorted(r.tensors, key=lambda t: t.retention)
            median = kept[len(kept) // 2].retention
            print(
                f"kept {100 * median:.1f}% of the adapters' change (median over {len(kept)} weights; lowest "
                f"{100 * kept[0].retention:.1f}% in {kept[0].name}; --report FILE.json for every weight)"
            )
        if r.nonfinite_values:
            print(
                f"lorafast: warning: {r.nonfinite_values} merged values are NaN/Inf (use --safe-merge to refuse)",
                file=sys.stderr,
            )
    return 0


def _write_merge_report(r, path: Path) -> None:
    fields = ("name", "delta_norm", "weight_norm", "ratio", "retention", "relative_error")
    report = {
        "output": str(r.output),
        "seconds": r.seconds,
        "tensors_merged": r.tensors_merged,
        "tensors_quantized": r.tensors_quantized,
        "warnings": list(r.warnings),
        "tensors": [{f: getattr(t, f) for f in fields} for t in r.tensors],
    }
    Path(path).write_text(json.dumps(report, indent=2))


def _print_arith(verb: str, r, args: argparse.Namespace) -> None:
    for w in r.warnings:
        print(f"lorafast: warning: {w}", file=sys.stderr)
    if args.report:
        modules = [{"module": m.module, "rank": m.rank, "energy": m.energy} for m in r.modules]
        report = {"output": str(r.output), "seconds": r.seconds, "modules": modules, "warnings": r.warnings}
        Path(args.report).write_text(json.dumps(report, indent=2))
    if args.quiet:
        return
    ranks = sorted({m.rank for m in r.modules})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    print(
        f"{verb} {len(r.modules)} LoRA modules (rank {rank_text}), {r.saved_tensors} full tensors -> {r.output} "
        f"in {r.seconds:.2f} s"
    )
    summary = r.energy_summary()
    if summary is None:
        return
    print(
        f"energy captured per module: min {summary['min']:.4f}, median {summary['median']:.4f}, "
        f"mean {summary['mean']:.4f}"
    )
    shown = sorted(r.modules, key=lambda m: m.energy) if not args.verbose else r.modules
    for m in shown if args.verbose else shown[:5]:
        print(f"    {m.energy:.4f}  r={m.rank:<4d} {m.module}")
    if not args.verbose and len(shown) > 5:
        print(f"    ... the {len(shown) - 5} others captured more (--verbose lists all)")


def _cmd_combine(args: argparse.Namespace) -> int:
    from lorafast.arith import combine

    r = combine(
        args.adapters,
        args.out,
        weights=args.weights,
        method=args.method,
        density=args.density,
        rank=args.rank,
        majority_sign=args.majority_sign,
        seed=args.seed,
        svd_clamp=args.svd_clamp,
        dtype=args.dtype,
        threads=args.threads,
        progress=not args.quiet,
        overwrite=args.overwrite,
        allow_different_bases=args.allow_different_bases,
    )
    _print_arith(f"combined {len(args.adapters)} adapter(s) with {args.method}:", r, args)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from lorafast.arith import extract

    r = extract(
        args.base,
        args.tuned,
        args.out,
        rank=args.rank,
        energy=args.energy,
        targets=args.targets,
        modules_to_save=args.modules_to_save,
        dtype=args.dtype,
        tol=args.tol,
        max_iters=args.power_iters,
        threads=args.threads,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    _print_arith("extracted", r, args)
    return 0


def _cmd_resize(args: argparse.Namespace) -> int:
    from lorafast.arith import resize

    if args.rank is None and args.energy is None:
        raise ValueError("resize needs --rank, --energy or both")
    r = resize(
        args.adapter,
        args.out,
        rank=args.rank,
        energy=args.energy,
        dtype=args.dtype,
        threads=args.threads,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    _print_arith("resized", r, args)
    return 0


def _common_output_options(p: argparse.ArgumentParser, dtype_help: str) -> None:
    p.add_argument("-o", "--out", required=True, help="output adapter folder")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help=dtype_help)
    p.add_argument("--threads", type=int, help="worker threads (default: LORAFAST_NUM_THREADS or all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("-v", "--verbose", action="store_true", help="list every module's rank and energy")
    p.add_argument("--report", type=Path, metavar="FILE.json", help="write each module's rank and energy here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")


def _cmd_quantize(args: argparse.Namespace) -> int:
    if args.plan == "transformers":
        require("lorafast quantize --plan transformers", "torch", "transformers")
    from lorafast.quant import quantize

    r = quantize(
        args.base,
        args.out,
        quant_type=args.quant_type,
        blocksize=args.blocksize,
        double_quant=not args.no_double_quant,
        compute_dtype=args.compute_dtype,
        skip_modules=args.skip_modules,
        plan=args.plan,
        threads=args.threads,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    for w in r.warnings:
        print(f"lorafast: warning: {w}", file=sys.stderr)
    if not args.quiet:
        print(
            f"quantized {r.tensors_quantized} weights ({r.elements_quantized / 1e6:.1f} M elements) to "
            f"{args.quant_type}, copied {r.tensors_copied} tensors -> {r.output} "
            f"({r.bytes_written / 1e9:.3f} GB in {r.seconds:.2f} s)"
        )
    return 0


def _quiet_blas() -> None:
    """numpy (which gguf imports) does no linear algebra here, but OpenBLAS would start a thread per core
    that competes with the writer's pool."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _cmd_gguf(args: argparse.Namespace) -> int:
    require("lorafast gguf", "gguf", "transformers", find_only=("transformers",))
    _quiet_blas()
    from lorafast.gguf import to_gguf

    r = to_gguf(
        args.base,
        args.adapters,
        args.out,
        type=args.type,
        weights=args.weights,
        name=args.name,
        threads=args.threads,
        overwrite=args.overwrite,
        safe_merge=args.safe_merge,
        progress=not args.quiet,
    )
    for w in r.warnings:
        print(f"lorafast: warning: {w}", file=sys.stderr)
    if not args.quiet:
        types = ", ".join(f"{n} {t}" for t, n in r.types)
        merged = f"merged {len(args.adapters)} adapter(s), " if args.adapters else ""
        print(
            f"{merged}wrote {r.output}: {r.tensors} tensors ({types}); "
            f"{r.bytes_written / 1e9:.3f} GB in {r.seconds:.2f} s"
        )
    return 0


def _cmd_gguf_lora(args: argparse.Namespace) -> int:
    require("lorafast gguf-lora", "gguf")
    _quiet_blas()
    from lorafast.gguf import lora_to_gguf

    r = lora_to_gguf(args.adapter, args.base, args.out, type=args.type, name=args.name, overwrite=args.overwrite)
    if not args.quiet:
        types = ", ".join(f"{n} {t}" for t, n in r.types)
        print(f"wrote {r.output}: {r.tensors} tensors ({types}); {r.bytes_written / 1e6:.1f} MB in {r.seconds:.2f} s")
    return 0


def _cmd_dequantize(args: argparse.Namespace) -> int:
    from lorafast.quant import dequantize

    r = dequantize(
        args.qdir, args.out, dtype=args.dtype, threads=args.threads, progress=not args.quiet, overwrite=args.overwrite
    )
    for w in r.warnings:
        print(f"lorafast: warning: {w}", file=sys.stderr)
    if not args.quiet:
        print(
            f"dequantized {r.tensors_dequantized} weights, copied {r.tensors_copied} tensors -> {r.output} "
            f"({r.bytes_written / 1e9:.3f} GB in {r.seconds:.2f} s)"
        )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    require("lorafast train", *TRAINING, *(["bitsandbytes"] if args.qlora else []))
    from lorafast.train import TrainConfig, train

    rank_pattern = {}
    for item in args.rank_pattern or []:
        name, _, r = item.partition("=")
        if not r.isdigit():
            raise ValueError(f"--rank-pattern takes NAME=RANK, got {item!r}")
        rank_pattern[name] = int(r)
    cfg = TrainConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        task=args.task,
        eval_data=args.eval_data,
        text_field=args.text_field,
        label_field=args.label_field,
        max_length=args.max_length,
        r=args.r,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=args.targets,
        rslora=args.rslora,
        init=args.init,
        rank_pattern=rank_pattern,
        qlora=args.qlora,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm,
        grad_checkpointing=args.grad_checkpointing,
        precision=args.precision,
        seed=args.seed,
        merge=args.merge,
        progress=not args.quiet,
    )
    r = train(cfg)
    s = r.summary
    print(
        f"trained {s['trainable_parameters']:,} of {s['total_parameters']:,} parameters in {s['train_seconds']:.1f} s "
        f"on {s['device']}; adapter {r.adapter} ({s['adapter_bytes'] / 1e6:.2f} MB); eval {s['eval']}"
    )
    return 0


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _cmd_verify(args: argparse.Namespace) -> int:
    require("lorafast verify", *INFERENCE)
    _quiet_transformers()
    from lorafast.train.multi import verify

    r = verify(args.base, args.adapter, args.merged, tolerance=args.tolerance)
    print(
        f"ok: largest logit difference {r['max_abs_diff']:.3g} ({r['relative_diff']:.3g} of the logits' scale, "
        f"tolerance {r['tolerance']})"
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    require("lorafast predict", *INFERENCE)
    _quiet_transformers()
    import transformers

    from lorafast.train.data import read_records
    from lorafast.train.multi import _adapter_task, load, predict

    adapters = {}
    for item in args.adapter:
        name, _, path = item.partition("=")
        if not path:
            raise ValueError(f"--adapter takes NAME=PATH, got {item!r}")
        adapters[name] = path
    use = args.use or next(iter(adapters))
    if use not in adapters:
        raise ValueError(f"--use {use!r}: not one of the adapters {sorted(adapters)}")
    model = load(args.model, adapters, active=use)
    tok_dir = adapters[use] if (Path(adapters[use]) / "tokenizer_config.json").exists() else args.model
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    task = "seq-cls" if _adapter_task(adapters[use]) == "SEQ_CLS" else "causal-lm"
    labels = None
    summary = Path(adapters[use]).parent / "summary.json"
    if summary.exists():
        labels = json.loads(summary.read_text()).get("labels") or None
    rows = read_records(args.data)
    preds = predict(model, tokenizer, rows, task=task, text_field=args.text_field, labels=labels)
    out = Path(args.out)
    out.write_text("".join(json.dumps(p) + "\n" for p in preds))
    print(f"{len(preds)} predictions with adapter {use!r} -> {out}")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    qlora = ["bitsandbytes"] if "--qlora" in args.train_args else []
    require("lorafast experiment", *TRAINING, "matplotlib", *qlora)
    from lorafast.train.experiment import run

    if args.kind == "ranks":
        if not args.ranks:
            raise ValueError("experiment ranks needs --ranks, e.g. --ranks 4,8,16,32")
        settings = [s.strip() for s in args.ranks.split(",") if s.strip()]
        if not all(s.isdigit() and int(s) > 0 for s in settings):
            raise ValueError(f"--ranks must be positive integers, got {args.ranks!r}")
    else:
        if not args.module_sets:
            raise ValueError('experiment modules needs --module-sets, e.g. "q_proj,v_proj;attn-mlp"')
        settings = [s.strip() for s in args.module_sets.split(";") if s.strip()]
    # The train options are checked before anything runs: a typo fails now, not after the first setting.
    build_parser().parse_args(["train", *args.train_args, "--out", str(args.out)])
    rows = run(args.kind, settings, args.train_args, Path(args.out))
    print((Path(args.out) / "results.md").read_text(), end="")
    print(f"{len(rows)} settings -> {args.out}/results.csv, results.md, results.png")
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lorafast.inspect import inspect_adapter, inspect_checkpoint, is_adapter

    if is_adapter(args.path):
        info = inspect_adapter(args.path)
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        cfg = info["config"]
        print(
            f"adapter {args.path}: {cfg.get('peft_type')} task={cfg.get('task_type')} r={cfg.get('r')} "
            f"alpha={cfg.get('lora_alpha')} rslora={cfg.get('use_rslora', False)} dora={cfg.get('use_dora', False)}"
        )
        params = f"  target_parameters: {cfg['target_parameters']}" if cfg.get("target_parameters") else ""
        print(f"  targets: {cfg.get('target_modules')}{params}  modules_to_save: {cfg.get('modules_to_save')}")
        print(
            f"  trainable parameters: {info['trainable_parameters']:,}  file: {_human(info['file_bytes'])}  "
            f"LoRA modules: {len(info['modules'])}"
        )
        print(f"  modules changed most (||scaling * B A||_F), top {args.top}:")
        for m in info["modules"][: args.top]:
            name = f"{m['module']}.{m['param']}" if m["param"] else m["module"]
            print(f"    {m['delta_norm']:12.5g}  {name}  (r={m['r']}, scaling={m['scaling']:.4g})")
        experts = [m for m in info["modules"] if m["expert_norms"]]
        if experts:
            print("  per expert (||scaling * B_e A_e||_F over the experts: min / median / max, top experts):")
        for m in sorted(experts, key=lambda m: m["module"] + "." + m["param"])[: args.top]:
            norms = m["expert_norms"]
            srt = sorted(norms)
            median = srt[len(srt) // 2] if len(srt) % 2 else (srt[len(srt) // 2 - 1] + srt[len(srt) // 2]) / 2
            top = sorted(range(len(norms)), key=lambda e: -norms[e])[:3]
            unchanged = sum(1 for x in norms if x == 0.0)
            print(
                f"    {m['module']}.{m['param']}  {len(norms)} experts: {srt[0]:.4g} / {median:.4g} / {srt[-1]:.4g}  "
                f"top: {', '.join(f'{e} ({norms[e]:.4g})' for e in top)}"
                + (f"  unchanged: {unchanged}" if unchanged else "")
            )
        if len(experts) > args.top:
            print(f"    ... {len(experts) - args.top} more parameters (--top, --json)")
        for key in info["saved_tensors"]:
            print(f"  saved in full: {key}")
        return 0
    info = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    dtypes: dict[str, int] = {}
    for t in info["tensors"]:
        dtypes[t["dtype"]] = dtypes.get(t["dtype"], 0) + t["bytes"]
    print(
        f"checkpoint {args.path}: {len(info['tensors'])} tensors, {info['parameters']:,} parameters, "
        f"{_human(info['total_bytes'])} in {len(info['shards'])} file(s)"
    )
    print("  by dtype: " + ", ".join(f"{k} {_human(v)}" for k, v in sorted(dtypes.items())))
    shown = info["tensors"] if args.all else info["tensors"][: args.top]
    for t in shown:
        print(f"    {t['name']}  {t['dtype']}  {t['shape']}  {_human(t['bytes'])}")
    if len(shown) < len(info["tensors"]):
        print(f"    ... {len(info['tensors']) - len(shown)} more (--all)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lorafast.demo import run_demo

    run_demo(keep=args.keep, verify=not args.no_verify)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lorafast", description="Fast, exact LoRA tools for safetensors checkpoints.")
    p.add_argument("--version", action="version", version=f"lorafast {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("merge", help="merge LoRA adapters into a base checkpoint (exact to PEFT)")
    m.add_argument("base", help="base model folder (safetensors, single file or sharded)")
    m.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT LoRA adapter folder(s)")
    m.add_argument("-o", "--out", required=True, help="output model folder")
    m.add_argument("--weights", type=_weights, help="comma-separated weight per adapter (default 1 each)")
    m.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="output float dtype (default: as stored)")
    m.add_argument("--threads", type=int, help="worker threads (default: LORAFAST_NUM_THREADS or all cores)")
    m.add_argument("--safe-merge", action="store_true", help="refuse to write NaN/Inf produced by the merge")
    m.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    m.add_argument(
        "--requantize",
        action="store_true",
        help="with a 4-bit base: write 4-bit again (changed weights re-quantized from fp32)",
    )
    m.add_argument("--quantize", choices=["nf4", "fp4"], help="with a float base: merge and quantize in one pass")
    m.add_argument("--blocksize", type=int, default=64, choices=[32, 64, 128, 256, 512, 1024, 2048, 4096])
    m.add_argument("--no-double-quant", action="store_true", help="with --quantize: keep the absmax in fp32")
    m.add_argument("--compute-dtype", choices=["bf16", "fp16", "fp32"], help="with --quantize: bnb_4bit_compute_dtype")
    m.add_argument(
        "--report", type=Path, metavar="FILE.json", help="per merged weight: how much of its change the output kept"
    )
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar, summary or report (unless --report)")
    m.set_defaults(func=_cmd_merge)

    g = sub.add_parser("gguf", help="write GGUF for llama.cpp (adapters merged on the fly; optional 4-bit mixes)")
    g.add_argument(
        "base",
        help="base model folder (Llama, Mistral, Mixtral, Qwen2, Qwen2/3-MoE, GPT-OSS, BERT, Roberta classifiers; "
        "float or bitsandbytes 4-bit)",
    )
    g.add_argument("adapters", nargs="*", metavar="ADAPTER", help="PEFT LoRA adapter folder(s) to merge")
    g.add_argument("-o", "--out", required=True, help="output .gguf file")
    g.add_argument(
        "--type",
        default="f16",
        choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"],
        help="f32/f16/bf16/q8_0 as convert_hf_to_gguf.py writes; q4_0/q4_k_m/q5_k_m/q6_k as llama-quantize then does",
    )
    g.add_argument("--weights", type=_weights, help="comma-separated weight per adapter (default 1 each)")
    g.add_argument("--name", help="general.name (default: from the model card or folder, as the converter does)")
    g.add_argument("--threads", type=int, help="worker threads (default: LORAFAST_NUM_THREADS or all cores)")
    g.add_argument("--safe-merge", action="store_true", help="refuse to write NaN/Inf produced by the merge")
    g.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    g.set_defaults(func=_cmd_gguf)

    gl = sub.add_parser("gguf-lora", help="write a LoRA adapter as GGUF for llama.cpp's --lora")
    gl.add_argument("adapter", help="PEFT LoRA adapter folder")
    gl.add_argument("--base", required=True, help="the base model folder it was trained on (its config.json)")
    gl.add_argument("-o", "--out", required=True, help="output .gguf file")
    gl.add_argument("--type", default="f32", choices=["f32", "f16", "bf16", "q8_0"], help="tensor type (default f32)")
    gl.add_argument("--name", help="general.name (default: from the adapter's model card or folder)")
    gl.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    gl.add_argument("-q", "--quiet", action="store_true", help="no summary")
    gl.set_defaults(func=_cmd_gguf_lora)

    c = sub.add_parser("combine", help="combine LoRA adapters into one (PEFT's add_weighted_adapter, on files)")
    c.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT LoRA adapter folders")
    c.add_argument("--weights", type=_weights, help="comma-separated weight per adapter (default 1 each)")
    c.add_argument("--method", choices=METHODS, default="svd", help="PEFT's combination_type (default svd)")
    c.add_argument("--density", type=float, help="share of values kept (ties, dare, magnitude_prune)")
    c.add_argument("--rank", type=int, help="rank of the svd methods' result (default: the largest input rank)")
    c.add_argument("--majority-sign", choices=["total", "frequency"], default="total", help="TIES sign election")
    c.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks")
    c.add_argument("--svd-clamp", type=float, help="clamp the svd factors at this quantile (PEFT's svd_clamp)")
    c.add_argument("--allow-different-bases", action="store_true", help="combine adapters naming different bases")
    _common_output_options(c, "output float dtype (default fp32, as PEFT saves)")
    c.set_defaults(func=_cmd_combine)

    x = sub.add_parser("extract", help="extract a LoRA adapter from a base / fine-tuned checkpoint pair (SVD)")
    x.add_argument("base", help="base model folder")
    x.add_argument("tuned", help="fine-tuned model folder with the same tensors")
    x.add_argument("--rank", type=int, required=True, help="rank per module (the cap with --energy)")
    x.add_argument("--energy", type=float, help="per module, the fewest components holding this energy share")
    x.add_argument(
        "--targets",
        type=lambda s: s.split(","),
        help="comma-separated module names or suffixes (default: every linear layer but embeddings and heads)",
    )
    x.add_argument("--modules-to-save", action="store_true", help="carry other changed modules (norms, heads) whole")
    x.add_argument("--power-iters", type=int, help="randomized SVD power iterations at most (default 2)")
    x.add_argument("--tol", type=float, help="stop iterating when one adds less than this energy share (1e-3)")
    _common_output_options(x, "output float dtype (default fp32)")
    x.set_defaults(func=_cmd_extract)

    rs = sub.add_parser("resize", help="lower an adapter's rank by SVD (--rank, --energy or both)")
    rs.add_argument("adapter", help="PEFT LoRA adapter folder")
    rs.add_argument("--rank", type=int, help="largest rank kept per module")
    rs.add_argument("--energy", type=float, help="per module, the fewest components holding this energy share")
    _common_output_options(rs, "output float dtype (default: the adapter's)")
    rs.set_defaults(func=_cmd_resize)

    q = sub.add_parser("quantize", help="write a 4-bit NF4/FP4 checkpoint, byte-identical to bitsandbytes'")
    q.add_argument("base", help="base model folder (safetensors)")
    q.add_argument("-o", "--out", required=True, help="output model folder")
    q.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    q.add_argument("--blocksize", type=int, default=64, choices=[32, 64, 128, 256, 512, 1024, 2048, 4096])
    q.add_argument("--no-double-quant", action="store_true", help="keep the absmax in fp32")
    q.add_argument(
        "--compute-dtype", choices=["bf16", "fp16", "fp32"], help="bnb_4bit_compute_dtype (default: base dtype)"
    )
    q.add_argument("--skip-modules", nargs="+", metavar="NAME", help="modules to leave unquantized")
    q.add_argument(
        "--plan",
        choices=["auto", "names", "transformers"],
        default="auto",
        help="find the linear layers by name (fast) or with transformers' rules (any architecture)",
    )
    q.add_argument("--threads", type=int, help="worker threads")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_cmd_quantize)

    dq = sub.add_parser("dequantize", help="turn a 4-bit checkpoint back into a normal one")
    dq.add_argument("qdir", help="pre-quantized model folder")
    dq.add_argument("-o", "--out", required=True, help="output model folder")
    dq.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="output dtype (default: the quant state's)")
    dq.add_argument("--threads", type=int, help="worker threads")
    dq.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    dq.add_argument("-q", "--quiet", action="store_true")
    dq.set_defaults(func=_cmd_dequantize)

    t = sub.add_parser("train", help="fine-tune a LoRA / QLoRA adapter (CUDA when available, else CPU)")
    t.add_argument("--model", required=True, help="local model folder or hub name")
    t.add_argument("--task", choices=["seq-cls", "causal-lm"], default="seq-cls")
    t.add_argument("--data", required=True, help=".jsonl, .json, .csv, .parquet or a datasets name")
    t.add_argument("--eval-data")
    t.add_argument("--out", required=True)
    t.add_argument("--text-field", default="text")
    t.add_argument("--label-field", default="label")
    t.add_argument("--max-length", type=int, default=256)
    t.add_argument("--r", type=int, default=8)
    t.add_argument("--alpha", type=float)
    t.add_argument("--dropout", type=float, default=0.05)
    t.add_argument(
        "--targets",
        default="attn",
        help="attn, attn-mlp, all-linear or comma-separated module names; on MoE models attn-experts / attn-mlp "
        "add the fused expert parameters (PEFT target_parameters, e.g. experts.gate_up_proj), which need --dropout 0",
    )
    t.add_argument("--rslora", action="store_true")
    t.add_argument("--init", choices=["default", "gaussian", "olora", "pissa"], default="default")
    t.add_argument("--rank-pattern", nargs="+", metavar="NAME=RANK")
    t.add_argument("--qlora", action="store_true", help="4-bit NF4 base (quantized once by lorafast, cached)")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--warmup-ratio", type=float, default=0.03)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--grad-checkpointing", action="store_true")
    t.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--merge", action="store_true", help="also merge the adapter into OUT/merged (Rust merge)")
    t.add_argument("-q", "--quiet", action="store_true")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("experiment", help="train one adapter per rank or module set; table and plot of the results")
    e.add_argument("kind", choices=["ranks", "modules"])
    e.add_argument("--ranks", help="comma-separated ranks, e.g. 4,8,16,32")
    e.add_argument("--module-sets", help='semicolon-separated --targets values, e.g. "q_proj,v_proj;attn-mlp"')
    e.add_argument("--out", required=True, help="folder for the runs and results.csv / .md / .png")
    e.set_defaults(func=_cmd_experiment, train_args=[])

    v = sub.add_parser("verify", help="check a merged model against base + adapter (logit difference)")
    v.add_argument("base")
    v.add_argument("adapter")
    v.add_argument("merged")
    v.add_argument("--tolerance", type=float, help="largest relative logit difference allowed")
    v.set_defaults(func=_cmd_verify)

    pr = sub.add_parser("predict", help="predictions with one of several adapters on a base")
    pr.add_argument("--model", required=True)
    pr.add_argument("--adapter", required=True, nargs="+", metavar="NAME=PATH")
    pr.add_argument("--use", help="adapter to predict with (default: the first)")
    pr.add_argument("--data", required=True)
    pr.add_argument("--text-field", default="text")
    pr.add_argument("--out", required=True, help="predictions .jsonl")
    pr.set_defaults(func=_cmd_predict)

    i = sub.add_parser("inspect", help="describe a checkpoint or an adapter")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--top", type=int, default=10, help="rows to show")
    i.add_argument("--all", action="store_true", help="list every tensor")
    i.set_defaults(func=_cmd_inspect)

    d = sub.add_parser("demo", help="make a small model and adapter, merge, and check against PEFT")
    d.add_argument("--keep", type=Path, help="keep the files in this folder")
    d.add_argument("--no-verify", action="store_true", help="skip the PEFT comparison")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    # Deprecation notices of torch / transformers / peft internals are for their developers, not ours.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "experiment":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "experiment":
        args.train_args = extra  # every other option is a train option
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("lorafast: interrupted", file=sys.stderr)
        return 130
    except (LorafastError, OSError, ValueError) as e:
        if os.environ.get("LORAFAST_DEBUG"):
            raise
        print(f"lorafast: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the CLI promises one line, never a traceback
        if os.environ.get("LORAFAST_DEBUG"):
            raise
        print(
            f"lorafast: internal error: {type(e).__name__}: {e} (set LORAFAST_DEBUG=1 for details)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
