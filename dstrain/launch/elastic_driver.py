"""``python -m dstrain.launch.elastic_driver HOROVODRUN_ARGS...``: horovodrun's elastic driver with dstrain's fix of a
driver hang (see :func:`dstrain.distributed.run_elastic_driver`); what ``dstrain launch --elastic`` runs."""

import sys

from dstrain.distributed import run_elastic_driver

if __name__ == "__main__":
    run_elastic_driver(sys.argv[1:])
