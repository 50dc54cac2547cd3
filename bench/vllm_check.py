"""vLLM's own loader code on our exports, without a GPU: config parsing and per-layer scheme selection.

    pip download --no-deps vllm -d /tmp/vllm-dl && unzip -q /tmp/vllm-dl/vllm-*.whl -d /tmp/vllm-pkg
    pip install --no-deps --target /tmp/vllm-deps pyzmq cbor2 openai-harmony openai sniffio pybase64 cachetools \
        msgspec uvloop py-cpuinfo xgrammar apache-tvm-ffi partial_json_parser llguidance
    PYTHONPATH=/tmp/vllm-pkg:/tmp/vllm-deps python bench/vllm_check.py EXPORT_DIR...

vLLM cannot run on this CPU-only machine (its wheel is a CUDA build; its CPU build is from source and its device
inference fails here), so this runs the part of its loader that decides whether and how a checkpoint loads:
`AutoGPTQConfig.from_config` (GPTQ → the Marlin path) and `CompressedTensorsConfig.from_config` + `get_scheme`
for every quantized Linear (the scheme and bit width vLLM would build for it). Weight shapes and kernels are not
exercised (that needs vLLM's device platform).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, write_json, write_section  # noqa: E402


def check(d: Path) -> dict:
    import torch
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    from safetensors import safe_open
    names = set()
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            names |= {k.rsplit(".", 1)[0] for k in h.keys() if k.endswith((".qweight", ".weight_packed"))}
    row = {"export": d.name, "format": qc["quant_method"], "layers": len(names)}
    if qc["quant_method"] == "gptq":
        from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
        row["ours"] = f"bits {qc['bits']}, sym {qc['sym']}, group {qc['group_size']}" + (", dynamic" if qc.get("dynamic") else "")
        try:
            c = AutoGPTQConfig.from_config(qc)
            row.update(accepted=True, vllm=f"{c.quant_type} (Marlin)")
        except Exception as e:  # noqa: BLE001 — what vLLM says is the result
            row.update(accepted=False, vllm=f"{type(e).__name__}: {e}")
        return row
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
    c = CompressedTensorsConfig.from_config(qc)
    schemes, bad = {}, []
    for n in sorted(names):
        try:
            s = c.get_scheme(torch.nn.Linear(8, 8), n)
            key = f"{type(s).__name__} {getattr(s, 'quant_type', '')}".strip()
            schemes[key] = schemes.get(key, 0) + 1
        except Exception as e:  # noqa: BLE001
            bad.append(f"{n}: {type(e).__name__}: {e}")
    groups = qc.get("config_groups", {})
    row["ours"] = ", ".join(sorted({f"{g['weights']['num_bits']}-bit {'sym' if g['weights']['symmetric'] else 'asym'}"
                                    for g in groups.values()}))
    row.update(accepted=not bad, vllm="; ".join(f"{k} × {v}" for k, v in schemes.items()) + ("; " + bad[0] if bad else ""))
    return row


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    rows = [check(Path(p)) for p in sys.argv[1:]]
    import vllm
    lines = ["| export | format | ours | layers | vLLM accepts | what vLLM builds / says |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['export']} | {r['format']} | {r['ours']} | {r['layers']} | {'yes' if r['accepted'] else '**no**'} | "
                     f"{r['vllm'][:200]} |")
        print(lines[-1])
    write_json("vllm_check.json", rows)
    note = (f"vLLM {vllm.__version__} (wheel unpacked, CUDA extension absent): its config parsing and per-layer scheme "
            "selection run on our export files; weight creation and kernels need vLLM's GPU platform and were not run.\n")
    write_section("vllm_check", header("vLLM's loader on our exports (config and scheme selection, no GPU)", note)
                  + "\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
