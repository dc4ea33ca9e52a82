"""`python -m radixc.serve MODEL ...`: the OpenAI-compatible server (see radixc.serve.cli)."""

import sys

from radixc.serve.cli import main

sys.exit(main())
