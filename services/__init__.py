"""The services, one process each: `python -m services.verifier`, `services.drafter`, `services.policy`."""

import os

# llama.cpp's CPU threads (libgomp, read once when it loads; torch loads the same library first,
# hence here, before any service imports model code) spin for about 5 ms of a core after each
# forward before they sleep: the very time the service answers its call and the gateway plans the
# next step on the same cores. A short spin keeps the barriers within a forward as fast (decode
# time unchanged on the built-in target) and gives the core back after it. A value the user sets,
# or OMP_WAIT_POLICY, wins.
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"
