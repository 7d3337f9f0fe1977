#!/usr/bin/env python
"""Codec benchmark: payload bytes, error against the truncated-SVD optimum, and speed.

Synthetic updates with realistic shapes (ResNet-18, a 2-layer LSTM, an MLP) are encoded with every
codec setting of ``fedpower.codecs.build_codec``. For each setting it reports:

- packed payload bytes and the compression ratio against dense fp32;
- relative error ``‖M − decode(encode(M))‖ / ‖M‖`` over the whole update, one round from fresh state;
- the same after 5 warm-started rounds on a slowly drifting update (codec state carried over,
  error feedback off), and for low-rank codecs the truncated-SVD optimum at the same rank
  (per-matrix truncation; tensors the codec sends dense count as exact) and their ratio;
- median encode / decode milliseconds, and the speed-up of PowerSGD encode over a full SVD.

Plus ``torch.linalg.svd`` / ``torch.svd_lowrank`` timings on each update and a comparison of one
PowerSGD step against the same math written as in ``torch.distributed``'s ``powerSGD_hook``.

Usage::

    .venv/bin/python benchmarks/codecs.py            # full run (a few minutes on 2 CPU cores)
    .venv/bin/python benchmarks/codecs.py --quick    # smoke run: fewer repeats, no ResNet rounds
    .venv/bin/python benchmarks/codecs.py --render benchmarks/results/codecs.json   # markdown only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from rich.console import Console
from rich.table import Table
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _orthogonalize as hook_orthogonalize

from fedpower.codecs import build_codec, layout_nbytes, layout_of, pack
from fedpower.codecs.factory import as_compression
from fedpower.codecs.lowrank import compressible

console = Console()
RESULTS = Path(__file__).resolve().parent / "results" / "codecs.json"

# --- synthetic update settings ---------------------------------------------------------------
SIGNAL_RANK = 8  # rank of the low-rank part of each matrix
DECAY = 0.75  # singular values of the signal: DECAY**k, k = 0..SIGNAL_RANK-1
NOISE_FRACTION = 0.2  # expected share of each matrix's energy that is i.i.d. Gaussian noise
DRIFT = 0.1  # per round, each singular vector moves by ~DRIFT (≈ 6°) before re-orthonormalization
ENTRY_SCALE = 1e-3  # RMS of an update entry
WARM_ROUNDS = 5  # warm-started rounds after the fresh one
SEED = 0
TARGET_OPT_RATIO = 1.05
TARGET_SVD_SPEEDUP = 50.0
TARGET_HOOK_RATIO = 1.2


# --- model shapes ----------------------------------------------------------------------------
def resnet18_shapes() -> dict[str, tuple[int, ...]]:
    """Trainable tensors of torchvision's ResNet-18 (ImageNet head), built by hand."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "bn1.bias": (64,)}
    in_ch = 64
    for layer, ch in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{layer}.{block}"
            stride_block = block == 0 and ch != in_ch
            shapes[f"{prefix}.conv1.weight"] = (ch, in_ch if block == 0 else ch, 3, 3)
            shapes[f"{prefix}.bn1.weight"] = (ch,)
            shapes[f"{prefix}.bn1.bias"] = (ch,)
            shapes[f"{prefix}.conv2.weight"] = (ch, ch, 3, 3)
            shapes[f"{prefix}.bn2.weight"] = (ch,)
            shapes[f"{prefix}.bn2.bias"] = (ch,)
            if stride_block:
                shapes[f"{prefix}.downsample.0.weight"] = (ch, in_ch, 1, 1)
                shapes[f"{prefix}.downsample.1.weight"] = (ch,)
                shapes[f"{prefix}.downsample.1.bias"] = (ch,)
        in_ch = ch
    shapes["fc.weight"] = (1000, 512)
    shapes["fc.bias"] = (1000,)
    return shapes


def lstm_shapes(vocab: int = 80, embed: int = 8, hidden: int = 256, layers: int = 2) -> dict[str, tuple[int, ...]]:
    """Character LSTM (Shakespeare-style): embedding, ``layers`` LSTM layers, linear head."""
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (vocab, embed)}
    for layer in range(layers):
        shapes[f"lstm.weight_ih_l{layer}"] = (4 * hidden, embed if layer == 0 else hidden)
        shapes[f"lstm.weight_hh_l{layer}"] = (4 * hidden, hidden)
        shapes[f"lstm.bias_ih_l{layer}"] = (4 * hidden,)
        shapes[f"lstm.bias_hh_l{layer}"] = (4 * hidden,)
    shapes["fc.weight"] = (vocab, hidden)
    shapes["fc.bias"] = (vocab,)
    return shapes


def mlp_shapes(sizes: tuple[int, ...] = (40, 512, 512, 10)) -> dict[str, tuple[int, ...]]:
    """Fully connected net ``sizes[0] → … → sizes[-1]``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        shapes[f"fc{i}.weight"] = (fan_out, fan_in)
        shapes[f"fc{i}.bias"] = (fan_out,)
    return shapes


MODELS: dict[str, tuple[str, Callable[[], dict[str, tuple[int, ...]]]]] = {
    "resnet18": ("ResNet-18", resnet18_shapes),
    "lstm": ("LSTM 2×256 (emb 8, vocab 80)", lstm_shapes),
    "mlp": ("MLP 40-512-512-10", mlp_shapes),
}


# --- synthetic, slowly drifting updates ------------------------------------------------------
def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``x`` (sign-fixed QR)."""
    q, r = torch.linalg.qr(x)
    return q * torch.where(r.diagonal() < 0, -1.0, 1.0)


class DriftingUpdate:
    """Per matrix: rank-8 signal U diag(s) Vᵀ (decaying s) + Gaussian noise; U, V rotate a little per round."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], seed: int = SEED) -> None:
        self.shapes = dict(shapes)
        self.gen = torch.Generator().manual_seed(seed)
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for name, shape in self.shapes.items():
            if len(shape) < 2:
                continue
            n, m = shape[0], math.prod(shape[1:])
            k = min(SIGNAL_RANK, n, m)
            u = _orthonormal(torch.randn(n, k, generator=self.gen, dtype=torch.float64))
            v = _orthonormal(torch.randn(m, k, generator=self.gen, dtype=torch.float64))
            s = DECAY ** torch.arange(k, dtype=torch.float64)
            s *= math.sqrt((1 - NOISE_FRACTION) * n * m) * ENTRY_SCALE / s.norm()
            self.factors[name] = (u, s, v)

    def sample(self) -> dict[str, torch.Tensor]:
        """One update (float32, CPU) from the current signal plus fresh noise."""
        out: dict[str, torch.Tensor] = {}
        for name, shape in self.shapes.items():
            if name in self.factors:
                u, s, v = self.factors[name]
                noise = torch.randn(shape[0], v.shape[0], generator=self.gen) * (math.sqrt(NOISE_FRACTION) * ENTRY_SCALE)
                out[name] = ((u * s) @ v.T).to(torch.float32).add_(noise).reshape(shape)
            else:
                out[name] = torch.randn(shape, generator=self.gen) * ENTRY_SCALE
        return out

    def drift(self) -> None:
        """Rotate every singular subspace slightly (same singular values)."""
        for name, (u, s, v) in self.factors.items():
            du = torch.randn(u.shape, generator=self.gen, dtype=torch.float64) * (DRIFT / math.sqrt(u.shape[0]))
            dv = torch.randn(v.shape, generator=self.gen, dtype=torch.float64) * (DRIFT / math.sqrt(v.shape[0]))
            self.factors[name] = (_orthonormal(u + du), s, _orthonormal(v + dv))


# --- codec settings --------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    label: str
    compression: dict[str, Any]
    rank: int | None = None  # low-rank codecs: target rank (for the SVD optimum)

    def config(self) -> dict[str, Any]:
        """The compression dict with error feedback off (we measure the codec's own error)."""
        return {**self.compression, "error_feedback": False}


def settings() -> list[Setting]:
    out = [
        Setting("dense fp32", {"method": "none"}),
        Setting("fp16", {"method": "fp16"}),
        Setting("int8", {"method": "int8"}),
        Setting("int4", {"method": "quantize", "quantize_bits": 4}),
        Setting("top-k 1%", {"method": "topk", "ratio": 0.01}),
        Setting("top-k 1% + int8", {"method": "topk", "ratio": 0.01, "quantize_bits": 8}),
    ]
    for rank in (1, 2, 4, 8):
        for iters in (1, 2):
            for bits in (None, 8):
                cfg: dict[str, Any] = {"method": "powersgd", "rank": rank, "power_iterations": iters,
                                       "quantize_bits": None, "entropy_coding": "none"}  # as measured
                label = f"PowerSGD r{rank} it{iters}"
                if bits:
                    cfg["quantize_bits"] = bits
                    label += " int8"
                out.append(Setting(label, cfg, rank))
    out.append(Setting("PowerSGD r4 it1 deflation", {"method": "powersgd", "rank": 4, "deflation": True,
                                                         "quantize_bits": None, "entropy_coding": "none"}, 4))
    return out


# --- helpers ---------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timings(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median and minimum wall time of ``fn`` in ms after ``warmup`` calls (CUDA synchronized around each)."""
    return interleaved({"t": fn}, device, repeats, warmup)["t"]


def interleaved(fns: Mapping[str, Callable[[], Any]], device: torch.device, repeats: int,
                warmup: int = 1) -> dict[str, dict[str, float]]:
    """Time several functions in alternation (so they share the machine's load): {name: {median, min}} ms."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median": statistics.median(t), "min": min(t)} for name, t in times.items()}


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (other processes on the machine skew timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def rel_error(reference: Mapping[str, torch.Tensor], approx: Mapping[str, torch.Tensor]) -> float:
    """‖reference − approx‖ / ‖reference‖ over all tensors together (float64 accumulation)."""
    num = sum(float((reference[k].double() - approx[k].double()).pow(2).sum()) for k in reference)
    den = sum(float(reference[k].double().pow(2).sum()) for k in reference)
    return math.sqrt(num / den)


def as_matrices(update: Mapping[str, torch.Tensor]) -> dict[tuple[int, int], list[str]]:
    """Names of ≥2-D tensors grouped by their matrix shape (n, prod(rest)), for batched linalg."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, t in update.items():
        if t.dim() >= 2:
            groups.setdefault((t.shape[0], t[0].numel()), []).append(name)
    return groups


def batch(update: Mapping[str, torch.Tensor], names: list[str], shape: tuple[int, int]) -> torch.Tensor:
    return torch.stack([update[n].reshape(shape) for n in names])


def svd_tails(update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """name → tail[r] = Σ_{k≥r} σ_k² (float64, CPU): the squared error of the best rank-r approximation."""
    out: dict[str, torch.Tensor] = {}
    for shape, names in as_matrices(update).items():
        sigma = torch.linalg.svdvals(batch(update, names, shape)).double().cpu()
        tails = sigma.pow(2).flip(-1).cumsum(-1).flip(-1)
        for name, tail in zip(names, tails):
            out[name] = torch.cat([tail, tail.new_zeros(1)])
    return out


def svd_optimum(update: Mapping[str, torch.Tensor], tails: Mapping[str, torch.Tensor], setting: Setting) -> float:
    """Relative error of per-matrix rank-r truncation on the tensors the codec compresses (rest exact)."""
    rate = as_compression(setting.compression).min_compression_rate
    dims = compressible(layout_of(update), int(setting.rank), rate)
    num = sum(float(tails[name][r]) for name, (_, _, r) in dims.items())
    den = sum(float(t.double().pow(2).sum()) for t in update.values())
    return math.sqrt(num / den)


def packed_nbytes(encoded: Mapping[str, torch.Tensor], layout: Mapping[str, Any]) -> int:
    return sum(int(a.nbytes) for a in pack(encoded, layout).values())


# --- per-model benchmark ---------------------------------------------------------------------
def bench_model(key: str, device: torch.device, quick: bool) -> dict[str, Any]:
    title, shape_fn = MODELS[key]
    shapes = shape_fn()
    rounds = 0 if (quick and key == "resnet18") else WARM_ROUNDS
    big = key == "resnet18"
    repeats = (3 if big else 5) if quick else (7 if big else 25)

    with console.status(f"[{key}] generating {rounds + 1} synthetic update(s)…"):
        source = DriftingUpdate(shapes)
        updates = []
        for r in range(rounds + 1):
            if r:
                source.drift()
            updates.append({n: t.to(device) for n, t in source.sample().items()})
        first, last = updates[0], updates[-1]
        inputs = layout_of(first)
        n_params = sum(t.numel() for t in first.values())
    with console.status(f"[{key}] singular values of the first and last update…"):
        tails_first = svd_tails(first)
        tails_last = svd_tails(last) if rounds else tails_first
    console.log(f"[{key}] {title}: {n_params:,} params in {len(shapes)} tensors, {rounds} warm rounds")

    dense_bytes = layout_nbytes(inputs)
    rows: list[dict[str, Any]] = []
    for setting in settings():
        codec = build_codec(setting.config())
        layout = codec.layout(inputs)
        gen = torch.Generator(device=device).manual_seed(SEED)
        state = codec.init_state(inputs, device, SEED)
        encoded, state = codec.encode(first, state, gen)
        err_fresh = rel_error(first, codec.decode(encoded, inputs))
        nbytes = packed_nbytes(encoded, layout)
        assert nbytes == layout_nbytes(layout), (setting.label, nbytes, layout_nbytes(layout))
        errs = []
        for update in updates[1:]:
            encoded, state = codec.encode(update, state, gen)
            errs.append(rel_error(update, codec.decode(encoded, inputs)))
        warm_state = state
        timed = interleaved({"encode": lambda: codec.encode(last, warm_state, gen),
                             "decode": lambda: codec.decode(encoded, inputs)}, device, repeats)
        enc_ms, dec_ms = timed["encode"]["median"], timed["decode"]["median"]
        row: dict[str, Any] = {
            "label": setting.label, "compression": setting.config(), "bytes": nbytes,
            "ratio": dense_bytes / nbytes, "err_fresh": err_fresh,
            "err_warm": errs[-1] if errs else None, "err_rounds": errs,
            "encode_ms": enc_ms, "decode_ms": dec_ms,
            "encode_min_ms": timed["encode"]["min"], "decode_min_ms": timed["decode"]["min"],
        }
        if setting.rank is not None:
            row["opt_fresh"] = svd_optimum(first, tails_first, setting)
            row["opt_warm"] = svd_optimum(last, tails_last, setting) if rounds else None
            row["fresh_over_opt"] = err_fresh / row["opt_fresh"]
            row["warm_over_opt"] = (errs[-1] / row["opt_warm"]) if rounds else None
        rows.append(row)
        console.log(f"[{key}] {setting.label:<28} {nbytes:>11,} B  err {err_fresh:.4f}"
                    + (f" → {errs[-1]:.4f}" if errs else "") + f"  enc {enc_ms:8.2f} ms  dec {dec_ms:8.2f} ms")

    # Full and randomized SVD of every matrix of the update (batched per shape).
    groups = as_matrices(last)
    stacked = {shape: batch(last, names, shape) for shape, names in groups.items()}
    svd_repeats = 1 if quick else (3 if big else 7)
    with console.status(f"[{key}] timing torch.linalg.svd…"):
        svd_t = timings(lambda: [torch.linalg.svd(b, full_matrices=False) for b in stacked.values()],
                        device, svd_repeats)
        svd_ms = svd_t["median"]
    lowrank: dict[str, dict[str, float]] = {}
    for rank in (1, 2, 4, 8):
        with console.status(f"[{key}] timing torch.svd_lowrank(q={rank})…"):
            lr_t = timings(lambda: [torch.svd_lowrank(b, q=min(rank, *b.shape[1:])) for b in stacked.values()],
                           device, svd_repeats if big else repeats)
            # Its error: rank-r reconstruction of every matrix (1-D tensors exact), for reference.
            torch.manual_seed(SEED)
            approx = dict(last)
            for shape, names in groups.items():
                u, s, v = torch.svd_lowrank(stacked[shape], q=min(rank, *shape))
                for name, rec in zip(names, (u * s.unsqueeze(1)) @ v.transpose(1, 2)):
                    approx[name] = rec.reshape(last[name].shape)
        lowrank[str(rank)] = {"ms": lr_t["median"], "min_ms": lr_t["min"], "err": rel_error(last, approx)}
    for row in rows:
        if row["label"].startswith("PowerSGD"):
            row["svd_speedup"] = svd_ms / row["encode_ms"]
            row["svd_speedup_min"] = svd_t["min"] / row["encode_min_ms"]
    console.log(f"[{key}] full SVD {svd_ms:.1f} ms; svd_lowrank " +
                ", ".join(f"q={r}: {v['ms']:.1f} ms" for r, v in lowrank.items()))
    return {
        "title": title, "params": n_params, "tensors": len(shapes), "matrices": sum(len(v) for v in groups.values()),
        "dense_bytes": dense_bytes, "warm_rounds": rounds, "repeats": repeats, "settings": rows,
        "svd_ms": svd_ms, "svd_min_ms": svd_t["min"], "svd_lowrank": lowrank, "load_average": load_average(),
    }


# --- torch hook comparison -------------------------------------------------------------------
def bench_hook(device: torch.device, quick: bool, size: int = 1000) -> dict[str, Any]:
    """One power step on a size×size matrix: our PowerSGD encode vs the powerSGD_hook math."""
    gen = torch.Generator().manual_seed(SEED)
    matrix = torch.randn(size, size, generator=gen).to(device)
    repeats = 11 if quick else 51
    rows = []
    for rank in (1, 2, 4, 8):
        codec = build_codec({"method": "powersgd", "rank": rank, "power_iterations": 1, "error_feedback": False,
                             "quantize_bits": None, "entropy_coding": "none"})
        tensors = {"w": matrix}
        state = codec.init_state(layout_of(tensors), device, SEED)
        m3 = matrix.unsqueeze(0)  # the hook's batch of one is a view, no copy
        q0 = state["w.Q"].unsqueeze(0).clone()

        def hook_step() -> tuple[torch.Tensor, torch.Tensor]:
            q = q0.clone()  # _orthogonalize works in place; keep the warm start intact across repeats
            hook_orthogonalize(q)
            p = torch.bmm(m3, q)
            hook_orthogonalize(p)
            return p, torch.bmm(m3.transpose(1, 2), p)

        def hook_step_with_copy() -> tuple[torch.Tensor, torch.Tensor]:
            # Same math on a float32 copy of the matrix, as our encode makes one (lowrank.stack).
            m = matrix.to(torch.float32).clone().unsqueeze(0)
            q = q0.clone()
            hook_orthogonalize(q)
            p = torch.bmm(m, q)
            hook_orthogonalize(p)
            return p, torch.bmm(m.transpose(1, 2), p)

        t = interleaved({"ours": lambda: codec.encode(tensors, state), "hook": hook_step,
                         "hook_copy": hook_step_with_copy}, device, repeats, warmup=3)
        ours, hook = t["ours"]["median"], t["hook"]["median"]
        rows.append({"rank": rank, "ours_ms": ours, "hook_ms": hook, "ratio": ours / hook,
                     "hook_copy_ms": t["hook_copy"]["median"],
                     "ours_min_ms": t["ours"]["min"], "hook_min_ms": t["hook"]["min"],
                     "hook_copy_min_ms": t["hook_copy"]["min"], "ratio_min": t["ours"]["min"] / t["hook"]["min"]})
        console.log(f"[hook] rank {rank}: ours {ours:.3f} ms, hook math {hook:.3f} ms, ratio {ours / hook:.2f} "
                    f"(min: {t['ours']['min']:.3f} / {t['hook']['min']:.3f} = {rows[-1]['ratio_min']:.2f})")
    with console.status("[hook] full SVD of the matrix…"):
        svd = timings(lambda: torch.linalg.svd(matrix, full_matrices=False), device, 3 if quick else 7)
    return {"size": size, "rows": rows, "svd_ms": svd["median"], "svd_min_ms": svd["min"], "repeats": repeats}


# --- reporting -------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib, "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": str(device),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


COLUMNS = ("codec", "bytes", "ratio", "err 1 round", "err warm", "SVD opt", "warm/opt",
           "enc ms med (min)", "dec ms med (min)", "SVD/enc med (min)")


def table_rows(model: Mapping[str, Any]) -> list[list[str]]:
    out = []
    for row in model["settings"]:
        out.append([
            row["label"], f"{row['bytes']:,}", f"{row['ratio']:.1f}×", f"{row['err_fresh']:.4f}",
            _fmt(row["err_warm"], ".4f"), _fmt(row.get("opt_warm") or row.get("opt_fresh"), ".4f"),
            _fmt(row.get("warm_over_opt"), ".3f"), f"{row['encode_ms']:.2f} ({row['encode_min_ms']:.2f})",
            f"{row['decode_ms']:.2f} ({row['decode_min_ms']:.2f})",
            "–" if "svd_speedup" not in row else f"{row['svd_speedup']:.0f} ({row['svd_speedup_min']:.0f})",
        ])
    return out


HOOK_COLUMNS = ("rank", "ours ms med (min)", "hook math ms med (min)", "hook math + copy of M ms med (min)",
                "ours/hook med (min)")


def hook_rows(hook: Mapping[str, Any]) -> list[list[str]]:
    return [[str(r["rank"]), f"{r['ours_ms']:.3f} ({r['ours_min_ms']:.3f})", f"{r['hook_ms']:.3f} ({r['hook_min_ms']:.3f})",
             f"{r['hook_copy_ms']:.3f} ({r['hook_copy_min_ms']:.3f})", f"{r['ratio']:.2f} ({r['ratio_min']:.2f})"]
            for r in hook["rows"]]


def target_summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """Which targets are met, per setting / rank."""
    opt = {}
    for key, model in results["models"].items():
        for row in model["settings"]:
            if row.get("warm_over_opt") is not None:
                opt[f"{key}/{row['label']}"] = row["warm_over_opt"]
    resnet = results["models"].get("resnet18", {})
    speed = {row["label"]: row["svd_speedup"] for row in resnet.get("settings", []) if "svd_speedup" in row}
    speed_min = {row["label"]: row["svd_speedup_min"] for row in resnet.get("settings", []) if "svd_speedup" in row}
    hook = {str(row["rank"]): row["ratio"] for row in results["hook"]["rows"]}
    hook_min = {str(row["rank"]): row["ratio_min"] for row in results["hook"]["rows"]}
    return {
        "warm_within_5pct_of_svd": {"target": TARGET_OPT_RATIO, "values": opt,
                                    "missed": sorted(k for k, v in opt.items() if v > TARGET_OPT_RATIO)},
        "resnet18_encode_vs_full_svd": {"target": TARGET_SVD_SPEEDUP, "values": speed,
                                        "missed": sorted(k for k, v in speed.items() if v < TARGET_SVD_SPEEDUP)},
        "resnet18_encode_vs_full_svd_min": {"target": TARGET_SVD_SPEEDUP, "values": speed_min,
                                            "missed": sorted(k for k, v in speed_min.items() if v < TARGET_SVD_SPEEDUP)},
        "hook_ratio": {"target": TARGET_HOOK_RATIO, "values": hook,
                       "missed": sorted(k for k, v in hook.items() if v > TARGET_HOOK_RATIO)},
        "hook_ratio_min": {"target": TARGET_HOOK_RATIO, "values": hook_min,
                           "missed": sorted(k for k, v in hook_min.items() if v > TARGET_HOOK_RATIO)},
    }


def print_rich(results: Mapping[str, Any]) -> None:
    for key, model in results["models"].items():
        table = Table(title=f"{model['title']} — {model['params']:,} params, dense {model['dense_bytes']:,} B, "
                            f"{model['warm_rounds']} warm rounds", title_justify="left")
        for col in COLUMNS:
            table.add_column(col, justify="left" if col == "codec" else "right")
        for row in table_rows(model):
            table.add_row(*row)
        console.print(table)
        lr = ", ".join(f"q={r}: {v['ms']:.1f} ms, min {v['min_ms']:.1f} (err {v['err']:.4f})" for r, v in model["svd_lowrank"].items())
        console.print(f"  full SVD (all matrices): {model['svd_ms']:.1f} ms (min {model['svd_min_ms']:.1f}); "
                      f"svd_lowrank: {lr}; load average {model['load_average']}\n")
    hook = results["hook"]
    table = Table(title=f"One power step on a {hook['size']}×{hook['size']} matrix (full SVD {hook['svd_ms']:.1f} ms, "
                        f"min {hook['svd_min_ms']:.1f})",
                  title_justify="left")
    for col in HOOK_COLUMNS:
        table.add_column(col, justify="right")
    for row in hook_rows(hook):
        table.add_row(*row)
    console.print(table)
    for name, target in results["targets"].items():
        missed = target["missed"]
        console.print(f"target {name} ({target['target']}): " +
                      ("[green]met[/green]" if not missed else f"[red]missed[/red] by {len(missed)}: {', '.join(missed)}"))


def render_markdown(results: Mapping[str, Any]) -> str:
    lines = []
    for key, model in results["models"].items():
        lines.append(f"**{model['title']}** — {model['params']:,} params in {model['tensors']} tensors "
                     f"({model['matrices']} matrices), dense fp32 {model['dense_bytes']:,} B, "
                     f"{model['warm_rounds']} warm rounds, timing = median of {model['repeats']}.\n")
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "|".join("---" if c == "codec" else "---:" for c in COLUMNS) + "|")
        for row in table_rows(model):
            lines.append("| " + " | ".join(row) + " |")
        lr = "; ".join(f"q={r}: {v['ms']:.1f} ms, min {v['min_ms']:.1f} (err {v['err']:.4f})" for r, v in model["svd_lowrank"].items())
        lines.append(f"\nFull `torch.linalg.svd` of all matrices: {model['svd_ms']:.1f} ms "
                     f"(min {model['svd_min_ms']:.1f}). "
                     f"`torch.svd_lowrank`: {lr}.\n")
    hook = results["hook"]
    lines.append(f"**One power step on a {hook['size']}×{hook['size']} matrix** "
                 f"(full `torch.linalg.svd`: {hook['svd_ms']:.1f} ms, min {hook['svd_min_ms']:.1f}; "
                 f"median/min of {hook['repeats']} interleaved calls)\n")
    lines.append("| " + " | ".join(HOOK_COLUMNS) + " |")
    lines.append("|" + "|".join("---:" for _ in HOOK_COLUMNS) + "|")
    for row in hook_rows(hook):
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repeats, no ResNet-18 rounds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda if available, else cpu")
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--render", type=Path, default=None, help="only print markdown for an existing JSON file")
    args = parser.parse_args(argv)
    if args.render is not None:
        print(render_markdown(json.loads(args.render.read_text())))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    start = time.perf_counter()
    results: dict[str, Any] = {
        "meta": machine_info(device),
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else "main()",
        "quick": args.quick,
        "synthetic_update": {
            "signal_rank": SIGNAL_RANK, "singular_value_decay": DECAY, "noise_energy_fraction": NOISE_FRACTION,
            "drift_per_round": DRIFT, "entry_rms": ENTRY_SCALE, "warm_rounds": WARM_ROUNDS, "seed": SEED,
            "error_feedback": False,
        },
        "models": {},
    }
    if args.threads:
        torch.set_num_threads(args.threads)
        results["meta"]["threads"] = torch.get_num_threads()
    results["meta"]["load_average_start"] = load_average()
    console.log(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
                f"load average {results['meta']['load_average_start']}")
    for key in args.models:
        results["models"][key] = bench_model(key, device, args.quick)
    results["hook"] = bench_hook(device, args.quick)
    results["targets"] = target_summary(results)
    results["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
    results["meta"]["load_average_end"] = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print_rich(results)
    console.log(f"wrote {args.out} in {results['meta']['wall_s']} s")
    if args.markdown:
        print(render_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
