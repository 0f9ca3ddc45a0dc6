"""A registering process for the registry fault tests (not a test itself): `python registering.py URI
[STALL]` prints "ready", then for each JSON line on stdin ({"name", "seed", "miou", "tmp", "data"}) registers
that seeded checkpoint in URI and prints "result JSON".

STALL injects the fault, here in the test's own process, not in the code under test: "tags" stops right
after MLflow created the version (before its tags and completion mark), "alias" stops once the version is
complete, before `champion` is read or moved. The process prints "stalled" and waits for the test's SIGKILL.
"sync" makes a race of it: each registration stops where it would decide about `champion` (before marking
its version complete, or before reading the alias, whichever comes first), prints "waiting" and goes on
when the test writes a line, at the same moment to every registering process.
"""

import json
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[2])]  # its conftest, and tests.helpers
from conftest import _register  # noqa: E402

uri, stall = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)


def stalled(*_, **__):
    print("stalled", flush=True)
    time.sleep(3600)


def barrier(method):
    def wait_then_call(self, *args, **kwargs):
        if not done:
            done.append(True)
            print("waiting", flush=True)
            sys.stdin.readline()
        return method(self, *args, **kwargs)

    return wait_then_call


def at_complete_mark(method):
    def call(self, name, version, key, value):
        return (barrier(method) if key == "segnet.complete" else method)(self, name, version, key, value)

    return call


done = []  # the barrier of this registration was passed
if stall == "sync":
    MlflowClient.set_model_version_tag = at_complete_mark(MlflowClient.set_model_version_tag)
    MlflowClient.get_model_version_by_alias = barrier(MlflowClient.get_model_version_by_alias)
elif stall == "tags":
    MlflowClient.set_model_version_tag = stalled
elif stall == "alias":
    MlflowClient.get_model_version_by_alias = stalled
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    done.clear()
    result = _register(uri, job["name"], job["seed"], job["miou"], Path(job["tmp"]), Path(job["data"]))
    print("result", json.dumps(result), flush=True)
