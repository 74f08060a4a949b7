"""``python -m harness --rss-probe JSON`` (run by :func:`harness.memory.rss_memory` with
``benchmarks/`` on the path): one training step's resident-set growth in this fresh process."""

import json
import sys

from .memory import rss_probe
from .sizes import Size

if len(sys.argv) == 3 and sys.argv[1] == "--rss-probe":
    a = json.loads(sys.argv[2])
    print(json.dumps(rss_probe(a["arm"], Size(**a["size"]), a["data"], a["threads"], a["lr"], a["seed"])))
else:
    sys.exit("usage: python -m harness --rss-probe JSON (internal: see harness.memory.rss_memory)")
