"""Communication model for sequence-parallel attention: ring (zigzag) vs Ulysses, per rank per layer.

    python bench/comm_model.py                      # 60K, 128K, 1M tokens on 8 GPUs, Hq=40, Hkv=8, D=128, bf16
    python bench/comm_model.py --world 4 --tokens 32768 --fwd-tflops 300

THIS IS A MODEL, NOT A MEASUREMENT: bytes follow exactly from what qlfast/parallel/ring.py and ulysses.py send;
times divide them by ASSUMED link bandwidths and divide FLOPs by ASSUMED kernel throughputs (flags below).

What is sent, per rank per attention layer (T_l = N / W local tokens, b = bytes per element):
  ring fwd      (W-1) kv blocks:                              (W-1) * 2 T_l Hkv D b
  ring bwd      (W-1) kv blocks + W fp32 dk/dv blocks:        (W-1) * 2 T_l Hkv D b + W * 2 T_l Hkv D 4
  ulysses fwd   all-to-all q,k,v then out, (W-1)/W leaves:    (W-1)/W * T_l (Hq + 2 Hkv' + Hq) D b
  ulysses bwd   the same volume again (dout in, dq,dk,dv out)
with Hkv' = max(Hkv, W) (kv heads replicated when W > Hkv).
Ring overlap: every zigzag step (the first included) computes T_l^2 / 2 query-key pairs, fwd 4 T_l^2/2 Hq D FLOPs,
bwd 2.5x that (FlashAttention-2's 5 GEMMs vs 2); the next block's transfer hides behind it when
transfer_time <= compute_time. Ulysses' all-to-alls sit on the critical path (attention needs them first) unless
the model overlaps them with other layers' work, which qlfast does not.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# Assumptions (per GPU, per direction, effective): NVLink4 on H100 SXM is 900 GB/s bidirectional in aggregate
# (450 GB/s per direction); NCCL p2p/all-to-all reach roughly 75-80% of that. InfiniBand NDR 400 Gb/s = 50 GB/s
# per GPU with one NIC per GPU, ~40 GB/s effective.
LINKS_GBPS = {"NVLink": 350.0, "IB-NDR": 40.0}


@dataclass(frozen=True)
class Shape:
    tokens: int  # N, the whole sequence across the group
    world: int = 8
    hq: int = 40
    hkv: int = 8
    d: int = 128
    elem_bytes: int = 2  # bf16

    @property
    def t_local(self) -> float:
        return self.tokens / self.world


def ring_bytes(s: Shape) -> dict:
    kv_block = 2 * s.t_local * s.hkv * s.d * s.elem_bytes
    dkv_block = 2 * s.t_local * s.hkv * s.d * 4  # fp32 accumulators travel in backward
    return {"fwd": (s.world - 1) * kv_block, "bwd": (s.world - 1) * kv_block + s.world * dkv_block,
            "kv_block": kv_block, "dkv_block": dkv_block}


def ulysses_bytes(s: Shape) -> dict:
    hkv = max(s.hkv, s.world)
    frac = (s.world - 1) / s.world
    vol = frac * s.t_local * (s.hq + 2 * hkv + s.hq) * s.d * s.elem_bytes
    return {"fwd": vol, "bwd": vol}


def ring_step_flops(s: Shape) -> dict:
    pairs = s.t_local ** 2 / 2  # every zigzag step: T_l x T_l/2 unmasked (or the causal local block)
    fwd = 4 * pairs * s.hq * s.d
    return {"fwd": fwd, "bwd": 2.5 * fwd}


def model_rows(s: Shape, fwd_tflops: float, bwd_tflops: float) -> list[dict]:
    rb, ub, fl = ring_bytes(s), ulysses_bytes(s), ring_step_flops(s)
    t_fwd, t_bwd = fl["fwd"] / (fwd_tflops * 1e12), fl["bwd"] / (bwd_tflops * 1e12)
    rows = []
    for link, gbps in LINKS_GBPS.items():
        bw = gbps * 1e9
        step_fwd_xfer = rb["kv_block"] / bw
        step_bwd_xfer = (rb["kv_block"] + rb["dkv_block"]) / bw
        attn = s.world * (t_fwd + t_bwd)  # attention compute per layer (fwd + bwd), same for both schemes
        ring_exposed = s.world * (max(0.0, step_fwd_xfer - t_fwd) + max(0.0, step_bwd_xfer - t_bwd))
        uly_exposed = (ub["fwd"] + ub["bwd"]) / bw
        rows.append({
            "tokens": s.tokens, "link": link,
            "ring_fwd_MB": rb["fwd"] / 1e6, "ring_bwd_MB": rb["bwd"] / 1e6,
            "ulysses_fwd_MB": ub["fwd"] / 1e6, "ulysses_bwd_MB": ub["bwd"] / 1e6,
            "step_fwd_compute_ms": t_fwd * 1e3, "step_fwd_xfer_ms": step_fwd_xfer * 1e3,
            "step_bwd_compute_ms": t_bwd * 1e3, "step_bwd_xfer_ms": step_bwd_xfer * 1e3,
            "attn_ms": attn * 1e3, "ring_exposed_ms": ring_exposed * 1e3, "ulysses_exposed_ms": uly_exposed * 1e3,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'tokens':>9} {'link':>7} | {'ring MB f/b':>15} {'ulysses MB f/b':>15} | {'ring step fwd ms':>18} "
            f"{'ring step bwd ms':>18} | {'attn ms':>8} {'exposed ring':>12} {'exposed ulys':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['tokens']:>9} {r['link']:>7} | {r['ring_fwd_MB']:>7.0f}/{r['ring_bwd_MB']:<7.0f} "
            f"{r['ulysses_fwd_MB']:>7.0f}/{r['ulysses_bwd_MB']:<7.0f} | "
            f"{r['step_fwd_compute_ms']:>7.3f} vs {r['step_fwd_xfer_ms']:<7.3f} "
            f"{r['step_bwd_compute_ms']:>7.3f} vs {r['step_bwd_xfer_ms']:<7.3f} | {r['attn_ms']:>8.2f} "
            f"{r['ring_exposed_ms']:>12.3f} {r['ulysses_exposed_ms']:>12.3f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="61440,131072,1048576", help="comma-separated total sequence lengths")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--hq", type=int, default=40)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--fwd-tflops", type=float, default=450.0, help="ASSUMED attention fwd throughput per GPU")
    ap.add_argument("--bwd-tflops", type=float, default=350.0, help="ASSUMED attention bwd throughput per GPU")
    a = ap.parse_args(argv)
    rows = []
    for n in (int(x) for x in a.tokens.split(",")):
        rows += model_rows(Shape(n, a.world, a.hq, a.hkv, a.d), a.fwd_tflops, a.bwd_tflops)
    print(f"MODEL (not a measurement): W={a.world}, Hq={a.hq}, Hkv={a.hkv}, D={a.d}, bf16; bytes sent per rank per "
          f"layer; assumed links {LINKS_GBPS} GB/s, attention {a.fwd_tflops:.0f}/{a.bwd_tflops:.0f} TFLOP/s fwd/bwd")
    print("ring step: compute vs transfer time of one kv hop (hidden when compute >= transfer); exposed = comm time "
          "not hidden behind attention, per layer fwd+bwd")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
