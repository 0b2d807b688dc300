"""Scheduled re-alignment: new preference shards -> precompute only those -> train from the promoted model ->
judge against it on fixed prompts and seeds -> promote only if it passes the gate (pipeline/realign.py).

On one box (a local Ray; run it again whenever new shards have landed in data.source):
    python jobs/realign.py --config jobs/configs/realign_toy.yaml --set data.source=/data/prefs
On a cluster (the schedule in cluster/kuberay/realign-cronjob.yaml submits exactly this):
    ray job submit --submission-id realign-$(date -u +%Y%m%d%H) --working-dir . -- \
        python jobs/realign.py --config jobs/configs/realign_sdxl.yaml
Exit codes: 0 promoted, kept or nothing new (the last line says which); 3 another run holds the registry's lock.
"""

import sys

from pipeline.cli import init_ray, parse
from pipeline.preflight.run import require_preflight
from pipeline.realign import format_result, run_realign
from pipeline.registry import RegistryLockedError

EXIT_LOCKED = 3


def main() -> None:
    cfg = parse(__doc__.splitlines()[0])
    require_preflight(cfg, job="realign")  # the offline checks: a failure prints the table and exits (2)
    init_ray(cfg)
    try:
        result = run_realign(cfg)
    except RegistryLockedError as err:
        print(f"[realign] refused: {err}", file=sys.stderr)
        sys.exit(EXIT_LOCKED)
    for line in format_result(result):
        print(line)
    print(f"[realign] status: {result.status}; promoted: {result.promoted or 'none (the base model)'}")


if __name__ == "__main__":
    main()
