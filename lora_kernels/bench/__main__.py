"""``python -m lora_kernels.bench``: runs the command line (``cli.main``)."""
from .cli import main

raise SystemExit(main())
