"""The CLI's subcommands. Each takes the parsed args and returns an exit status."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .api import quantization_config, quantize
from .errors import BitnestError
from .eval.bits import bits_report
from .formats.checkpoint import check_output, check_writable, save_quantized
from .models.hf import load_model


def _load(args, bits=None):
    return load_model(args.model if getattr(args, "model", None) else _default(args), bits=bits,
                      allow_pickle=args.allow_pickle)


def _default(args) -> str:
    from .paths import default_model
    return str(default_model(args.data_dir))


def cmd_quantize(args) -> int:
    """Under `torchrun --nproc_per_node N` (bitnest.distributed): calibrated methods split the calibration batches
    over the N processes; every process holds the same result and rank 0 writes it."""
    from .distributed import from_env
    with from_env():
        return _quantize(args)


def _quantize(args) -> int:
    from .api import make_config
    from .distributed import barrier, is_main, rank_world

    out = check_output(args.out, args.overwrite)  # fail before the work, not after (exists / not writable)
    barrier()  # every rank has checked --out before rank 0 can write it
    opts = {k: v for k, v in vars(args).items() if k in ("group_size", "symmetric")}  # only when given
    if args.targets is not None:
        opts["targets"] = args.targets
    if args.bits is not None:
        if args.method in ("matquant", "matgptq"):  # --bits 8,4,2: the precisions trained (or optimized) together
            opts["precisions"] = args.bits if isinstance(args.bits, tuple) else (args.bits,)
        elif isinstance(args.bits, tuple):
            raise BitnestError(f"--bits {','.join(map(str, args.bits))}: a list of precisions is for --method matquant; "
                               f"{args.method} takes one width")
        else:
            opts["bits"] = args.bits
    for flag in ("flavour", "lambdas", "codistill"):
        if getattr(args, flag, None) is not None:
            if args.method != "matquant" and not (flag == "lambdas" and args.method == "matgptq"):
                raise BitnestError(f"--{flag} is a matquant option (got --method {args.method})")
            opts[flag] = getattr(args, flag)
    if getattr(args, "calib_data", None) is not None:
        from dataclasses import fields
        from .methods import get_method
        if "calib_data" not in {f.name for f in fields(get_method(args.method).config_cls)}:
            raise BitnestError(f"--calib-data is for calibrated methods; {args.method} uses no calibration data")
        opts["calib_data"] = args.calib_data
    config = make_config(args.method, **{**opts, **parse_options(args.method, args.option)})
    if getattr(args, "stream", False):  # larger than RAM: never build the model (bitnest.streaming)
        if rank_world()[1] > 1:
            raise BitnestError("--stream runs in one process; run it without torchrun")
        from .streaming import quantize_streaming
        quantize_streaming(args.model or _default(args), out, args.method, config, overwrite=args.overwrite,
                           progress=not args.no_progress)
        size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
        print(f"wrote {out}: {args.method} {config.bits}-bit {_granularity(config.group_size)}, streamed, "
              f"{size / 2**20:.2f} MiB")
        return 0
    loaded = _load(args)
    if loaded.quantization_config is not None:
        raise BitnestError(f"{loaded.source} is already quantized; quantize the full-precision model")
    quantize(loaded.model, args.method, config, progress=not args.no_progress, tokenizer=loaded.tokenizer)
    save_quantized(loaded.model, loaded.tokenizer, out, quantization_config(args.method, config, loaded.source),
                   storage_dtype=loaded.storage_dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    barrier()  # rank 0 alone writes (save_quantized); the others return once the checkpoint exists
    if not is_main():
        return 0
    rep = bits_report(loaded.model, loaded.storage_dtype)
    print(f"wrote {out}: {args.method} {config.bits}-bit {_granularity(config.group_size)}, "
          f"{rep.bits_per_weight:.3f} bits/weight, {rep.model_bytes / 2**20:.2f} MiB")
    return 0


def parse_options(method: str, pairs: list[str]) -> dict:
    """KEY=VALUE strings → typed config fields, typed after the field's default (int, float, bool, tuple, str)."""
    from dataclasses import MISSING, fields

    from .methods import get_method

    flds = {f.name: f for f in fields(get_method(method).config_cls)}
    out = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in flds:
            raise BitnestError(f"bad option {pair!r} for {method}: expected KEY=VALUE with KEY one of {', '.join(sorted(flds))}")
        f = flds[key]
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)
        out[key] = _typed(raw, default, pair)
    return out


def _typed(raw: str, default, pair: str):
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            items = [x for x in raw.split(",") if x]
            kind = type(default[0]) if default else str
            return tuple(kind(x) for x in items)
        if default is None and raw.lower() == "none":
            return None
        return raw
    except ValueError:
        raise BitnestError(f"bad value in option {pair!r}: expected {type(default).__name__}") from None


def cmd_methods(args) -> int:
    from dataclasses import fields

    from .methods import REGISTRY

    for name, m in sorted(REGISTRY.items()):
        print(f"{name}: " + ", ".join(f"{f.name}={getattr(m.config_cls(), f.name)!r}" for f in fields(m.config_cls)))
    return 0


def _granularity(g) -> str:
    return "per-channel" if g is None else "per-tensor" if g == -1 else f"group {g}"


def _teacher(args, loaded):
    if args.teacher == "none" or (args.teacher is None and loaded.quantization_config is None):
        return None
    src = args.teacher or loaded.quantization_config.get("source_model")
    if not src or not Path(src).exists():
        return None  # the checkpoint's source is not on this machine: KL/top-1 are skipped, not faked
    return load_model(src, allow_pickle=args.allow_pickle).model


def cmd_eval(args) -> int:
    from .eval.report import evaluate

    loaded = _load(args, bits=args.bits)
    if args.tasks:
        return _eval_tasks(args, loaded)
    res = evaluate(loaded.model, loaded.tokenizer, args.data, data_dir=args.data_dir, ctx=args.ctx,
                   limit=args.limit, batch_size=args.batch_size, teacher=_teacher(args, loaded),
                   storage_dtype=loaded.storage_dtype, progress=not args.no_progress)
    res["model"] = loaded.source
    res["bits"] = args.bits
    if args.json:
        print(json.dumps(res))
        return 0
    lim = f" (first {res['windows']} windows only: --limit)" if res["limited"] else ""
    print(f"{loaded.source} on {args.data}: ppl {res['ppl']:.3f}  nll {res['nll']:.4f}  tokens {res['tokens']}"
          f"  ctx {res['ctx']}{lim}")
    print(f"bits/weight {res['bits_per_weight']:.3f}  model {res['model_bytes'] / 2**20:.2f} MiB"
          + (f"  KL {res['kl']:.4f}  top-1 {res['top1']:.4f}" if "kl" in res else ""))
    return 0


def _eval_tasks(args, loaded) -> int:
    from .eval.tasks import evaluate_tasks, format_table

    res = evaluate_tasks(loaded.model, loaded.tokenizer, args.tasks, data_dir=args.data_dir, limit=args.limit,
                         ctx=args.ctx, batch_size=args.batch_size, progress=not args.no_progress)
    if args.json:
        print(json.dumps({"model": loaded.source, "bits": args.bits, "tasks": res}))
        return 0
    print(f"{loaded.source}" + (f" at {args.bits} bits" if args.bits else "") + " — zero-shot, lm-eval conventions, ± bootstrap s.e.")
    print(format_table(res))
    if any(r["trained_on"] for r in res.values()):
        print("† its text is in ref-10m's training data: do not read it as zero-shot on that model")
    return 0


def _stored_dtype(path) -> torch.dtype:
    """The dtype a bitnest checkpoint stores its unquantized tensors in (load in it: no cast, no extra memory)."""
    from .models.hf import read_config
    p = Path(path)
    qc = read_config(p).get("quantization_config", {}) if p.is_dir() else {}
    return getattr(torch, str(qc.get("storage_dtype", "float32")), torch.float32)


def cmd_slice(args) -> int:
    from .nn.qlinear import QuantLinear
    from .models.blocks import replace_module

    out = check_output(args.out, args.overwrite)
    budget, strategy = getattr(args, "budget", None), getattr(args, "strategy", None)
    if (args.bits is None) == (budget is None):
        raise BitnestError("pass either --bits R (one width) or --budget B (Mix'n'Match per-layer widths)")
    if strategy and budget is None:
        raise BitnestError("--strategy needs --budget (bits per FFN weight)")
    loaded = load_model(args.model, bits=args.bits, allow_pickle=args.allow_pickle, dtype=_stored_dtype(args.model))
    mix = None
    if budget is not None:
        from .mixnmatch import choose_mix, mix_summary
        mix = choose_mix(loaded, budget, strategy=strategy, levels=args.levels, calib_samples=args.calib_samples,
                         data_dir=args.data_dir, progress=not args.no_progress)
    for name, m in list(loaded.model.named_modules()):
        if isinstance(m, QuantLinear) and m.serve_bits != m.bits:
            replace_module(loaded.model, name, m.standalone())
        elif hasattr(m, "to_standalone"):  # Extra Precision MatQuant: r-bit codes + the extra bucket's index list
            replace_module(loaded.model, name, m.to_standalone())
    qc = {k: v for k, v in loaded.quantization_config.items() if k not in ("modules", "quant_method", "format_version", "storage_dtype")}
    qc.update(nested=False, sliced_from=str(args.model), sliced_bits=args.bits if mix is None else mix)
    save_quantized(loaded.model, loaded.tokenizer, out, qc, storage_dtype=loaded.storage_dtype, overwrite=args.overwrite)
    if mix is None:
        print(f"wrote {out}: {args.bits}-bit slice of {args.model} ({_dir_bytes(out) / 2**20:.2f} MiB on disk)")
    else:
        from .models.blocks import is_ffn
        ffn = [n for n in mix if is_ffn(n)]
        rep = bits_report(loaded.model, loaded.storage_dtype, only=ffn)
        print(f"wrote {out}: Mix'n'Match ({strategy or 'greedy search'}) of {args.model}, "
              f"{rep.bits_per_weight:.3f} bits per FFN weight (budget {budget}); per block: {mix_summary(mix)} "
              f"({_dir_bytes(out) / 2**20:.2f} MiB on disk)")
    return 0


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.glob("*.safetensors"))


def cmd_info(args) -> int:
    loaded = load_model(args.model, allow_pickle=args.allow_pickle, check=False)
    qc = loaded.quantization_config
    rep = bits_report(loaded.model, loaded.storage_dtype)
    from .formats.checkpoint import layer_summary, recipe_mismatch

    info = {"model": loaded.source, "quantized": qc is not None,
            "method": qc and qc.get("method"), "config": qc and qc.get("config"), "nested": bool(qc and qc.get("nested")),
            "stored": qc and layer_summary(qc), "config_mismatch": qc and recipe_mismatch(qc),
            "bits_per_weight": rep.bits_per_weight, "quantized_weights": rep.quantized_weights,
            "model_bytes": rep.model_bytes, "file_bytes": _dir_bytes(Path(args.model)) if Path(args.model).is_dir() else None,
            "layers": {n: {"bits": lc["serve_bits"], "stored_bits": lc["bits"], "group_size": lc["group_size"]}
                       for n, lc in (qc or {}).get("modules", {}).items()}}
    if args.json:
        print(json.dumps(info))
        return 0
    if qc is None:
        print(f"{loaded.source}: full precision ({loaded.storage_dtype}), {rep.model_bytes / 2**20:.2f} MiB")
        return 0
    print(f"{loaded.source}: bitnest {qc['method']}{' (Matryoshka: servable at any r ≤ stored bits)' if info['nested'] else ''}")
    # the per-layer entries are what loads (and what the tensors were checked against); `config` only records
    # what the method was asked for, so it is shown as that, and a disagreement is said, not hidden
    lay = info["stored"]
    print(f"  layers: serve {'/'.join(f'int{b}' for b in lay['served'])}, store {'/'.join(f'int{b}' for b in lay['stored'])}, "
          f"{'/'.join(_granularity(g) for g in lay['group_size']) or 'n/a'}"
          + (f", {'/'.join('symmetric' if x else 'asymmetric' for x in lay['symmetric'])}" if lay["symmetric"] else "")
          + (f", kinds {'/'.join(lay['kinds'])}" if lay["kinds"] != ["affine"] else ""))
    print(f"  recipe (as recorded): {json.dumps(qc.get('config'))}")
    if info["config_mismatch"]:
        print(f"  warning: the recorded recipe disagrees with every layer: {'; '.join(info['config_mismatch'])} — the "
              "checkpoint was edited or damaged; the layers above are what loads")
    print(f"  {rep.bits_per_weight:.3f} bits/weight over {rep.quantized_weights:,} quantized weights; "
          f"model {rep.model_bytes / 2**20:.2f} MiB; files {info['file_bytes'] / 2**20:.2f} MiB")
    print("  layer                                    bits  stored  group")
    for n, lc in info["layers"].items():
        print(f"  {n:<40} {lc['bits']:>4}  {lc['stored_bits']:>6}  {_granularity(lc['group_size'])}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args)


def cmd_generate(args) -> int:
    """`bitnest generate`: one prompt (--prompt) or an interactive session (stdin), on the fast kernels."""
    import contextlib
    import sys

    from . import kernels

    if args.bits is not None and args.budget is not None:
        raise BitnestError("pass --bits or --budget, not both")
    loaded = load_model(args.model or _default(args), allow_pickle=args.allow_pickle, dtype=getattr(torch, args.dtype))
    model = loaded.model
    if (args.bits is not None or args.budget is not None) and not hasattr(model, "set_precision"):
        raise BitnestError(f"{loaded.source} is not a bitnest checkpoint; --bits/--budget serve Matryoshka checkpoints")
    if args.bits is not None or args.budget is not None:
        model.set_precision(args.bits, budget=args.budget)
    ctx = kernels.use("reference") if args.reference else contextlib.nullcontext()
    with ctx:
        if args.prompt is not None and not args.interactive:
            return _generate_one(args, loaded, args.prompt)
        print(f"bitnest generate: {loaded.source} ({_precision_line(model)}); type a prompt, or :help", file=sys.stderr)
        for line in sys.stdin:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.startswith(":"):
                if _session_command(model, line) == "quit":
                    break
                continue
            try:
                _generate_one(args, loaded, line)
            except BitnestError as e:  # a bad prompt ends this prompt, not the session
                print(f"bitnest: error: {e}", file=sys.stderr)
    return 0


def _precision_line(model) -> str:
    if not hasattr(model, "precision"):
        return "full precision"
    try:
        p = model.precision()
    except BitnestError:
        return "quantized"
    if not p["layers"]:
        return "quantized"
    w = f"int{p['bits']}" if p["bits"] else "mixed widths"
    return f"{w}, {p['bits_per_weight']:.2f} bits/weight, {p['resident_bytes'] / 2**20:.1f} MiB resident"


def _session_command(model, line: str) -> str | None:
    """:bits R | :budget B | :mix GLOB=R[,GLOB=R] | :precision | :help | :quit — errors are reported, not fatal."""
    import sys

    cmd, _, arg = line[1:].strip().partition(" ")
    try:
        if cmd in ("quit", "q", "exit"):
            return "quit"
        if cmd == "help":
            print(":bits R | :budget B | :mix GLOB=R[,GLOB=R] | :precision | :quit", file=sys.stderr)
            return None
        if cmd in ("bits", "budget", "mix"):
            if not hasattr(model, "set_precision"):
                raise BitnestError("this model is not a bitnest checkpoint: it has one precision")
            if cmd == "bits":
                out = model.set_precision(int(arg))
            elif cmd == "budget":
                out = model.set_precision(budget=float(arg))
            else:
                pairs = [p.partition("=") for p in arg.split(",") if p.strip()]
                if not pairs or any(not eq for _, eq, _ in pairs):
                    raise BitnestError("usage: :mix GLOB=R[,GLOB=R], e.g. :mix *.mlp.*=2,*.self_attn.*=4")
                out = model.set_precision({k.strip(): int(v) for k, _, v in pairs})
            print(f"[switched in {out['switch_seconds'] * 1e3:.0f} ms: {_precision_line(model)}]", file=sys.stderr)
            return None
        if cmd == "precision":
            print(f"[{_precision_line(model)}]", file=sys.stderr)
            return None
        raise BitnestError(f"unknown command :{cmd} (:help lists them)")
    except ValueError:
        print(f"bitnest: error: bad value in {line!r}", file=sys.stderr)
    except BitnestError as e:
        print(f"bitnest: error: {e}", file=sys.stderr)
    return None


def _generate_one(args, loaded, prompt: str) -> int:
    import sys

    from .generate import generate

    emit = None if args.json else (lambda piece: print(piece, end="", flush=True))
    if emit:
        print(prompt, end="", flush=True)
    res = generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed, stream=emit)
    stats = {"prompt_tokens": res.prompt_tokens, "new_tokens": res.new_tokens, "seconds": res.seconds,
             "prefill_seconds": res.prefill_seconds, "decode_tok_s": res.decode_tok_s, "tok_s": res.tok_s,
             "precision": _precision_line(loaded.model)}
    if args.json:
        print(json.dumps({"text": res.text, **stats}))
    else:
        print()
        print(f"[{res.new_tokens} tokens in {res.seconds:.2f} s: {res.decode_tok_s:.1f} tok/s decode, prefill "
              f"{res.prompt_tokens} tokens in {res.prefill_seconds * 1e3:.0f} ms; {stats['precision']}]", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from .report import build

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise BitnestError(f"output {out} already exists and is not empty (pass --overwrite to write into it)")
    check_writable(out)
    try:
        budgets = tuple(float(b) for b in args.budgets.split(",") if b.strip())
    except ValueError:
        raise BitnestError(f"--budgets takes comma-separated bits per weight like 3,5, got {args.budgets!r}") from None
    for c in args.ckpts:
        if not (Path(c) / "config.json").is_file():
            raise BitnestError(f"{c} is not a bitnest checkpoint directory (no config.json)")
    page = build(args.ckpts, out, data=tuple(d for d in args.data.split(",") if d), data_dir=args.data_dir,
                 ctx=args.ctx, limit=args.limit, budgets=budgets, tasks=args.tasks, task_limit=args.task_limit,
                 speed=args.speed, progress=not args.no_progress)
    print(f"wrote {page} (+ report.md, report.json, {len(list(out.glob('*.png')))} figures)")
    return 0


def cmd_export(args) -> int:
    from .export import export

    out = Path(args.out)
    if args.to == "gguf":  # a file (or DIR/model.gguf): write_gguf checks the file before encoding
        if out.exists() and not args.overwrite:  # fail before the work, not after
            raise BitnestError(f"output {out} already exists (pass --overwrite to replace it)")
        check_writable(out)
    else:
        check_output(out, args.overwrite)  # fail before the work: exists, not a checkpoint to replace, not writable
    kw = {"gptq_format": args.gptq_format} if args.to == "gptq" else {}
    res = export(args.model, args.to, args.out, bits=args.bits, budget=args.budget, approximate=args.approximate,
                 overwrite=args.overwrite, **kw)
    approx = res.get("max_abs_weight_change", 0.0)
    print(f"wrote {res['out']}: {args.to}, {res['layers']} layers"
          + (f", approximate (largest weight change {approx:.3g})" if approx else ", exact"))
    return 0


def cmd_serve(args) -> int:
    from .serve import make_server, run

    if not 1 <= args.port <= 65535:
        raise BitnestError(f"--port must be 1..65535, got {args.port}")
    import socket
    with socket.socket() as s:  # fail before loading the model, with one line instead of uvicorn's log
        try:
            s.bind((args.host, args.port))
        except OSError as e:
            raise BitnestError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    try:
        budgets = tuple(float(b) for b in args.budgets.split(",") if b.strip())
    except ValueError:
        raise BitnestError(f"--budgets takes bits per weight like 3,5 (got {args.budgets!r})") from None
    server = make_server(args.model or _default(args), policy=args.policy, precision=args.precision, ladder=args.ladder,
                         api_key=args.api_key, slo_ms=args.slo_ms, max_queue=args.max_queue,
                         max_memory_mb=args.max_memory_mb, max_batch=args.max_batch, budgets=budgets,
                         cache_slices=args.cache_slices, dtype=getattr(torch, args.dtype),
                         name=args.served_model_name, allow_pickle=args.allow_pickle)
    run(server, host=args.host, port=args.port)
    return 0
