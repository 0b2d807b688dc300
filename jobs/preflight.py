"""Check everything a run will need before it starts, and print one table: stage, what it needs, what was found,
OK or the problem with its fix. Exits 1 when a check fails.

    python jobs/preflight.py --config jobs/configs/sdxl_pickapic.yaml --offline    # seconds, no network
    python jobs/preflight.py --config jobs/configs/sdxl_pickapic.yaml --job realign --gpu-memory-gib 80
    ray job submit --working-dir . -- python jobs/preflight.py --config jobs/configs/sdxl_pickapic.yaml

Without --offline the stages' requests are checked against the running cluster the job joins (RAY_ADDRESS or
cluster.ray_address), or this machine when it would start its own Ray. --offline skips only what needs the network
or a running cluster (hub look-ups, remote data and storage, the cluster's resources: the stages' requests are then
listed, and a training worker's GPU memory is checked against --gpu-memory-gib). jobs/align.py, sweep.py and
realign.py run the offline checks first by themselves (against this machine when they start their own Ray).
"""

import argparse

from pipeline.config import ConfigError, add_config_args, config_from_args
from pipeline.preflight.run import DEFAULT_GPU_MEMORY_GIB, format_table, joins_a_cluster, run_preflight, this_machine

JOBS = ("align", "precompute", "train", "sweep", "realign", "generate", "evaluate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--job", choices=JOBS, default="align", help="the job the config is for (default: align)")
    parser.add_argument("--offline", action="store_true", help="no network, no cluster: seconds")
    parser.add_argument("--gpu-memory-gib", type=float, default=DEFAULT_GPU_MEMORY_GIB,
                        help=f"memory of the GPUs training gets (default {DEFAULT_GPU_MEMORY_GIB:g})")
    args = parser.parse_args()
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        print(f"config     {'a valid configuration':<44} FAIL     {err}")
        raise SystemExit(1)
    cluster, where = None, "the cluster"
    if not args.offline and joins_a_cluster(cfg):  # its live resources, by Ray's own rules for the address
        import ray

        ray.init(address=cfg.cluster.ray_address)
        cluster, where = ray.cluster_resources(), "the running cluster"
    elif not args.offline:  # the job would start its own Ray here
        cluster, where = this_machine(), "this machine"
    rows = run_preflight(cfg, job=args.job, offline=args.offline, gpu_memory_gib=args.gpu_memory_gib, cluster=cluster,
                         where=where)
    print(format_table(rows))
    raise SystemExit(1 if any(r.failed for r in rows) else 0)


if __name__ == "__main__":
    main()
