"""``python -m gpt2_jax.data``: tokenise text into token shards (see `gpt2_jax.data.cli`)."""

import sys

from gpt2_jax.data.cli import main

sys.exit(main())
