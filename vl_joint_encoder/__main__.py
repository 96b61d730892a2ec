"""`python -m vl_joint_encoder COMMAND ...` (e.g. under `accelerate launch ... -m vl_joint_encoder train cfg.yaml`)."""

import sys

from .cli import main


sys.exit(main())
