"""`python -m casa_hf.serving.transformers_serve serve MODEL [options]`: Transformers' own `transformers serve`, with
CASA registered in each of its processes.

Since Transformers 5.25 the server loads each model in a process started with multiprocessing's "spawn": a fresh
interpreter that imports what it unpickles (Transformers' loader), never `casa_hf`, so `casa` is an unknown model type
there even when the parent imported `casa_hf`. A spawned process does re-import the parent's main module (as
`__mp_main__`, without running its `__main__` block), so this one, importing `casa_hf`, registers CASA in all of them.
"""

from transformers.cli.transformers import main

import casa_hf  # noqa: F401  (registers CASA with the Auto classes and name tables, in every spawned process too)

if __name__ == "__main__":
    main()
