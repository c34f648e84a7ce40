"""``dstrain`` whose rank 0 stops at its Nth elastic commit between keeping the state and recording the commit's
samples: it writes its pid to MARKER and waits there until it is killed. A rank 0 lost in that window must not take
those samples' record with it (tests/test_elastic.py).

    python elastic_hold.py N MARKER train ARGS...
"""

import os
import sys
import threading

from dstrain import cli
from dstrain.train.fault import SampleLog


def main() -> None:
    hold, marker, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    write = SampleLog.write

    def held(self, gathered, commit=None):
        # The marker also keeps the rank 0 after it, which records this commit's samples again, from holding.
        if commit == hold and self.world.is_root and not os.path.exists(marker):
            with open(marker + ".new", "w") as f:
                f.write(str(os.getpid()))
            os.replace(marker + ".new", marker)
            threading.Event().wait()
        return write(self, gathered, commit)

    SampleLog.write = held
    cli.main(argv)


if __name__ == "__main__":
    main()
