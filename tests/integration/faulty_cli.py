"""The orchestrator's CLI with the fault-injecting actor, for tests:

    python -m tests.integration.faulty_cli FAULTS_JSON SPEC [orchestrator arguments]

FAULTS_JSON holds the fields of `tests.integration.faults.Faults`. Run from the repository root
(Ray adds the driver's working directory to the actors' import path, so they import `tests`).
"""

import json
import os
import sys

from orchestrator.__main__ import main
from tests.integration.faults import Faults, FaultyWorker

if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    faults = Faults(**json.loads(sys.argv[1]))
    sys.exit(main(sys.argv[2:], worker_cls=FaultyWorker, worker_args=(faults,)))
