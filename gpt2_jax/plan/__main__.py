"""python -m gpt2_jax.plan: the CLI lives in gpt2_jax.plan.cli (imported once, not run twice by runpy)."""

import sys

from gpt2_jax.plan.cli import main

sys.exit(main())
