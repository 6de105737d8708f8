"""`python -m qlfast.plan --preset NAME [--section.key=value ...] --nodes N --gpus-per-node G --gpu-mem-gib M`

Prints a run's memory plan before any GPU is reserved: per GPU the fp32 master weights, gradients and optimizer
state (after sharding and offload), the activations at the largest micro-batch, the rollout engine's weights and KV
cache for the largest phase, and the headroom; per host node the pinned and offloaded buffers (qlfast/planner.py).
Exit 0 when it fits; a configuration that cannot fit is refused (exit 1) with the numbers and the one or two
overrides that would make it fit. `qlfast.train` runs the same check at start-up on GPU.
"""

from __future__ import annotations

import argparse
import sys

from qlfast import config, planner


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qlfast.plan", description=__doc__.split("\n")[0],
                                epilog="other arguments: --preset NAME and --section.key=value overrides, as for "
                                       "qlfast.train")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node")
    p.add_argument("--gpu-mem-gib", type=float, required=True, help="memory of one GPU in GiB (80 GB H100: 79.1)")
    p.add_argument("--host-mem-gib", type=float, default=None, help="host memory per node in GiB, to check against")
    args, rest = p.parse_known_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1 or args.gpu_mem_gib <= 0:
        p.error(f"--nodes and --gpus-per-node must be >= 1 and --gpu-mem-gib > 0, got {args.nodes}, "
                f"{args.gpus_per_node}, {args.gpu_mem_gib}")
    cfg = config.from_args(rest, prog="python -m qlfast.plan")
    hw = planner.Hardware(args.nodes, args.gpus_per_node, args.gpu_mem_gib, args.host_mem_gib)
    try:
        result = planner.check(cfg, hw)
    except planner.PlanError as e:
        print(f"qlfast.plan: {e}", file=sys.stderr)
        return 2
    print(result.report())
    return 0 if result.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
