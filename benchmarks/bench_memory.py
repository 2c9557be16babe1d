# ruff: noqa: E501
"""Memory of a random-weight Llama-3-8B-shaped model: NVFP4 loaded packed by nvfp4_fix, against the
same model in bf16 and against compressed-tensors' path through plain transformers.

    PYTHONPATH=src python benchmarks/bench_memory.py
        [--cases nvfp4-cuda,nvfp4-cuda-lowmem,bf16-cuda,ct-cuda,nvfp4-cpu,nvfp4-cpu-lowmem,bf16-cpu]
        [--ct-site /tmp/site] [--out benchmarks/RESULTS-memory.md]

Each case runs in a fresh subprocess (``--case NAME``), so nothing of one case is left in the next:
* CPU: VmRSS after the load; the peak during the load and during the forward as VmHWM (reset between
  phases through /proc/self/clear_refs) and, from a 2 ms sampler thread, the peak of RssAnon (memory
  the process really owns; RssFile is the safetensors mmap, page cache the kernel can drop);
* GPU: ``torch.cuda.memory_allocated`` after the load (resident), ``max_memory_allocated`` during the
  load and during one forward of 512 tokens (16 on the CPU), peaks reset between phases.
Baselines are taken after ``import torch`` and CUDA initialisation, and subtracted ("net").
Cases: nvfp4-* = ``nvfp4_fix.from_pretrained(device_map=...)``; nvfp4-*-lowmem = the same after
``nvfp4_fix.enable_low_memory_mode()``, which also quantizes the bf16 embedding table to NVFP4 as it
loads (lossy; expected on the GPU: the 0.98 GiB table becomes 0.28 GiB, 5.63 -> ~4.93 GiB resident =
~0.33x bf16, and the load peaks ~0.1 GiB above resident, the quantizer's chunk scratch); bf16-* =
``AutoModelForCausalLM.from_pretrained`` of the bf16 checkpoint; ct-cuda = ``AutoModelForCausalLM``
of the NVFP4 checkpoint with compressed-tensors installed (``--ct-site`` is put on its PYTHONPATH).
Checkpoints come from benchmarks/llama8b.py (made on the GPU, once, under --ckpt-root).
Caveat for the -cpu cases (load only unless --cpu-forward): safetensors hands out tensors backed by
its mmap, so a CPU-loaded model is paged in (file-backed, shared with the page cache) only as a
forward touches it; RSS right after such a load does not show the model's size.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 1 << 30


def status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    return out


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    """Peak RssAnon / VmRSS seen every 2 ms (VmHWM cannot tell anonymous from file-backed pages)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak: dict[str, int] = {}
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stop.is_set():
            s = status()
            with self.lock:
                for k in ("VmRSS", "RssAnon", "RssFile"):
                    self.peak[k] = max(self.peak.get(k, 0), s.get(k, 0))
            time.sleep(0.002)

    def take(self) -> dict[str, int]:
        with self.lock:
            p = dict(self.peak)
            self.peak.clear()
        return p


def parse_case(case: str) -> tuple[str, str, bool]:
    """'nvfp4-cuda-lowmem' -> ('nvfp4', 'cuda', True)."""
    kind, device, *rest = case.split("-")
    return kind, device, rest == ["lowmem"]


def run_case(args) -> dict:
    import torch

    case = args.case
    kind, device, lowmem = parse_case(case)
    cuda = device == "cuda"
    # Import everything the load needs before the baseline, so that it counts model memory only.
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    import nvfp4_fix.loading  # noqa: F401

    if kind == "ct":
        import compressed_tensors  # noqa: F401 - must be importable for this case
    if cuda:
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    gc.collect()
    base = status()
    reset_hwm()
    sampler = Sampler()
    sampler.start()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ckpt = Path(args.ckpt_root) / ("bf16" if kind == "bf16" else "nvfp4")
    t = time.perf_counter()
    if kind == "nvfp4":
        import nvfp4_fix

        if lowmem:
            nvfp4_fix.enable_low_memory_mode()
        model = nvfp4_fix.from_pretrained(ckpt, dtype=torch.bfloat16, device_map="cuda" if cuda else None)
    else:
        kw = {"device_map": "cuda"} if cuda else {}
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, **kw)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    gc.collect()
    res: dict = {"case": case, "load_s": load_s}
    after = status()
    samp = sampler.take()
    res["cpu_base"] = base["VmRSS"]
    res["cpu_rss_load"] = after["VmRSS"]
    res["cpu_anon_load"] = after["RssAnon"]
    res["cpu_hwm_load"] = after["VmHWM"]
    res["cpu_peak_anon_load"] = samp.get("RssAnon", 0)
    res["cpu_base_anon"] = base["RssAnon"]
    if cuda:
        res["gpu_resident"] = torch.cuda.memory_allocated()
        res["gpu_peak_load"] = torch.cuda.max_memory_allocated()
        res["gpu_reserved_load"] = torch.cuda.memory_reserved()
    res["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    res["buffer_bytes"] = sum(b.numel() * b.element_size() for b in model.buffers())

    if not args.no_forward:
        tokens = 512 if cuda else 16
        vocab = model.config.vocab_size
        ids = torch.randint(vocab // 4, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(
            "cuda" if cuda else "cpu"
        )
        reset_hwm()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with torch.no_grad():
            out = model(input_ids=ids)
            _ = out.logits[0, -1, :8].float().cpu()
        if cuda:
            torch.cuda.synchronize()
        res["fwd_s"] = time.perf_counter() - t
        res["fwd_tokens"] = tokens
        del out
        gc.collect()
        after = status()
        samp = sampler.take()
        res["cpu_hwm_fwd"] = after["VmHWM"]
        res["cpu_peak_anon_fwd"] = samp.get("RssAnon", 0)
        res["cpu_rss_fwd"] = after["VmRSS"]
        if cuda:
            res["gpu_peak_fwd"] = torch.cuda.max_memory_allocated()
            res["gpu_resident_fwd"] = torch.cuda.memory_allocated()
    sampler.stop.set()
    return res


def g(x) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cases",
        default="nvfp4-cuda,nvfp4-cuda-lowmem,bf16-cuda,ct-cuda,nvfp4-cpu,nvfp4-cpu-lowmem,bf16-cpu",
    )
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt-root", default="/tmp/nvfp4fix-bench/l32")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="2-layer model on the CPU: smoke test")
    ap.add_argument(
        "--ct-site", default=None, help="folder with compressed-tensors and its deps (for ct-cuda)"
    )
    ap.add_argument("--no-forward", action="store_true")
    ap.add_argument(
        "--cpu-forward", action="store_true", help="also run the 16-token forward in the -cpu cases"
    )
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--out", default="benchmarks/RESULTS-memory.md")
    args = ap.parse_args()

    if args.case:
        print("RESULT " + json.dumps(run_case(args)), flush=True)
        return 0

    import torch

    sys.path.insert(0, str(HERE))
    from llama8b import card_name, ensure_checkpoints, llama8b_config, versions

    t0 = time.perf_counter()
    cfg = llama8b_config(args.layers, tiny=args.tiny)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    paths = ensure_checkpoints(Path(args.ckpt_root), ("nvfp4", "bf16"), cfg, device)
    sizes = {k: sum(f.stat().st_size for f in p.glob("*.safetensors")) for k, p in paths.items()}
    print(
        f"checkpoints ready in {time.perf_counter() - t0:.0f} s: "
        + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in sizes.items()),
        flush=True,
    )
    card = card_name()
    if device == "cuda":
        torch.cuda.empty_cache()

    results = {}
    notes = []
    for case in [c for c in args.cases.split(",") if c]:
        case_device = parse_case(case)[1]
        if case_device == "cuda" and device != "cuda":
            notes.append(f"{case}: skipped (no CUDA)")
            continue
        env = dict(os.environ)
        if case.startswith("ct-"):
            if not args.ct_site:
                notes.append(f"{case}: skipped (no --ct-site with compressed-tensors)")
                continue
            env["PYTHONPATH"] = os.pathsep.join([args.ct_site, env.get("PYTHONPATH", "")])
        cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--ckpt-root", args.ckpt_root]
        if args.no_forward or (case_device == "cpu" and not args.cpu_forward):
            cmd.append("--no-forward")
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            notes.append(f"{case}: timed out after {args.timeout:.0f} s")
            print(f"{case}: timed out", flush=True)
            continue
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if p.returncode or line is None:
            err = (p.stderr.strip().splitlines() or ["?"])[-1]
            notes.append(f"{case}: failed (exit {p.returncode}): {err[:300]}")
            print(f"{case}: FAILED\n{p.stderr[-3000:]}", flush=True)
            continue
        r = json.loads(line[len("RESULT ") :])
        results[case] = r
        print(
            f"{case}: {time.perf_counter() - t:.0f} s  "
            + json.dumps(
                {k: (round(v / GIB, 3) if isinstance(v, int) and v > 1 << 20 else v) for k, v in r.items()}
            ),
            flush=True,
        )

    # ---- table --------------------------------------------------------------------------------
    cmdline = "PYTHONPATH=src python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/bench_memory.py", *sys.argv[1:]]
    )
    lines = [f"# Memory: {'tiny smoke-test model' if args.tiny else f'random-weight Llama-3-8B shape ({args.layers} layers)'}", "",
             f"Card: **{card}**; {versions()}.", "", f"Command: `{cmdline}`", "",
             "Checkpoints: " + ", ".join(f"{k} {v / GIB:.2f} GiB on disk" for k, v in sizes.items()) + ". GiB = 2^30 bytes.", "",
             "GPU (torch.cuda allocator): resident after load, peak during load, peak during one forward of 512 tokens, resident after that forward.", "",
             "| case | load s | GPU resident | GPU peak load | peak/resident | GPU peak fwd | GPU resident after fwd | resident vs bf16 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    bf = results.get("bf16-cuda", {}).get("gpu_resident")
    for case, r in results.items():
        if "gpu_resident" not in r:
            continue
        ratio = f"{r['gpu_resident'] / bf:.3f}x" if bf else "-"
        lines.append(f"| {case} | {r['load_s']:.1f} | {g(r['gpu_resident'])} | {g(r['gpu_peak_load'])} | "
                     f"{r['gpu_peak_load'] / max(r['gpu_resident'], 1):.3f} | {g(r.get('gpu_peak_fwd'))} | {g(r.get('gpu_resident_fwd'))} | {ratio} |")  # fmt: skip
    lines += ["", "CPU (process memory from /proc/self/status, net of the baseline after `import torch` + CUDA init): "
              "RSS after load; VmHWM (all resident pages, safetensors' mmap included) and peak RssAnon (sampled; memory the process owns) during the load and the forward.", "",
              "| case | baseline RSS | RSS after load | HWM during load | peak anon during load | HWM during fwd | peak anon during fwd |",
              "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for case, r in results.items():
        b, ba = r["cpu_base"], r["cpu_base_anon"]
        lines.append(f"| {case} | {g(b)} | {g(r['cpu_rss_load'] - b)} | {g(r['cpu_hwm_load'] - b)} | {g(r['cpu_peak_anon_load'] - ba)} | "
                     f"{g(r['cpu_hwm_fwd'] - b) if 'cpu_hwm_fwd' in r else '-'} | {g(r['cpu_peak_anon_fwd'] - ba) if 'cpu_peak_anon_fwd' in r else '-'} |")  # fmt: skip
    bfr = results.get("bf16-cuda")
    for name in ("nvfp4-cuda", "nvfp4-cuda-lowmem"):
        nv = results.get(name)
        if nv and bfr:
            lines += ["", f"Targets ({name}): NVFP4 resident / bf16 resident = {nv['gpu_resident'] / bfr['gpu_resident']:.3f} (target <= 0.35); "
                      f"NVFP4 peak during load / resident = {nv['gpu_peak_load'] / nv['gpu_resident']:.3f} (target <= 1.15)."]  # fmt: skip
    nc = results.get("nvfp4-cpu")
    if nc:
        lines.append(
            f"CPU load of NVFP4: peak anon / resident anon = {(nc['cpu_peak_anon_load'] - nc['cpu_base_anon']) / max(nc['cpu_anon_load'] - nc['cpu_base_anon'], 1):.3f}."
        )
    if notes:
        lines += ["", *[f"- {x}" for x in notes]]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s total)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
