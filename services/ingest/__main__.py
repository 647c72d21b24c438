import sys

from services.ingest import die_with_parent, main
from shared.config import load_config
from shared.runtime import run

# "--worker N --parent PID": one of the extra processes the first one starts (ingest.workers).
worker = int(sys.argv[sys.argv.index("--worker") + 1]) if "--worker" in sys.argv else 0
if worker:
    die_with_parent(int(sys.argv[sys.argv.index("--parent") + 1]))
run(main(load_config(), worker))
